"""The optimisation schedules beyond MAE's: a warmup starting above zero (I-JEPA starts at 2e-4), I-JEPA's cosine
weight-decay schedule, SimMIM's and A2MIM's multistep learning rate, the horizontal-flip probability, from the
functions to a CLI run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastmim import pretrain
from fastmim.data.transforms import crop_and_flip, pretrain_transform
from fastmim.train.optim import build_adamw, lr_at, set_weight_decay, wd_at
from tests.conftest import TINY_ARGS


def test_warmup_starts_at_warmup_lr_and_weight_decay_follows_a_cosine():
    assert lr_at(0.0, 1e-3, 1e-6, 4, 10, start_lr=2e-4) == pytest.approx(2e-4)
    assert lr_at(2.0, 1e-3, 1e-6, 4, 10, start_lr=2e-4) == pytest.approx(6e-4)
    assert lr_at(4.0, 1e-3, 1e-6, 4, 10, start_lr=2e-4) == pytest.approx(1e-3)
    assert lr_at(2.0, 1e-3, 1e-6, 4, 10) == pytest.approx(5e-4)  # MAE's: from 0
    assert wd_at(0.0, 0.04, 0.4, 300) == pytest.approx(0.04)
    assert wd_at(150.0, 0.04, 0.4, 300) == pytest.approx(0.22)
    assert wd_at(300.0, 0.04, 0.4, 300) == pytest.approx(0.4)
    assert wd_at(75.0, 0.04, 0.4, 300) == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi / 4)))


def _simmim_multistep(t: int, base: float, warmup_lr: float, warmup_t: int, milestones: list[int], gamma: float):
    """SimMIM's MultiStepLRScheduler (lr_scheduler.py) at update t, written out: milestones in updates."""
    if t < warmup_t:
        return warmup_lr + t * (base - warmup_lr) / warmup_t
    return base * gamma ** sum(1 for m in milestones if m <= t)


def test_multistep_lr_is_simmims_schedule():
    """Every update of a 12-epoch run of 5 updates per epoch, 2 warm-up epochs from 1e-5, x0.1 at epochs 6 and 9:
    fastmim's fractional-epoch schedule against SimMIM's scheduler's value for that update count (milestones x updates
    per epoch). fastmim sets it before update t as MAE and mmcv do; SimMIM's loop sets it after update t - 1, so its
    update t runs one value behind this."""
    per_epoch, base = 5, 1e-3
    for t in range(12 * per_epoch):
        want = _simmim_multistep(t, base, 1e-5, 2 * per_epoch, [6 * per_epoch, 9 * per_epoch], 0.1)
        got = lr_at(t / per_epoch, base, 0.0, 2, 12, start_lr=1e-5, milestones=(6.0, 9.0), gamma=0.1)
        assert got == pytest.approx(want, rel=1e-12), t
    assert lr_at(5.99, base, 0.0, 2, 12, milestones=(6.0,)) == base  # until the milestone's own update
    assert lr_at(6.0, base, 0.0, 2, 12, milestones=(6.0,)) == pytest.approx(base / 10)


def test_set_weight_decay_leaves_biases_and_norms_undecayed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_adamw(model, 1e-3, 0.04)
    set_weight_decay(opt, 0.3)
    set_weight_decay(opt, 0.0)
    set_weight_decay(opt, 0.25)  # the decaying group is known by its flag, not by a nonzero value
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.25]
    decayed = next(g for g in opt.param_groups if g["weight_decay"] > 0)["params"]
    assert len(decayed) == 1 and decayed[0] is model[0].weight


def test_hflip_probability_in_the_transform():
    img = __import__("PIL.Image", fromlist=["Image"]).new("RGB", (40, 30))
    for p, want in ((0.0, {False}), (1.0, {True})):
        tf = pretrain_transform(32, 0.2, p)
        flips = {crop_and_flip(tf, img, torch.Generator().manual_seed(s))[1] for s in range(20)}
        assert flips == want


def test_cli_warmup_lr_weight_decay_schedule_and_no_flips(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--epochs", "2", "--log-interval",
            "1", "--vis-interval", "100", "--lr", "1e-3", "--warmup-lr", "2e-4", "--warmup-epochs", "1",
            "--weight-decay", "0.04", "--weight-decay-end", "0.4", "--hflip", "0"]  # fmt: skip
    assert pretrain.main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rows[0]["lr"] == pytest.approx(2e-4)  # step 1: the warmup's start
    wd = [r["weight_decay"] for r in rows]
    assert wd[0] == pytest.approx(0.04) and all(a < b for a, b in zip(wd, wd[1:], strict=False)) and wd[-1] < 0.4
    assert "--weight-decay-end with --cuda-graph" in _fails([*args, "--cuda-graph"], capsys)
    assert "hflip is a probability" in _fails([*args[:-1], "1.5"], capsys)


def test_cli_multistep_lr(image_folder, tmp_path, capsys):
    """--lr-schedule multistep: the logged lr is the base after the warmup, halved at epoch 2 and again at 3 (steps 6
    and 9 of 3 per epoch); the cosine's --min-lr is said to be unused; a schedule without milestones, milestones
    inside the warmup or out of order are refused; milestones past the run, and a cosine given them, are said."""
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--epochs", "4", "--log-interval",
            "1", "--vis-interval", "100", "--lr", "1e-3", "--warmup-epochs", "1", "--batch-size", "8",
            "--lr-schedule", "multistep", "--lr-milestones", "2,3", "--lr-gamma", "0.5"]  # fmt: skip
    assert pretrain.main([*args, "--min-lr", "1e-6"]) == 0
    assert "min_lr 1e-06 is not used: it is the cosine schedule's floor" in capsys.readouterr().out
    late = [*args, "--output-dir", str(tmp_path / "late"), "--lr-milestones", "2,4", "--max-steps", "1"]
    assert pretrain.main(late) == 0
    assert "lr milestone 4 is not before the run's end (--epochs 4): the lr does not step there" in \
        capsys.readouterr().out  # fmt: skip
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    lrs = {r["step"]: r["lr"] for r in rows}
    assert len(lrs) == 12 and lrs[1] == 0.0 and lrs[4] == pytest.approx(1e-3) and lrs[6] == pytest.approx(1e-3)
    assert lrs[7] == pytest.approx(5e-4) and lrs[9] == pytest.approx(5e-4) and lrs[10] == pytest.approx(2.5e-4)
    fresh = [*args[: args.index("--output-dir") + 1], str(tmp_path / "x"), *args[args.index("--output-dir") + 2 :]]
    assert "multistep needs --lr-milestones" in _fails(fresh[: fresh.index("--lr-milestones")], capsys)
    assert "the first comes before the warmup ends" in _fails([*fresh, "--lr-milestones", "0.5"], capsys)
    assert "must be increasing epochs" in _fails([*fresh, "--lr-milestones", "3,2"], capsys)
    assert "epochs separated by commas" in _fails([*fresh, "--lr-milestones", "two"], capsys)
    assert "lr_schedule must be one of cosine, multistep" in _fails([*fresh, "--lr-schedule", "step"], capsys)
    cosine = [*fresh, "--lr-schedule", "cosine", "--lr-milestones", "1.1", "--max-steps", "5"]  # ignored: said
    assert pretrain.main(cosine) == 0
    assert "--lr-milestones 1.1 and --lr-gamma 0.5 apply to --lr-schedule multistep" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["lr"] for r in rows][3:] == pytest.approx([lr_at(s / 3, 1e-3, 0.0, 1, 4) for s in (3, 4)])  # cosine


def test_milestones_text_keeps_every_digit():
    """lr_milestones' canonical text: 700 and 700.0, a YAML list or a number compare equal, and no digit is rounded
    away (six significant digits once were)."""
    from fastmim.config import milestones_text

    assert milestones_text([300, 700.0]) == milestones_text("300, 700") == "300,700"
    assert milestones_text(700) == "700"
    assert milestones_text("0.1234567,1234567") == "0.1234567,1234567"
    assert milestones_text("two") == "two"  # kept for validate to name


def test_a_warmup_lr_above_the_peak_is_said_until_the_warmup_is_over(image_folder, tmp_path, capsys):
    """--warmup-lr above the peak makes the warm-up descend: said at the start, and on a resume inside the warm-up,
    not on one past it (a requeue would repeat it for the rest of the run)."""
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--epochs", "3", "--vis-interval",
            "100", "--lr", "1e-4", "--warmup-lr", "1e-3", "--warmup-epochs", "1", "--batch-size", "8"]  # fmt: skip
    said = "note: --warmup-lr 0.001 is above the peak learning rate 0.0001 (--lr): the warm-up lowers"
    assert pretrain.main([*args, "--max-steps", "2"]) == 0  # 3 steps an epoch: inside the warm-up
    assert said in capsys.readouterr().out
    assert pretrain.main(["--resume", "--output-dir", str(out), "--max-steps", "4"]) == 0
    assert said in capsys.readouterr().out
    assert pretrain.main(["--resume", "--output-dir", str(out), "--max-steps", "5"]) == 0  # from step 4: past it
    assert said not in capsys.readouterr().out


def _fails(argv, capsys) -> str:
    assert pretrain.main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--warmup-lr", "-1e-4", "warmup_lr must be a finite number >= 0"),
        ("--warmup-lr", "inf", "warmup_lr must be a finite number >= 0"),
        ("--weight-decay-end", "-0.1", "weight_decay_end must be a finite number >= 0"),
        ("--weight-decay-end", "nan", "weight_decay_end must be a finite number >= 0"),
        ("--hflip", "-0.5", "hflip is a probability"),
        ("--hflip", "often", "must be of type float"),
    ],
)
def test_schedule_and_flip_flags_refuse_bad_values(image_folder, tmp_path, capsys, flag, value, message):
    out = tmp_path / "run"
    argv = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), f"{flag}={value}"]
    assert pretrain.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
