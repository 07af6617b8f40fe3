import dataclasses
import os

import pytest
import torch

from fastmim.config import PretrainConfig
from fastmim.data import ResumableDistributedSampler
from fastmim.pretrain import resolve_config
from fastmim.train.checkpoint import atomic_write
from fastmim.train.optim import lr_at, param_groups
from tests.conftest import ROOT


def test_precedence_defaults_yaml_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 7\nbatch_size: 8\nnorm_pix_loss: false\nlr: 0.001\n")
    cfg, state = resolve_config(["--config", str(cfg_file), "--batch-size", "32", "--lr", "none"])
    assert state is None
    assert cfg.epochs == 7 and cfg.batch_size == 32 and cfg.norm_pix_loss is False and cfg.lr is None
    assert cfg.mask_ratio == PretrainConfig().mask_ratio
    cfg, _ = resolve_config(["--no-norm-pix-loss", "--mask-ratio", "0.6", "--warmup-epochs", "2"])
    assert cfg.norm_pix_loss is False and cfg.mask_ratio == 0.6 and cfg.warmup_epochs == 2.0


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 1.0, 0.0, 4, 20) == 0.0
    assert lr_at(2, 1.0, 0.0, 4, 20) == pytest.approx(0.5)
    assert lr_at(4, 1.0, 0.0, 4, 20) == pytest.approx(1.0)
    assert lr_at(12, 1.0, 0.1, 4, 20) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(20, 1.0, 0.1, 4, 20) == pytest.approx(0.1)


def test_no_weight_decay_groups():
    import fastmim

    m = fastmim.create_model("mae_vit_tiny_patch16", img_size=32)
    no_decay, decay = param_groups(m, 0.05, "tokens")  # (the official rule: tests/train/test_decay_exempt.py)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "cls_token" in nd and "mask_token" in nd and "blocks.0.norm1.weight" in nd and "blocks.0.attn.qkv.bias" in nd
    assert "blocks.0.attn.qkv.weight" in {names[id(p)] for p in decay["params"]}
    assert "pos_embed" not in nd | {names[id(p)] for p in decay["params"]}  # frozen: in no group


def test_sampler_resume_and_sharding():
    full = ResumableDistributedSampler(10, 1, 0, seed=3)
    full.set_epoch(2)
    order = list(full)
    assert sorted(order) == list(range(10))
    part = ResumableDistributedSampler(10, 1, 0, seed=3)
    part.set_epoch(2, start_index=4)
    assert list(part) == order[4:] and len(part) == 6
    full.set_epoch(3)
    assert list(full) != order
    shards = []
    for r in range(3):
        s = ResumableDistributedSampler(10, 3, r, seed=3)
        s.set_epoch(2)
        shards.append(list(s))
    assert all(len(s) == 4 for s in shards) and set(sum(shards, [])) == set(range(10))
    # 10 padded to 12 by repeating the epoch's first 2 (DistributedSampler's rule; rest() counts on it), dealt
    # round-robin: rank r reads slots r, r + 3, ...
    dealt = [shards[i % 3][i // 3] for i in range(12)]
    assert dealt[:10] == order and dealt[10:] == order[:2]
    other = ResumableDistributedSampler(10, 1, 0, seed=4)  # another --seed, another order
    other.set_epoch(2)
    assert list(other) != order


def test_an_epoch_begun_on_two_processes_goes_on_over_three_then_one():
    """The rest of an epoch dealt anew (set_order): 2 ranks read 3 samples each of 23 (padded to 24 by repeating the
    first, as DistributedSampler), then 3 ranks read 2 each of the 18 left, then 1 rank reads the last 12: together
    the 24 slots of the first dealing, each once."""
    n, seen = 23, []
    for r in range(2):
        s = ResumableDistributedSampler(n, 2, r, seed=5)
        s.set_epoch(4, 0, 3)
        seen += list(s)
    stages = [[2, 6]]
    for r in range(3):
        s = ResumableDistributedSampler(n, 3, r, seed=5)
        s.set_order({"epoch": 4, "stages": stages, "offset": 10})  # 10 slots counted as done, never read
        s.set_epoch(4, 10, 12)
        assert len(s) == 2
        seen += list(s)
    stages = [[2, 6], [3, 6]]  # the 3 ranks' dealing: 18 left cut to 18, 6 read
    s = ResumableDistributedSampler(n, 1, 0, seed=5)
    s.set_order({"epoch": 4, "stages": stages, "offset": 0})
    s.set_epoch(4)
    rest = list(s)
    assert len(rest) == 12 and -1 not in rest
    full = ResumableDistributedSampler(n, 1, 0, seed=5)
    full.set_epoch(4)
    order = list(full)
    assert sorted(seen + rest) == sorted(order + order[:1])  # the 24 slots of the first dealing, each read once
    s.set_epoch(5)  # another epoch is dealt as usual
    assert sorted(s) == list(range(n))


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "ckpt.pt"
    torch.save({"a": 1}, target)

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert torch.load(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left behind
    atomic_write(target, lambda tmp: torch.save({"a": 2}, tmp))
    assert torch.load(target) == {"a": 2}
    mask = os.umask(0o022)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~mask  # not mkstemp's private 0600


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_config_resolves_and_builds_its_model(path):
    from fastmim.pretrain import build_model

    cfg, state = resolve_config(["--config", str(path)])
    families = ("mae", "pixmim", "simmim", "a2mim", "maskfeat", "data2vec2", "ijepa", "fcmae")
    assert state is None and cfg.model.split("_")[0] in families
    with torch.device("meta"):  # the shapes, without allocating a large model
        model = build_model(cfg, torch.device("meta"))
    assert getattr(model, "mask_ratio", None) == cfg.mask_ratio  # I-JEPA's block scales set its amounts: none


def test_mask_flag_selects_the_strategy():
    cfg, _ = resolve_config(["--mask", "simmim", "--mask-ratio", "0.5"])
    assert cfg.mask_type == "simmim" and cfg.mask_ratio == 0.5
    cfg, _ = resolve_config(["--mask-type", "uniform"])
    assert cfg.mask_type == "uniform"
    cfg, _ = resolve_config([])
    assert cfg.mask_type is None  # the recipe's own masks
    with pytest.raises(
        ValueError, match=r"one of random, block, simmim, uniform \(or None: the recipe's own\), got 'tube'"
    ):
        resolve_config(["--mask", "tube"])


def test_help_prints_every_option(capsys):
    """--help works (a '%' in a help text once broke argparse's formatting) and names every config field."""
    from fastmim import pretrain
    from fastmim.config import PretrainConfig

    with pytest.raises(SystemExit) as e:
        pretrain.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(PretrainConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "75%;" in out or "75%)" in out


def test_beta2_and_crop_min_reach_the_optimizer_and_the_augmentation(image_folder, tmp_path):
    """--beta2 (AdamW's second-moment decay) and --crop-min (RandomResizedCrop's smallest area) are the recipes'
    (SimMIM, MaskFeat: 0.999, 0.67 / 0.5); defaults stay MAE's; bad values are refused naming the option."""
    from fastmim import pretrain
    from fastmim.train.checkpoint import load_checkpoint
    from tests.conftest import TINY_ARGS

    cfg, _ = resolve_config(["--crop-min", "0.67", "--data-path", str(image_folder)])
    crop = pretrain.build_dataset(cfg).transform.transforms[0]
    assert tuple(crop.scale) == (0.67, 1.0)
    assert resolve_config([])[0].crop_min == 0.2 and resolve_config([])[0].beta2 == 0.95
    out = tmp_path / "run"
    pretrain.run([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps", "1",
                  "--beta2", "0.999"])  # fmt: skip
    groups = load_checkpoint(out / "checkpoint.pt")["optimizer"]["param_groups"]
    assert all(tuple(g["betas"]) == (0.9, 0.999) for g in groups)
    for flag, value in (("--beta2", "1.0"), ("--crop-min", "0"), ("--crop-min", "1.5")):
        with pytest.raises(ValueError, match=flag.lstrip("-").replace("-", "_")):
            resolve_config([flag, value])


def test_config_files_merge_expand_paths_and_errors_name_their_file(tmp_path, monkeypatch):
    """Several --config files apply in order and their model_args merge (with --model-args on top, key by key); ~ and
    $VAR expand in path keys (an unset variable is refused, not made a folder); a bad value names the file it came
    from; a folder given as --config is named as one."""
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("epochs: 7\nmodel_args: {low_pass_radius: 20, foo: 1}\noutput_dir: ~/runs/x\n")
    b.write_text("epochs: 3\nmodel_args: {foo: 2}\ndata_path: ${FASTMIM_TEST_DATA}/imgs\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FASTMIM_TEST_DATA", "/data/set")
    cfg, _ = resolve_config(["--config", str(a), "--config", str(b), "--model-args", "hog_cell=4"])
    assert cfg.epochs == 3 and cfg.model_args == {"low_pass_radius": 20, "foo": 2, "hog_cell": 4}
    assert cfg.output_dir == str(tmp_path / "home" / "runs" / "x") and cfg.data_path == "/data/set/imgs"
    monkeypatch.delenv("FASTMIM_TEST_DATA")
    with pytest.raises(ValueError, match=r"names the environment variable \$FASTMIM_TEST_DATA, which is not set"):
        resolve_config(["--config", str(b)])
    # a whole number written as 3.0 is taken from a flag as it is from YAML; 3.5 is refused from both
    c = tmp_path / "c.yaml"
    c.write_text("epochs: 3.0\n")
    assert resolve_config(["--config", str(c)])[0].epochs == resolve_config(["--epochs", "3.0"])[0].epochs == 3
    with pytest.raises(ValueError, match=r"config key 'epochs' must be of type int, got '3.5' \(from the command"):
        resolve_config(["--epochs", "3.5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: ten\n")
    with pytest.raises(ValueError, match=rf"config key 'epochs' must be of type int, got 'ten' \(from {bad}\)"):
        resolve_config(["--config", str(bad)])
    bad.write_text("mask_ratio: 1.5\n")
    with pytest.raises(ValueError, match=rf"\(from {bad}\)"):
        resolve_config(["--config", str(bad)])
    with pytest.raises(ValueError, match=r"blr must be a finite number >= 0, got -1.0 \(from the command line\)"):
        resolve_config(["--config", str(a), "--blr=-1"])
    # each file's own value is checked against that file; --model-args none clears the files' mappings
    bad.write_text("epochs: ten\n")
    with pytest.raises(ValueError, match=rf"got 'ten' \(from {bad}\)"):
        resolve_config(["--config", str(a), "--config", str(bad)])
    monkeypatch.setenv("FASTMIM_TEST_DATA", "/data/set")
    assert resolve_config(["--config", str(a), "--config", str(b), "--model-args", "none"])[0].model_args is None
    # ~ in a resume's output_dir is expanded before the run is looked for (a requeued job finds its checkpoint)
    cfg, _ = resolve_config(["--config", str(a), "--resume", "if-exists"])
    assert cfg.output_dir == str(tmp_path / "home" / "runs" / "x") and cfg.resume is None
    with pytest.raises(ValueError, match="is a folder: name one of its YAML files"):
        resolve_config(["--config", str(tmp_path)])
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\^32\), got -5 \(from the command line\)"):
        resolve_config(["--seed=-5"])  # (numpy's error, later, named no key)


def test_a_refused_setting_from_a_config_file_names_the_file(tmp_path, capsys):
    """A recipe refusing a setting names the flag; when the value came from a config file, the error says which file
    (a user who never typed the flag finds it); a value given on the command line is not attributed to the file."""
    from fastmim import pretrain

    cfg = tmp_path / "ijepa.yaml"
    cfg.write_text("model: ijepa_vit_tiny_patch16\nmask_type: block\nimg_size: 64\n")
    out = tmp_path / "run"
    assert pretrain.main(["--config", str(cfg), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--mask-type and --mask-ratio do not apply" in err and f"(mask_type set in {cfg})" in err, err
    assert pretrain.main(["--config", str(cfg), "--mask-type", "block", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "do not apply" in err and "set in" not in err, err
    assert not out.exists()  # nothing was left behind


def test_a_resume_records_every_setting_it_changes(image_folder, tmp_path, capsys):
    """Flags override the saved config on --resume; every training setting changed (loss, optimizer, augmentation,
    not just masks) is said and appended to resumes.jsonl with the step it applies from; bookkeeping (max steps, log
    intervals) is not."""
    import json

    from fastmim import pretrain
    from tests.conftest import TINY_ARGS

    out = tmp_path / "run"
    pretrain.run([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps", "1"])
    capsys.readouterr()
    pretrain.run(["--resume", "--output-dir", str(out), "--max-steps", "2", "--crop-min", "0.5", "--beta2", "0.99",
                  "--no-norm-pix-loss", "--log-interval", "3"])  # fmt: skip
    said = capsys.readouterr().out
    assert "note: resuming with changed settings: norm_pix_loss True -> False; beta2 0.95 -> 0.99; crop_min 0.2 -> " \
        "0.5 (recorded in resumes.jsonl with this resume's first checkpoint)" in said, said  # fmt: skip
    (row,) = [json.loads(s) for s in (out / "resumes.jsonl").read_text().splitlines()]
    assert row["step"] == 1 and row["changed"] == {"norm_pix_loss": [True, False], "beta2": [0.95, 0.99],
                                                   "crop_min": [0.2, 0.5]}  # fmt: skip
    # a setting the run left unset is said as the default it stood for, not "None"
    pretrain.run(["--resume", "--output-dir", str(out), "--max-steps", "3", "--lr", "1e-4", "--clip-grad", "1"])
    said = capsys.readouterr().out
    assert "lr unset (blr x effective batch / 256) -> 0.0001; clip_grad unset (no clip) -> 1.0" in said, said
    assert json.loads((out / "resumes.jsonl").read_text().splitlines()[-1])["changed"]["lr"] == [None, 0.0001]


def test_a_resume_that_stops_before_its_first_checkpoint_leaves_config_and_resumes_as_they_were(
    image_folder, tmp_path, monkeypatch
):
    """A resume with --lr 1e6 that diverged (or was killed, or could not save) before writing a checkpoint had already
    rewritten config.yaml with lr 1e6 and recorded the change in resumes.jsonl: settings that never trained in any
    saved step, which a --config of the run brought back. Both are written with the resume's first checkpoint."""
    import json

    import yaml

    from fastmim import pretrain
    from fastmim.train.engine import Trainer
    from tests.conftest import TINY_ARGS

    out = tmp_path / "run"
    pretrain.run([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps", "1"])
    config = (out / "config.yaml").read_text()

    def cannot(self):
        raise RuntimeError("the save failed")

    monkeypatch.setattr(Trainer, "save", cannot)
    with pytest.raises(RuntimeError, match="the save failed"):
        pretrain.run(["--resume", "--output-dir", str(out), "--max-steps", "2", "--lr", "1e6"])
    assert (out / "config.yaml").read_text() == config and not (out / "resumes.jsonl").exists()
    monkeypatch.undo()
    # the checkpoint written, then the disk full at the encoder's file: the row and config.yaml are written with the
    # checkpoint, before the encoder (written after it all, the row was lost for good: the next resume compares with
    # a checkpoint that holds the change already)
    from fastmim.train import checkpoint as ckpt

    def full(*args, **kwargs):
        raise ckpt.NoSpaceError(28, "no space left to write encoder.safetensors")

    monkeypatch.setattr(ckpt, "save_encoder", full)
    with pytest.raises(ckpt.NoSpaceError):
        pretrain.run(["--resume", "--output-dir", str(out), "--max-steps", "2", "--lr", "1e-4"])
    monkeypatch.undo()
    assert ckpt.load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 1e-4
    (row,) = [json.loads(s) for s in (out / "resumes.jsonl").read_text().splitlines()]
    assert row["step"] == 1 and row["changed"] == {"lr": [None, 1e-4]}


def test_a_relative_data_path_is_kept_absolute_so_a_resume_elsewhere_reads_the_same_folder(tmp_path, monkeypatch):
    """--data-path imgs (relative) is saved as the folder it named; a resume run from another directory that has its
    own imgs/ reads the run's folder, not that one. Built-in names stay names."""
    from fastmim import pretrain

    monkeypatch.chdir(tmp_path)
    cfg, _ = resolve_config(["--data-path", "imgs", "--eval-data", "builtin:digits"])
    assert cfg.data_path == str(tmp_path / "imgs") and cfg.eval_data == "builtin:digits"
    (tmp_path / "c.yaml").write_text("data_path: set/train\n")
    assert resolve_config(["--config", "c.yaml"])[0].data_path == str(tmp_path / "set" / "train")
    from tests.conftest import TINY_ARGS, make_image_folder

    make_image_folder(tmp_path / "imgs", n=8)
    pretrain.run([*TINY_ARGS, "--data-path", "imgs", "--output-dir", "run", "--max-steps", "1"])
    elsewhere = tmp_path / "other"
    make_image_folder(elsewhere / "imgs", n=8, seed=3)  # as many images: only the path could tell them apart
    monkeypatch.chdir(elsewhere)
    cfg, state = resolve_config(["--resume", "--output-dir", str(tmp_path / "run")])
    assert cfg.data_path == str(tmp_path / "imgs") and state is not None
    # a run from before data paths were kept absolute saved it as typed: the same command resumes without a change
    from fastmim.train.checkpoint import load_checkpoint

    monkeypatch.chdir(tmp_path)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    state["config"]["data_path"] = "imgs"
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    cfg, state = resolve_config(["--resume", "--output-dir", "run", "--data-path", "imgs"])
    assert state["resume_changes"] == {} and cfg.data_path == str(tmp_path / "imgs")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rel-pos-bias", "window"], "rel_pos_bias must be shared or block"),
        (["--abs-pos", "fourier"], "abs_pos must be one of sincos, learned, none"),
        (["--abs-pos", "none"], "leaves the encoder no position information: add --rel-pos-bias"),
        (["--vit-init", "xavier"], "vit_init must be one of mae, beit, trunc"),
        (["--layer-scale", "0"], "layer_scale must be a finite number > 0"),
        (["--crop", "center"], "crop must be one of random-resized, simple"),
        (["--crop-interp", "nearest"], "crop_interp must be one of bicubic, bilinear"),
    ],
)
def test_bad_encoder_and_crop_settings_name_the_problem(flags, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(["--model", "simmim_vit_tiny_patch16", *flags])


def test_a_runs_config_yaml_passed_back_says_its_max_steps_and_not_its_null_resume(tmp_path, capsys):
    """A run's config.yaml keeps the --max-steps it was last given: a new run from it says it stops there (and how to
    train the whole schedule); its ``resume: null`` is not named as where a --resume came from."""
    from fastmim.pretrain import with_origins

    f = tmp_path / "config.yaml"
    f.write_text("model: mae_vit_tiny_patch16\nmax_steps: 8\nresume: null\noutput_dir: old\n")
    origins = {}
    cfg, _ = resolve_config(["--config", str(f)], origins)
    assert cfg.max_steps == 8
    assert f"note: max_steps 8 comes from {f}: the run stops at step 8 (--max-steps None" in capsys.readouterr().out
    assert "resume" not in origins and origins["output_dir"] == str(f)
    assert with_origins("pass --resume, or another --output-dir", origins).endswith(f"(output_dir set in {f})")
    # a flag with another number than the run's is advice ("--max-steps 75 stops at the epoch's end"), not the
    # value at fault: its origin is not said; the same number, or a setting named as model_args, is followed up
    values = {"max_steps": 8, "model_args": {"x": 1}}
    assert with_origins("--seed 0 finishes the epoch, --max-steps 75 stops at its end", origins, values).endswith("end")
    assert with_origins("fewer than --max-steps 8", origins, values).endswith(f"(max_steps set in {f})")
    assert with_origins("bad (model_args x=1)", {"model_args": str(f)}, values).endswith(f"(model_args set in {f})")
    assert with_origins("bad (model_args x=1)", {}, values) == "bad (with --model-args x=1)"  # (given as the flag)
    said = with_origins("below --min-lr 1.23457E-05", {"min_lr": str(f)}, {"min_lr": 1.23456789e-5})  # (printed :g)
    assert said.endswith(f"(min_lr set in {f})")
    cfg, _ = resolve_config(["--config", str(f), "--max-steps", "None"])
    assert cfg.max_steps is None and "max_steps" not in capsys.readouterr().out


def test_a_resume_naming_what_an_unset_setting_stood_for_changes_nothing(image_folder, tmp_path, capsys):
    """A run saved with --mask-ratio and --lr unset, resumed with the model's ratio and the lr its blr gave, has no
    changed settings to say or record; another ratio is a change, from the value the run had."""
    from fastmim import pretrain
    from tests.conftest import TINY_ARGS

    out = tmp_path / "run"
    assert pretrain.main([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps",
                          "2"]) == 0  # fmt: skip
    capsys.readouterr()
    lr = 1.5e-3 * 4 / 256  # the default blr x batch 4 / 256
    assert pretrain.main(["--resume", "--output-dir", str(out), "--max-steps", "3", "--mask-ratio", "0.75", "--lr",
                          str(lr)]) == 0  # fmt: skip
    assert "changed settings" not in capsys.readouterr().out and not (out / "resumes.jsonl").exists()
    assert pretrain.main(["--resume", "--output-dir", str(out), "--max-steps", "4", "--mask-ratio", "0.7"]) == 0
    assert "resuming with changed settings: mask_ratio 0.75 -> 0.7 " in capsys.readouterr().out
    import fastmim

    a2mim = fastmim.create_model("a2mim_vit_tiny_patch16", img_size=64, depth=1)  # its default is its base class's
    cfg, _ = resolve_config(["--model", "a2mim_vit_tiny_patch16"])
    assert pretrain._unchanged_defaults({"mask_ratio": [None, 0.6]}, cfg, a2mim, {}) == {}
    assert pretrain._unchanged_defaults({"mask_ratio": [None, 0.5]}, cfg, a2mim, {}) == {"mask_ratio": [None, 0.5]}


def test_numpy_random_state_round_trips_in_both_checkpoint_forms():
    """A checkpoint keeps numpy's random state with a tensor for its keys (torch.load's weights_only reads it); a
    checkpoint from before holds np.random.get_state() itself: both restore the same draws."""
    import numpy as np

    from fastmim.train.checkpoint import numpy_rng_state, set_numpy_rng_state

    np.random.seed(3)
    np.random.standard_normal()  # (a cached Gaussian in the state)
    new, old = numpy_rng_state(), np.random.get_state()
    assert isinstance(new[1], torch.Tensor) and new[1].dtype == torch.int64
    after = np.random.standard_normal(5)
    for state in (new, old):
        np.random.seed(99)
        set_numpy_rng_state(state)
        assert np.array_equal(np.random.standard_normal(5), after)


def test_a_repeated_model_args_flag_keeps_every_flags_pairs():
    """argparse kept the last --model-args alone (hog_cell=4 was dropped without a word): the pairs of each are kept,
    and a key two of them give is refused, as within one."""
    cfg = resolve_config(["--model", "maskfeat_vit_tiny_patch16", "--model-args", "hog_cell=4",
                          "--model-args", "gaussian_window=8"])[0]  # fmt: skip
    assert cfg.model_args == {"hog_cell": 4, "gaussian_window": 8}
    with pytest.raises(ValueError, match="names hog_cell in two --model-args flags"):
        resolve_config(["--model-args", "hog_cell=4", "--model-args", "hog_cell=8"])
    flags = ["--model", "maskfeat_vit_tiny_patch16", "--model-args"]  # one that clears drops what came before it
    assert resolve_config([*flags, "none", "--model-args", "hog_cell=4"])[0].model_args == {"hog_cell": 4}
    assert not resolve_config([*flags, "hog_cell=4", "--model-args", "none"])[0].model_args
    assert not resolve_config([*flags, "hog_cell=4", "--model-args", ""])[0].model_args


def test_quoted_on_and_off_are_booleans_as_yes_and_no(tmp_path):
    """YAML reads unquoted on/off as booleans; quoted 'yes'/'no' were taken and quoted 'on'/'off' refused."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("fused_norm: 'on'\ngrad_ckpt: 'off'\n")
    got = resolve_config(["--config", str(cfg)])[0]
    assert got.fused_norm is True and got.grad_ckpt is False


def test_an_unquoted_shard_pattern_in_yaml_gets_a_quoting_hint(tmp_path):
    """YAML reads a value that starts with '{' as a mapping: a brace pattern left unquoted was a YAML syntax error
    or "must be of type str, got {...}", without saying why."""
    for n, text in enumerate(("data_path: {/x/a,/x/b}/s.tar\n", "data_path: {/x/a.tar,/x/b.tar}\n")):
        path = tmp_path / f"{n}.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match="read as a YAML mapping.*put it in quotes, data_path: '"):
            resolve_config(["--config", str(path)])
    (tmp_path / "ok.yaml").write_text("data_path: '{/x/a,/x/b}/s.tar'\n")
    assert resolve_config(["--config", str(tmp_path / "ok.yaml")])[0].data_path == "{/x/a,/x/b}/s.tar"


def test_a_tilde_on_the_command_line_is_the_home_folder_as_in_a_config_file(tmp_path, monkeypatch, capsys):
    """--data-path=~/imgs: the shell leaves a ~ after "=" as it is; fastmim looked for a folder named "~" (a config
    file's data_path: ~/imgs was expanded already). The scan's and the evaluation's paths too."""
    from fastmim.data import scan

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg, _ = resolve_config(["--data-path=~/imgs", "--output-dir=~/runs/a"])
    assert (cfg.data_path, cfg.output_dir) == (str(tmp_path / "imgs"), str(tmp_path / "runs" / "a"))
    assert scan.main(["~/nothing", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nothing") in err and "~" not in err, err
