"""The pretraining CLI end to end: output files, resume, two-process torchrun, NaN handling."""

import json
import os

import pytest
import torch
import yaml
from PIL import Image

from fastmim import pretrain
from fastmim.train.checkpoint import load_checkpoint
from tests.conftest import ROOT, TINY_ARGS, run_cli


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cli_end_to_end_writes_all_outputs(image_folder, tmp_path):
    out = tmp_path / "run"
    r = run_cli([*TINY_ARGS, "--data-path", str(image_folder), "--epochs", "2", "--output-dir", str(out),
                 "--log-interval", "2"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "done: step 12" in r.stdout  # 24 images / batch 4 = 6 steps per epoch
    # stderr, a pipe: the progress in lines, not a bar redrawn every second and joined by carriage returns
    assert "\r" not in r.stderr and any(line.startswith("epoch 2/2: 6/6 [") and "loss=" in line
                                        for line in r.stderr.splitlines()), r.stderr  # fmt: skip
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["epochs"] == 2 and cfg["model"] == "mae_vit_tiny_patch16" and cfg["data_path"] == str(image_folder)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert all(r["loss"] > 0 and r["img_per_s"] > 0 and r["lr"] >= 0 for r in rows)
    state = load_checkpoint(out / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (2, 0, 12)
    # torch.load's default (weights_only, torch >= 2.6) reads it: numpy's random state is kept as a tensor
    assert torch.load(out / "checkpoint.pt", weights_only=True)["model"].keys() == state["model"].keys()
    for epoch in (1, 2):
        png = Image.open(out / "reconstructions" / f"epoch_{epoch:04d}.png")
        # 3 columns (original | masked | reconstruction) of 64 px, 8 rows, 2 px padding
        assert png.size == (3 * 64 + 4 * 2, 8 * 64 + 9 * 2)
    from safetensors.torch import load_file

    timm = pytest.importorskip("timm", reason="timm is a test dependency")
    enc = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=0
    )
    enc.load_state_dict(load_file(out / "encoder.safetensors"), strict=True)


@pytest.mark.slow
def test_resume_mid_epoch_reproduces_an_uninterrupted_run(image_folder, tmp_path, capsys):
    # two loader workers: augmentations are seeded per sample, so resuming is exact whichever worker loads what
    common = [
        *TINY_ARGS,
        "--data-path",
        str(image_folder),
        "--epochs",
        "2",
        "--log-interval",
        "1",
        "--num-workers",
        "2",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain.run([*common, "--output-dir", str(straight), "--max-steps", "8"])
    pretrain.run([*common, "--output-dir", str(split), "--max-steps", "3"])
    first = load_checkpoint(split / "checkpoint.pt")
    assert (first["epoch"], first["batch"], first["step"]) == (0, 3, 3)  # stopped mid-epoch
    assert (split / "reconstructions" / "step_0000003.png").is_file()
    pretrain.run(["--resume", "--output-dir", str(split), "--max-steps", "8"])
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert (b["epoch"], b["batch"], b["step"]) == (1, 2, 8)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert [r["step"] for r in read_metrics(split)] == list(range(1, 9))
    lr_straight = {r["step"]: r["lr"] for r in read_metrics(straight)}
    assert all(lr_straight[r["step"]] == pytest.approx(r["lr"]) for r in read_metrics(split))
    assert yaml.safe_load((split / "config.yaml").read_text())["max_steps"] == 8
    capsys.readouterr()
    pretrain.run(["--resume", str(split / "checkpoint.pt")])  # finished: a no-op that leaves the run as it is
    said = capsys.readouterr().out  # (the saved --max-steps is named: it, not the schedule, ended the run)
    assert "note: max_steps 8 comes from the run's saved config" in said
    assert "nothing to do: the run is at step 8 of 8 (--max-steps 8; the schedule has 12: --max-steps None" in said
    assert load_checkpoint(split / "checkpoint.pt")["step"] == 8
    pretrain.run(["--resume", str(split / "checkpoint.pt"), "--epochs", "3"])  # more epochs: still capped
    assert "raise --max-steps (its 8 ends the run; None: the whole schedule) to train on" in capsys.readouterr().out
    pretrain.run(["--resume", str(split / "checkpoint.pt"), "--epochs", "3", "--max-steps", "9"])
    said = capsys.readouterr().out  # the cosine re-planned over 3 epochs: step 9's lr rises (said with its value)
    lr = {r["step"]: r["lr"] for r in read_metrics(split)}
    assert "epochs 2 -> 3 (the lr schedule is re-planned over 3 epochs: step 9's lr goes" in said
    assert f"-> {lr[9]:.3g}, back up)" in said and lr[9] > lr[8]


@pytest.mark.slow
@pytest.mark.parametrize("mask", ["random", "block"])
def test_training_does_not_depend_on_the_number_of_loader_workers(image_folder, tmp_path, mask):
    """Masks come from (seed, epoch, dataset index) and augmentations likewise: 0 and 2 loader workers train the same
    model (block masks through the C++ generator on CPU)."""
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        args = [*TINY_ARGS, "--data-path", str(image_folder), "--max-steps", "3", "--output-dir", str(out),
                "--mask", mask, "--mask-ratio", "0.6"]  # fmt: skip
        args[args.index("--num-workers") + 1] = str(workers)
        pretrain.run(args)
        runs[workers] = load_checkpoint(out / "checkpoint.pt")["model"]
    for k, v in runs[0].items():
        torch.testing.assert_close(runs[2][k], v, rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(image_folder, tmp_path):
    """DDP over two processes, with the kNN monitor (rank 0 evaluates, rank 1 waits): equal to one process with the
    two ranks' batch and no monitor."""
    from tests.conftest import make_image_folder

    out = tmp_path / "ddp"
    labelled = tmp_path / "labelled"
    make_image_folder(labelled / "train", n=8, classes=2)
    make_image_folder(labelled / "val", n=4, classes=2, seed=1)
    r = run_cli(
        ["--standalone", "--nproc_per_node", "2", "-m", "fastmim.pretrain", *TINY_ARGS, "--data-path",
         str(image_folder), "--epochs", "2", "--output-dir", str(out), "--log-interval", "1", "--blr", "1e-3",
         "--eval-data", str(labelled)],
        module=["-m", "torch.distributed.run"], env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Warning" not in r.stderr, r.stderr  # (torch 2.14's broadcast_buffers notice printed once per rank)
    assert "x2" in r.stdout and "batch 8 (= 4 x 1 accum x 2 procs)" in r.stdout
    assert r.stdout.count("done: step") == 1  # rank 0 alone reports
    knn = [row for row in read_metrics(out) if "knn_top1" in row]
    assert [row["step"] for row in knn] == [0, 3, 6] and r.stdout.count("kNN at step") == 3  # rank 0 alone
    rows = [row for row in read_metrics(out) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]  # 24 images / (4 x 2) per step, written once
    # lr scaled by the effective batch 8: warmup of 1 epoch = 3 steps, lr at step s set from s-1 completed steps
    assert rows[1]["lr"] == pytest.approx(1e-3 * 8 / 256 * 1 / 3)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 6
    sums = state["weights_sum_per_rank"]
    assert len(sums) == 2 and sums[0] == sums[1]  # both ranks hold the same weights, bit for bit
    # one process with the two ranks' batch (their shards interleave: the same 8 images per step) trains the same
    one = tmp_path / "one"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--epochs", "2", "--output-dir", str(one), "--blr", "1e-3"]
    pretrain.run(args[: args.index("--batch-size") + 1] + ["8"] + args[args.index("--batch-size") + 2 :])
    single = load_checkpoint(one / "checkpoint.pt")
    assert single["step"] == 6
    for k, v in single["model"].items():  # the all-reduce sums in another order: float32 rounding apart
        torch.testing.assert_close(state["model"][k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # the two-process run resumed on one process at its epoch boundary: steps counted in the new units from there
    pretrain.run(["--resume", "--output-dir", str(out), "--epochs", "3", "--batch-size", "4"])
    resumed = load_checkpoint(out / "checkpoint.pt")
    assert resumed["world_size"] == 1 and (resumed["epoch"], resumed["batch"], resumed["step"]) == (3, 0, 18)


@pytest.mark.slow
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph-path"])
def test_non_finite_loss_stops_and_keeps_last_checkpoint(image_folder, tmp_path, monkeypatch, capsys, graph):
    """The NaN check stops the run at the step the loss went bad, keeping the last finite checkpoint; also on
    --cuda-graph's code path (its step object, device learning rate and capturable AdamW; run uncaptured on CPU)."""
    from fastmim.methods.mae import MaskedAutoencoderViT

    if graph:
        monkeypatch.setenv("FASTMIM_CUDA_GRAPH_ON_CPU", "1")

    real = MaskedAutoencoderViT.forward_loss
    calls = {"n": 0}

    def poisoned(self, imgs, pred, mask):
        calls["n"] += 1
        loss = real(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)
    out = tmp_path / "nan"
    code = pretrain.main([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out),
                          "--save-interval", "2", "--log-interval", "1", "--vis-interval", "100",
                          *(["--cuda-graph"] if graph else [])])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err  # on a line of its own (the progress bar closed before it), the advice fits fp32
    assert "\nerror: the loss became nan by step 5" in err and "Try a lower --blr or --clip-grad (e.g. 3.0)." in err
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_fp16_rows_hold_the_loss_scale_and_a_collapsed_scale_stops_the_run(image_folder, tmp_path, capsys,
                                                                            monkeypatch):  # fmt: skip
    """fp16: every row holds the GradScaler's scale and the steps it skipped since the row before (both were
    nowhere); gradients inf at every step (a finite loss) skipped every step and the run ended 'done' without one
    update; now the scale's collapse stops it, as fairseq's minimum loss scale does (lowered here to stop soon)."""
    from fastmim.methods.mae import MaskedAutoencoderViT
    from fastmim.train import engine

    args = [*TINY_ARGS, "--data-path", str(image_folder), "--amp", "fp16", "--log-interval", "1",
            "--vis-interval", "100", "--epochs", "1"]  # fmt: skip
    assert pretrain.main([*args, "--output-dir", str(tmp_path / "ok")]) == 0
    rows = _rows(tmp_path / "ok")
    assert len(rows) == 6 and all(r["loss_scale"] == 65536.0 and r["skipped_steps"] == 0 for r in rows)

    real = MaskedAutoencoderViT.forward_loss

    def inf_gradients(self, imgs, pred, mask):  # the loss finite, its gradients not
        zero = pred.sum() * 0
        if zero.requires_grad:
            zero.register_hook(lambda g: g + float("inf"))
        return real(self, imgs, pred, mask) + zero

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", inf_gradients)
    monkeypatch.setattr(engine, "MIN_LOSS_SCALE", 4096.0)  # 65536 halved four times
    out = tmp_path / "skipped"
    capsys.readouterr()
    assert pretrain.main([*args, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "\nerror: the fp16 loss scale fell to 2048 by step 5: the gradients were inf or NaN at every scale" in err
    assert "(the 1 steps since the last row were skipped: the weights did not move in them)" in err
    assert "holds no checkpoint yet (run again there with other settings" in err
    assert "Try --amp bf16, a lower --blr or --clip-grad." in err
    rows = _rows(out)  # the row of the collapse is logged before the stop
    assert [r["skipped_steps"] for r in rows] == [1] * 5 and rows[-1]["loss_scale"] == 2048.0


def test_default_data_folder_is_built_from_sample_photos(tmp_path, monkeypatch):
    pytest.importorskip("skimage", reason="scikit-image provides the built-in photos")
    from fastmim.data import list_images
    from fastmim.data.samples import default_dataset_path

    monkeypatch.setenv("FASTMIM_CACHE", str(tmp_path / "cache"))
    root = default_dataset_path()
    files = list_images(root)
    assert len(files) >= 50 and all(f.endswith(".jpg") for f in files)
    with Image.open(files[0]) as img:
        assert img.mode == "RGB" and min(img.size) >= 64
    mtime = os.path.getmtime(files[0])
    assert default_dataset_path() == root and os.path.getmtime(files[0]) == mtime  # written once, then reused


@pytest.mark.slow
def test_resume_with_changed_data_layout(image_folder, tmp_path, capsys, monkeypatch):
    """A checkpoint inside an epoch resumed with another batch size (the same holds for another number of processes:
    the torch loader's order is dealt anew) reads exactly the samples the stopped run had not reached, in whole
    steps of the new size, and counts the epoch in the new units; one at an epoch's end converts exactly."""
    from fastmim.data.sampler import ResumableDistributedSampler

    read = []
    own = ResumableDistributedSampler.__iter__
    monkeypatch.setattr(ResumableDistributedSampler, "__iter__",
                        lambda self: iter([read.append((self.epoch, i)) or i for i in own(self)]))  # fmt: skip
    common = [*TINY_ARGS, "--data-path", str(image_folder), "--vis-interval", "100"]
    mid, boundary = tmp_path / "mid", tmp_path / "boundary"
    pretrain.run([*common, "--output-dir", str(mid), "--max-steps", "3"])  # 3 of the epoch's 6 steps of 4 images
    first = [i for e, i in read if e == 0]
    read.clear()
    capsys.readouterr()
    pretrain.run(["--resume", "--output-dir", str(mid), "--batch-size", "2", "--epochs", "1", "--max-steps", "100"])
    rest = [i for e, i in read if e == 0]
    assert len(first) == 12 and len(rest) == 12 and sorted(first + rest) == list(range(24))  # each sample once
    assert "the 12 samples it had not reached are dealt over this run's 1 process(es), 6 batches each" in \
        capsys.readouterr().out  # fmt: skip
    state = load_checkpoint(mid / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, 12)  # 1 epoch = 12 steps of 2 from here
    # the epoch's rest, dealt anew, is itself resumable: stopped again inside it, resumed on the same layout
    again = tmp_path / "again"
    pretrain.run([*common, "--output-dir", str(again), "--max-steps", "3"])
    read.clear()
    pretrain.run(["--resume", "--output-dir", str(again), "--batch-size", "2", "--max-steps", "9"])  # 3 of 6 left
    pretrain.run(["--resume", "--output-dir", str(again), "--max-steps", "12"])
    state = load_checkpoint(again / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, 12) and state["epoch_order"] is None
    assert sorted(first + [i for e, i in read if e == 0]) == list(range(24))  # 6 + 6 of the 12 left, each once
    pretrain.run([*common, "--output-dir", str(boundary), "--epochs", "1"])  # 6 steps of 4 images
    pretrain.run(["--resume", "--output-dir", str(boundary), "--epochs", "2", "--batch-size", "8",
                  "--weight-decay", "0.3"])  # fmt: skip
    state = load_checkpoint(boundary / "checkpoint.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (2, 0, 6)  # 1 epoch = 3 steps of 8 from here
    assert state["layout"]["batch_size"] == 8
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.0, 0.3]  # the new value wins


@pytest.mark.slow
@pytest.mark.parametrize("old", [False, True], ids=["checkpoint", "checkpoint-without-seed-in-its-layout"])
def test_a_seed_changed_inside_an_epoch_finishes_the_epoch_in_its_order(image_folder, tmp_path, capsys, monkeypatch,
                                                                         old):  # fmt: skip
    """--seed deals each epoch's order: changed on a resume inside an epoch, the rest of that epoch is the samples
    the run had not reached (a new order repeated 6 of 24 and skipped 6), and the new seed deals the next epoch."""
    from fastmim.data.sampler import ResumableDistributedSampler

    read = []
    own = ResumableDistributedSampler.__iter__
    monkeypatch.setattr(ResumableDistributedSampler, "__iter__",
                        lambda self: iter([read.append((self.epoch, i)) or i for i in own(self)]))  # fmt: skip
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--vis-interval", "100", "--epochs", "2", "--output-dir",
            str(out), "--max-steps", "3"]  # fmt: skip
    pretrain.run(args)  # 3 of the epoch's 6 steps of 4
    if old:  # a checkpoint from before the seed was in its layout: the seed its config holds is compared
        state = torch.load(out / "checkpoint.pt", weights_only=False)
        del state["layout"]["seed"]
        torch.save(state, out / "checkpoint.pt")
    capsys.readouterr()
    pretrain.run(["--resume", "--output-dir", str(out), "--seed", "7", "--max-steps", "None"])
    said = capsys.readouterr().out
    assert "the rest of epoch 1 is dealt from seed 0's order" in said and "another layout" not in said
    epoch0, epoch1 = [i for e, i in read if e == 0], [i for e, i in read if e == 1]
    assert len(epoch0) == 24 and sorted(epoch0) == list(range(24))  # each sample once
    fresh = ResumableDistributedSampler(24, seed=7)
    fresh.set_epoch(1)
    assert epoch1 == list(fresh)  # the new seed from the next epoch on
    state = load_checkpoint(out / "checkpoint.pt")
    assert (state["epoch"], state["step"], state["layout"]["seed"]) == (2, 12, 7) and state["epoch_order"] is None


def test_saved_config_does_not_resume_or_overwrite(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain.run([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps", "2"])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["resume"] is None and saved["output_dir"] == str(out)
    before = (out / "checkpoint.pt").read_bytes()
    assert pretrain.main(["--config", str(out / "config.yaml")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    # resume and output_dir may come from a YAML file too
    cfg = tmp_path / "resume.yaml"
    cfg.write_text(f"resume: auto\noutput_dir: {out}\nmax_steps: 3\n")
    pretrain.run(["--config", str(cfg)])
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3


@pytest.mark.slow
def test_non_finite_weights_are_never_saved(image_folder, tmp_path, monkeypatch, capsys):
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:  # the loss of this step was finite; the update is not
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    out = tmp_path / "inf"
    code = pretrain.main([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out),
                          "--save-interval", "2", "--log-interval", "100", "--vis-interval", "100"])  # fmt: skip
    assert code == 2
    assert "the weights became non-finite by step 4" in capsys.readouterr().err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2


def _losses(image_folder, out, *args) -> list[float]:
    """Trains with ``args`` on the image folder into ``out``, logging every step; the logged losses."""
    pretrain.run([*args, "--data-path", str(image_folder), "--output-dir", str(out), "--log-interval", "1",
                  "--vis-interval", "100", "--loader", "torch"])  # fmt: skip
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _count_calls(monkeypatch, module, name: str) -> list:
    """Replaces ``module.name`` with a wrapper that records each call; the record."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    return calls


def test_fused_norm_and_fastmim_attention_train_as_the_plain_blocks(image_folder, tmp_path, capsys, monkeypatch):
    """--fused-norm (residual adds fused with the next LayerNorm), --fused-gelu (fc1's bias and GELU as one op) and
    --attn-impl fastmim (fastmim.ops.attention) train the same MAE as the plain blocks and SDPA, step for step;
    --fused-gelu is refused for FCMAE."""
    import fastmim.models.vit as vit

    args = [*TINY_ARGS, "--max-steps", "3"]
    plain = _losses(image_folder, tmp_path / "plain", *args)
    calls = _count_calls(monkeypatch, vit, "bias_gelu")
    fused = _losses(image_folder, tmp_path / "fused", *args, "--fused-norm", "--fused-gelu", "--attn-impl", "fastmim")
    assert calls, "--fused-gelu did not reach the model's MLPs"
    assert len(plain) == 3 and fused == pytest.approx(plain, rel=1e-5)
    fcmae = ["--model", "fcmae_convnextv2_atto", "--img-size", "64", "--device", "cpu", "--data-path",
             str(image_folder), "--output-dir", str(tmp_path / "fcmae")]  # fmt: skip
    assert pretrain.main([*fcmae, "--fused-gelu"]) == 2
    assert "--fused-gelu applies to the ViT recipes" in capsys.readouterr().err


def test_fused_norm_trains_fcmae_as_the_plain_layer_norm(image_folder, tmp_path, monkeypatch):
    """FCMAE --fused-norm: each sparse block's LayerNorm through fastmim.ops.layer_norm, the same losses."""
    import fastmim.models.convnextv2_sparse as sparse

    args = ["--model", "fcmae_convnextv2_atto", "--img-size", "64", "--device", "cpu", "--batch-size", "2",
            "--max-steps", "2"]  # fmt: skip
    plain = _losses(image_folder, tmp_path / "plain", *args)
    calls = _count_calls(monkeypatch, sparse, "fused_layer_norm")
    fused = _losses(image_folder, tmp_path / "fused", *args, "--fused-norm")
    assert calls, "--fused-norm did not reach FCMAE's sparse blocks"
    assert len(plain) == 2 and fused == pytest.approx(plain, rel=1e-5)


def test_logged_throughput_leaves_out_saves_and_the_bar_redraws_once_a_second(image_folder, tmp_path, capsys,
                                                                               monkeypatch):  # fmt: skip
    """img_per_s is the training steps' rate: a checkpoint every step (each taking 1000 s more of the trainer's clock
    here) is not counted in it (it was: the row after a save, the first of an epoch after the pictures and kNN,
    dipped 5-15x); and the progress bar's postfix does not force a redraw per logged row (a log file got one per
    step)."""
    import time
    import types

    from fastmim.train import engine
    from fastmim.train.engine import Trainer

    late = [0.0]  # (the trainer's clock runs 1000 s ahead after each save: no sleeping, no dependence on load)
    clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    clock.perf_counter = lambda: time.perf_counter() + late[0]
    monkeypatch.setattr(engine, "time", clock)
    own = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self: (own(self), late.__setitem__(0, late[0] + 1000.0))[0])
    out = tmp_path / "run"
    pretrain.run([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps", "5",
                  "--log-interval", "1", "--save-interval", "1", "--vis-interval", "100"])  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    seconds = [4 / r["img_per_s"] for r in rows]  # (4 images a step)
    assert max(seconds[1:]) < 100, seconds  # a step of the tiny model takes seconds at most, not a save's 1000
    monkeypatch.undo()
    from tqdm import tqdm

    refreshes, own_postfix = [], tqdm.set_postfix

    def set_postfix(bar, *a, refresh=True, **k):
        refreshes.append(refresh)
        return own_postfix(bar, *a, refresh=refresh, **k)

    monkeypatch.setattr(tqdm, "set_postfix", set_postfix)
    capsys.readouterr()
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(tmp_path / "bar"), "--max-steps", "3",
            "--log-interval", "1", "--vis-interval", "100"]  # fmt: skip
    pretrain.run(args)
    assert refreshes == [False] * 3  # (each row's postfix waits for the bar's next once-a-second redraw)
    assert "run_eta=0s" in capsys.readouterr().err  # the whole run's time left at its last row
    from fastmim.train.engine import _duration

    assert [_duration(s) for s in (45.7, 750, 11100, 1e9)] == ["45s", "12m30s", "3h05m", "2376h00m"]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_keep_every_keeps_an_encoder_snapshot_per_epochs_each_loadable_for_evaluation(image_folder, tmp_path, capsys):
    """A run kept only its latest encoder: evaluating epoch 2 of 4 (MAE's code keeps a checkpoint every 20 epochs)
    meant stopping the run there. --keep-every N keeps encoder-epochNNNN.safetensors at every N-th epoch's end."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fastmim.eval.encoder import load_encoder
    from fastmim.train.checkpoint import remove_stale_temporaries

    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--vis-interval", "10"]
    pretrain.run([*args, "--epochs", "4", "--keep-every", "2", "--max-steps", "13"])  # (6 steps an epoch)
    assert sorted(p.name for p in out.glob("encoder-epoch*")) == ["encoder-epoch0002.safetensors"]
    pretrain.run([*args, "--epochs", "4", "--resume", "--max-steps", "24"])  # (the run's --keep-every, resumed)
    kept = sorted(p.name for p in out.glob("encoder-epoch*"))
    assert kept == ["encoder-epoch0002.safetensors", "encoder-epoch0004.safetensors"]
    steps = {}
    for name in (*kept, "encoder.safetensors"):
        with safe_open(out / name, "pt") as f:
            steps[name] = int(f.metadata()["step"])
    assert steps == {kept[0]: 12, kept[1]: 24, "encoder.safetensors": 24}
    early, last = load_file(out / kept[0]), load_file(out / "encoder.safetensors")
    assert not all(torch.equal(early[k], last[k]) for k in last)  # (epoch 2's weights, not the last ones)
    assert torch.equal(load_file(out / kept[1])["pos_embed"], last["pos_embed"])
    encoder, _ = load_encoder(out / kept[0])
    assert all(torch.equal(v, early[k]) for k, v in encoder.state_dict().items() if k in early)
    (out / ".encoder-epoch0006.safetensors.123.tmp").write_bytes(b"x" * 10)  # a copy killed part way
    assert remove_stale_temporaries(out) == 10
    with pytest.raises(ValueError, match="keep_every must be a finite number >= 0"):
        pretrain.run([*args, "--keep-every", "-1", "--output-dir", str(tmp_path / "bad")])


def test_kept_snapshots_mark_a_run_and_one_missed_at_an_epoch_end_is_made_on_resume(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--vis-interval", "10"]
    pretrain.run([*args, "--epochs", "3", "--max-steps", "12"])  # two epochs, no snapshot asked for
    assert not list(out.glob("encoder-epoch*"))
    pretrain.run([*args, "--epochs", "3", "--resume", "--max-steps", "18", "--keep-every", "2"])
    assert sorted(p.name for p in out.glob("encoder-epoch*")) == ["encoder-epoch0002.safetensors"]  # (made at start)
    # the snapshots alone (the rest deleted to save space) still mark the run: neither overwritten nor moved aside
    for name in ("checkpoint.pt", "encoder.safetensors", "config.yaml", "metrics.jsonl"):
        (out / name).unlink()
    with pytest.raises(pretrain.UsageError, match="trained run.s encoder-epoch0002.safetensors .step 12. but no"):
        pretrain.run([*args, "--epochs", "3"])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("encoder")) == ["encoder-epoch0002.safetensors"]
    from fastmim.eval.encoder import load_encoder

    with pytest.raises(FileNotFoundError, match=r"holds 1 encoder snapshot\(s\) \(--keep-every\): encoder-epoch0002"):
        load_encoder(out)


def _histogram_mae(**kwargs):
    """A user's own method, as the README describes one: MAE whose head predicts a 24-wide target per patch (its own
    forward_loss), registered by the user's script."""
    import types

    import fastmim

    model = fastmim.create_model("mae_vit_tiny_patch16", **kwargs)
    model.decoder_pred = torch.nn.Linear(model.decoder_pred.in_features, 24)

    def forward_loss(self, imgs, pred, mask):
        target = imgs.unfold(2, 16, 16).unfold(3, 16, 16).mean((-1, -2)).flatten(2).transpose(1, 2)  # [B, N, 3]
        err = (pred - target.repeat(1, 1, 8)).pow(2).mean(-1)
        return (err * mask).sum() / mask.sum()

    model.forward_loss = types.MethodType(forward_loss, model)
    return model


def test_a_users_model_predicting_another_target_trains_without_pictures(image_folder, tmp_path, capsys, monkeypatch):
    """A registered model whose predictions are not pixel patches: the run stopped at its end (and at every
    --vis-interval epoch) with "tokens (8, 16, 24) do not match grid 4x4, patch 16, channels 3" from the reconstruction
    picture, and --vis-interval 0 was refused. Now the run says once that it draws no pictures and finishes;
    --vis-interval 0 draws none, silently."""
    from fastmim.models import registry

    monkeypatch.setitem(registry._REGISTRY, "mae_hist_vit_tiny_patch16", _histogram_mae)
    args = [*TINY_ARGS, "--model", "mae_hist_vit_tiny_patch16", "--data-path", str(image_folder), "--epochs", "2",
            "--max-steps", "8"]  # fmt: skip
    pretrain.run([*args, "--output-dir", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert out.count("note: no reconstruction pictures in this run: the model's predictions (8, 16, 24) are not "
                     "pixel patches") == 1, out  # fmt: skip
    assert "done: step 8" in out and not list((tmp_path / "a").glob("reconstructions/*.png"))
    pretrain.run([*args, "--output-dir", str(tmp_path / "b"), "--vis-interval", "0"])
    out = capsys.readouterr().out
    assert "reconstruction" not in out and "done: step 8" in out and not (tmp_path / "b" / "reconstructions").exists()
    pretrain.run([*TINY_ARGS, "--data-path", str(image_folder), "--max-steps", "2", "--vis-interval", "0",
                  "--output-dir", str(tmp_path / "c")])  # fmt: skip
    assert not list((tmp_path / "c").glob("reconstructions/*.png"))  # 0: none for a pixel model either
    with pytest.raises(ValueError, match=r"vis_interval must be >= 0 \(0: no reconstruction pictures\), got -1"):
        pretrain.run([*args, "--output-dir", str(tmp_path / "d"), "--vis-interval", "-1"])


def test_init_weights_starts_a_run_from_a_run_or_an_official_checkpoint(image_folder, tmp_path, capsys):
    """A run started from MAE's official pretraining checkpoint ({"model": state dict}; --resume took it for a
    fastmim checkpoint and failed on its 'optimizer' key as a "changed --decoder-embed-dim"): --init-weights takes the
    whole model where it fits, else the encoder, and says which; a resume then keeps its own weights."""
    import fastmim
    from fastmim.train.checkpoint import load_checkpoint

    args = [*TINY_ARGS, "--data-path", str(image_folder), "--max-steps", "1", "--epochs", "1"]
    torch.manual_seed(3)
    kw = dict(img_size=64, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)
    official = fastmim.create_model("mae_vit_tiny_patch16", **kw).state_dict()  # MAE's own layout
    torch.save({"model": official, "epoch": 799}, tmp_path / "mae_pretrain.pth")
    with pytest.raises(pretrain.UsageError, match=r"is not a fastmim checkpoint \(it has no optimizer, step\): "
                                                  r"--resume continues a fastmim run; .*--init-weights"):  # fmt: skip
        pretrain.run([*args, "--resume", str(tmp_path / "mae_pretrain.pth"), "--output-dir", str(tmp_path / "r")])
    capsys.readouterr()
    out = pretrain.run([*args, "--init-weights", str(tmp_path / "mae_pretrain.pth"), "--output-dir",
                        str(tmp_path / "whole"), "--blr", "1e-12"])  # fmt: skip
    assert "the whole model (" in capsys.readouterr().out
    after = load_checkpoint(out / "checkpoint.pt")["model"]
    for k, v in official.items():  # a step at lr ~1e-14: the weights it started from
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-9, msg=k)
    # another decoder (MAE's 512-wide 8 blocks on this tiny run's 64-wide 1): the encoder alone
    big = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, decoder_embed_dim=96, decoder_depth=2,
                               decoder_num_heads=2).state_dict()  # fmt: skip
    torch.save({"model": {f"module.{k}": v for k, v in big.items()}}, tmp_path / "ddp.pth")
    out = pretrain.run([*args, "--init-weights", str(tmp_path / "ddp.pth"), "--output-dir", str(tmp_path / "enc"),
                        "--blr", "1e-12"])  # fmt: skip
    said = capsys.readouterr().out
    assert "the encoder (" in said and "keeps its initialisation" in said, said
    after = load_checkpoint(out / "checkpoint.pt")["model"]
    enc = [k for k in big if not k.startswith("decoder_") and k != "mask_token"]
    for k in enc:
        torch.testing.assert_close(after[k], big[k], rtol=0, atol=1e-9, msg=k)
    assert not torch.equal(after["decoder_pred.weight"][:1], big["decoder_pred.weight"][:1, :64])  # its own init
    # a run's folder (its checkpoint) works too; a resume of the new run keeps its own weights, not the file's
    pretrain.run([*args, "--init-weights", str(tmp_path / "whole"), "--output-dir", str(tmp_path / "again")])
    assert "the whole model" in capsys.readouterr().out
    pretrain.run(["--resume", "--output-dir", str(tmp_path / "again"), "--max-steps", "2"])
    said = capsys.readouterr().out
    assert "initialised from" not in said and "--init-weights changes nothing" not in said  # (its own, kept)
    pretrain.run(["--resume", "--output-dir", str(tmp_path / "again"), "--max-steps", "3", "--init-weights",
                  str(tmp_path / "ddp.pth")])  # fmt: skip
    said = capsys.readouterr().out
    assert "initialised from" not in said and "--init-weights changes nothing in a resumed run" in said
    # weights of another model: refused, naming what does not fit
    small = fastmim.create_model("mae_vit_small_patch16", img_size=64).state_dict()
    torch.save(small, tmp_path / "small.pth")
    with pytest.raises(ValueError, match=r"--init-weights .*encoder's tensors have other shapes than this model's, "
                                         r"such as \S+ \(.*\) against"):  # fmt: skip
        pretrain.run([*args, "--init-weights", str(tmp_path / "small.pth"), "--output-dir", str(tmp_path / "s")])
    torch.save({"w": torch.ones(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="holds neither this model's weights nor its encoder's"):
        pretrain.run([*args, "--init-weights", str(tmp_path / "other.pth"), "--output-dir", str(tmp_path / "o")])


def test_init_weights_refuses_a_checkpoint_with_objects_saying_how_to_take_its_weights(tmp_path):
    """MAE's own checkpoints keep their argparse args beside the weights: not unpickled, the way out said."""
    import argparse

    from fastmim.train.checkpoint import read_init_weights

    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "full.pth")
    with pytest.raises(ValueError, match=r"argparse.Namespace.*if you trust the file, save its weights alone"):
        read_init_weights(tmp_path / "full.pth")


@pytest.mark.parametrize("name", ["ijepa_vit_tiny_patch16", "data2vec2_vit_tiny_patch16"])
def test_init_weights_of_a_teacher_recipe_starts_its_teacher_from_them(name):
    """An encoder-only --init-weights left I-JEPA's and data2vec 2.0's EMA teacher at its random weights (the targets
    of a random network); a whole-model one carried the file's update count (the momentum at its schedule's end).
    The teacher now starts as a copy of the loaded encoder, or keeps the file's, with its schedule from the start."""
    import fastmim
    from fastmim.train.checkpoint import init_model_weights, strip_wrapper_prefixes

    torch.manual_seed(0)
    source = fastmim.create_model(name, img_size=64)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
        source.teacher.updates.fill_(500000)
    model = fastmim.create_model(name, img_size=64)
    said = init_model_weights(model, source.encoder_state_dict(), "'enc'")
    assert "its EMA teacher starts as a copy of the encoder" in said
    student = getattr(model, "context_encoder_state_dict", model.encoder_state_dict)()
    teacher = model.teacher.model.state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in student.items())
    assert all(torch.equal(v, source.encoder_state_dict()[k]) for k, v in model.encoder_state_dict().items())
    model = fastmim.create_model(name, img_size=64)
    whole = strip_wrapper_prefixes({f"_orig_mod.module.{k}": v for k, v in source.state_dict().items()})
    said = init_model_weights(model, whole, "'whole'")
    assert "the whole model" in said and int(model.teacher.updates) == 0 and model.teacher.momentum() == pytest.approx(
        model.teacher.start)  # fmt: skip


def test_init_weights_takes_the_encoder_alone_from_a_deeper_decoder_of_the_same_width():
    """MAE with a 2-block decoder into a 1-block one was "the whole model": block 0 with the deeper decoder's norm and
    head, a mix of two decoders. The encoder alone is taken, and the note says why."""
    import fastmim
    from fastmim.train.checkpoint import init_model_weights

    kw = dict(img_size=64, decoder_embed_dim=32, decoder_num_heads=2)
    deep = fastmim.create_model("mae_vit_tiny_patch16", decoder_depth=2, **kw)
    model = fastmim.create_model("mae_vit_tiny_patch16", decoder_depth=1, **kw)
    before = model.decoder_pred.weight.clone()
    said = init_model_weights(model, deep.state_dict(), "'deep'")
    assert "the encoder (" in said and "of the file's tensors are not this model's" in said, said
    assert torch.equal(model.decoder_pred.weight, before)
    shallow = fastmim.create_model("mae_vit_tiny_patch16", decoder_depth=1, **kw)
    said = init_model_weights(deep, shallow.state_dict(), "'shallow'")
    assert "of this model's are not in the file" in said and "other shapes" not in said, said


def test_help_is_printed_without_importing_torch():
    """--help took 3-6 s (torch, torchvision and DALI imported first); the options come from the config's parser
    alone, so they are printed before those imports: the same text, in a tenth of a second."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "fastmim.pretrain", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "--init-weights" in r.stdout and "usage: python -m fastmim.pretrain" in r.stdout
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "fastmim.config" in imported and "torch" not in imported
    from fastmim.config import build_parser

    assert r.stdout == build_parser().format_help()
