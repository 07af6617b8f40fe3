"""Bad input gets a clear error naming the problem, and nothing is lost."""

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from fastmim import pretrain
from tests.conftest import ROOT, TINY_ARGS


def fails(argv, capsys) -> str:
    assert pretrain.main(argv) == 2
    return capsys.readouterr().err


def test_missing_data_path(tmp_path, capsys):
    err = fails([*TINY_ARGS, "--data-path", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")], capsys)
    assert "does not exist" in err and "nope" in err


def test_empty_data_path(tmp_path, capsys):
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    err = fails([*TINY_ARGS, "--data-path", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")], capsys)
    assert "holds no images" in err


def test_dataset_smaller_than_a_batch(tmp_path, capsys):
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "few", n=3)
    err = fails([*TINY_ARGS, "--data-path", str(data), "--output-dir", str(tmp_path / "o")], capsys)
    assert "the dataset has 3 images, fewer than one global batch" in err
    assert not (tmp_path / "o").exists()  # the folder made for the run is not left behind empty
    err = fails([*TINY_ARGS, "--data-path", str(data), "--output-dir", str(tmp_path / "a" / "b" / "c")], capsys)
    assert "fewer than one global batch" in err and not (tmp_path / "a").exists()  # nor the folders above it
    (tmp_path / "kept").mkdir()  # a folder that was there before stays
    fails([*TINY_ARGS, "--data-path", str(data), "--output-dir", str(tmp_path / "kept")], capsys)
    assert (tmp_path / "kept").is_dir()


def test_option_that_does_not_apply_to_the_recipe_is_refused(image_folder, tmp_path, capsys):
    from tests.conftest import tiny_args_for

    err = fails([*tiny_args_for("maskfeat_vit_tiny_patch16"), "--data-path", str(image_folder), "--output-dir",
                 str(tmp_path / "o"), "--no-norm-pix-loss"], capsys)  # fmt: skip
    assert "--no-norm-pix-loss does not apply to maskfeat_vit_tiny_patch16: MaskFeat's target is HOG features" in err
    assert not (tmp_path / "o").exists()


def test_image_size_not_divisible_by_patch(image_folder, tmp_path, capsys):
    err = fails([*TINY_ARGS, "--data-path", str(image_folder), "--img-size", "100", "--output-dir",
                 str(tmp_path / "o")], capsys)  # fmt: skip
    assert "not divisible by the patch size 16" in err


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_mask_ratio_outside_open_interval(image_folder, tmp_path, capsys, ratio):
    err = fails([*TINY_ARGS, "--data-path", str(image_folder), "--mask-ratio", ratio, "--output-dir",
                 str(tmp_path / "o")], capsys)  # fmt: skip
    assert "mask_ratio must be a number in the open interval (0, 1)" in err


def test_unknown_model(image_folder, tmp_path, capsys):
    err = fails([*TINY_ARGS, "--data-path", str(image_folder), "--model", "mae_vit_tiny_patch61", "--output-dir",
                 str(tmp_path / "o")], capsys)  # fmt: skip
    assert "unknown model 'mae_vit_tiny_patch61'" in err and "did you mean" in err
    err = fails([*TINY_ARGS, "--data-path", str(image_folder), "--model", "vit_tiny_patch16", "--output-dir",
                 str(tmp_path / "o")], capsys)  # fmt: skip
    assert "not a pretraining recipe" in err and "mae_vit_tiny_patch16" in err


def test_unknown_config_key(image_folder, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 1\nmask_ration: 0.5\n")
    err = fails(["--config", str(cfg), *TINY_ARGS, "--output-dir", str(tmp_path / "o")], capsys)
    assert "unknown config key 'mask_ration'" in err and "mask_ratio" in err and str(cfg) in err


def test_bad_config_value_and_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: many\n")
    assert "config key 'epochs' must be of type int" in fails(["--config", str(cfg)], capsys)
    cfg.write_text("- a list\n")
    assert "must hold a mapping" in fails(["--config", str(cfg)], capsys)
    cfg.write_text("epochs: [1\n")
    assert "is not valid YAML" in fails(["--config", str(cfg)], capsys)
    cfg.write_text("epochs: 3\nblr: 1e-3\nepochs: 5\n")  # YAML keeps the last silently; so did the config
    assert "gives 'epochs' (line 1 and line 3) twice (YAML would keep the last one silently)" in \
        fails(["--config", str(cfg)], capsys)  # fmt: skip
    cfg.write_text("batch-size: 3\nmodel_args:\n  hog_cell: 4\nbatch_size: 5\n")  # (one option, two spellings)
    assert "gives 'batch_size' (line 1 and line 4) twice" in fails(["--config", str(cfg)], capsys)
    from fastmim.config import load_yaml

    cfg.write_text(
        "model_args: &a {hog_cell: 4}\nmodel: maskfeat_vit_tiny_patch16\nepochs: 3\n"
        "x: &b\n  <<: *a\n  gaussian_window: 8\n"
    )  # fmt: skip (YAML's merge key: still read)
    assert load_yaml(cfg)["x"] == {"hog_cell": 4, "gaussian_window": 8}
    cfg.write_text("x:\n  inner: &b {<<: &a {hog_cell: 4}, hog_cell: 8}\ny: {<<: *b}\n")  # (merged elsewhere first)
    assert load_yaml(cfg)["y"] == {"hog_cell": 8}
    cfg.write_text("attn_impl: foo\n")  # checked with the other keys, so the file is named (it was not)
    assert f"attn_impl must be one of auto, sdpa, flash, math, fastmim, got 'foo' (from {cfg})" in \
        fails(["--config", str(cfg)], capsys)  # fmt: skip
    cfg.write_text("compile_mode: fastest\n")  # without --compile too: saved, it failed a later run with it
    assert "compile_mode must be one of auto, default, reduce-overhead" in fails(["--config", str(cfg)], capsys)
    assert "does not exist" in fails(["--config", str(tmp_path / "missing.yaml")], capsys)
    assert "batch_size must be >= 1" in fails(["--batch-size", "0"], capsys)
    assert "amp must be one of" in fails(["--amp", "fp8"], capsys)
    assert "clip_grad must be a finite number > 0" in fails(["--clip-grad", "-1"], capsys)
    assert "blr must be a finite number >= 0" in fails(["--blr", "nan"], capsys)
    assert "lr must be a finite number > 0" in fails(["--lr", "0"], capsys)
    assert "blr must be > 0 (lr = blr x images per step / 256 would be 0)" in fails(["--blr", "0"], capsys)


def test_existing_run_is_refused_and_left_untouched(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"precious weights")
    (out / "config.yaml").write_text("model: x\n")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    err = fails([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out)], capsys)
    assert "already holds a run" in err and "--resume" in err
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == before


def test_resume_without_checkpoint(tmp_path, capsys):
    err = fails(["--resume", "--output-dir", str(tmp_path / "none")], capsys)
    assert "no checkpoint to resume" in err and "--resume if-exists" in err
    assert "needs --output-dir" in fails(["--resume"], capsys)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(b"truncated")
    assert "--resume: checkpoint" in (err := fails(["--resume", "--output-dir", str(bad)], capsys))
    assert "cannot be read" in err and "Traceback" not in err
    assert "--resume was given an empty path" in fails(["--resume="], capsys)


def test_temporary_files_of_a_save_killed_mid_write_are_removed_on_resume(image_folder, tmp_path, capsys):
    """kill -9 (or a launcher's timeout) during a save leaves atomic_write's temporary file, a whole checkpoint's
    size; the next run in that folder removes it and says so, and leaves the checkpoint alone."""
    out = tmp_path / "run"
    assert pretrain.main([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps",
                          "1"]) == 0  # fmt: skip
    (out / ".encoder.safetensors.y.tmp.d").mkdir()  # safetensors' own temporary file, in save_encoder's folder
    stale = [out / ".checkpoint.pt.ab12cd.tmp", out / ".encoder.safetensors.x.tmp",
             out / ".encoder.safetensors.y.tmp.d" / ".tmpAb12Cd"]  # fmt: skip
    for f in stale:
        f.write_bytes(b"\0" * 2**20)
    other = out / ".notes.tmp"  # not one of the run's files: kept
    other.write_text("mine")
    capsys.readouterr()
    assert pretrain.main(["--resume", "--output-dir", str(out), "--max-steps", "2"]) == 0
    assert "removed 3.0 MiB of temporary files an interrupted save left" in capsys.readouterr().out
    assert not any(f.exists() for f in stale) and other.exists() and (out / "checkpoint.pt").exists()
    assert not (out / ".encoder.safetensors.y.tmp.d").exists()


def test_safetensors_writes_its_own_temporary_file_inside_a_folder_named_as_the_run_s(tmp_path, monkeypatch):
    """safetensors' save_file writes a ".tmpXXXXXX" of its own beside its target, then renames it: a kill -9 during
    the encoder's save left that file in the run folder, under a name the start-up clean-up did not know (the
    encoder's size at every such kill). Its target is now inside ".encoder.safetensors.*.tmp.d", removed whole."""
    import torch

    from fastmim.train import checkpoint as ckpt

    folders = []

    def spy(tensors, filename, metadata=None):
        folders.append(Path(filename).parent)
        return real(tensors, filename, metadata=metadata)

    real = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", spy)
    ckpt.save_encoder(tmp_path / "encoder.safetensors", {"w": torch.ones(3)}, {"model": "m"})
    (inner,) = folders
    assert inner.parent == tmp_path and inner.name.startswith(".encoder.safetensors.") and inner.name.endswith(
        ".tmp.d")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.safetensors"]  # nothing left beside it


def test_an_output_path_that_is_or_is_under_a_file_is_named(tmp_path, capsys):
    """--output-dir runs/afile/sub said only "[Errno 20] Not a directory: 'runs/afile/sub'"."""
    afile = tmp_path / "afile"
    afile.write_text("notes")
    err = fails([*TINY_ARGS, "--output-dir", str(afile / "sub" / "run")], capsys)
    assert err.strip() == f"error: output path {str(afile / 'sub' / 'run')!r} is under {str(afile)!r}, a file, not " \
        "a directory", err  # fmt: skip
    err = fails([*TINY_ARGS, "--output-dir", str(afile)], capsys)
    assert f"output path {str(afile)!r} exists and is not a directory" in err and afile.read_text() == "notes"


def test_bad_device_is_named(capsys):
    assert "--device 'foo' is not a device: use auto, cpu, cuda or cuda:N" in fails(["--device", "foo"], capsys)
    assert "fastmim trains on cpu or cuda" in fails(["--device", "meta"], capsys)


def test_min_lr_above_the_peak_is_refused_before_anything_is_written(image_folder, tmp_path, capsys):
    out = tmp_path / "o"
    err = fails([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--min-lr", "1e-3"], capsys)
    assert "--min-lr 0.001 is above the peak learning rate" in err and "--blr" in err
    assert not out.exists()


def test_resume_takes_a_runs_folder_yaml_true_and_names_an_exported_encoder(image_folder, tmp_path, capsys):
    """--resume RUN_DIR (the run's newest checkpoint), ``resume: true`` in a YAML file (the bare --resume), an
    exported encoder named as such; a resume with nothing left to do leaves the run's config.yaml as it was."""
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--epochs", "1"]
    assert pretrain.main([*args, "--max-steps", "2"]) == 0
    assert pretrain.main(["--resume", str(out), "--max-steps", "3"]) == 0
    assert "resuming at step 2" in capsys.readouterr().out
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"resume: true\noutput_dir: {out}\n")
    assert pretrain.main(["--config", str(cfg), "--max-steps", "4"]) == 0
    assert "resuming at step 3" in capsys.readouterr().out
    err = fails(["--resume", str(out / "encoder.safetensors")], capsys)
    assert "is an exported encoder, not a training checkpoint" in err
    assert "no checkpoint in that folder" in fails(["--resume", str(tmp_path)], capsys)
    saved = (out / "config.yaml").read_text()
    assert pretrain.main(["--resume", str(out), "--max-steps", "4", "--log-interval", "7"]) == 0
    assert "nothing to do" in capsys.readouterr().out and (out / "config.yaml").read_text() == saved


def test_resume_if_exists_starts_then_continues_with_one_command(image_folder, tmp_path, capsys):
    """A job script's one command: the first start (no run yet) trains from scratch; the same command again
    continues from the checkpoint (a requeue), here to a later epoch."""
    import json

    out = tmp_path / "job"
    cmd = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--resume", "if-exists",
           "--vis-interval", "100", "--log-interval", "1"]  # fmt: skip
    assert pretrain.main([*cmd, "--epochs", "1"]) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    assert pretrain.main([*cmd, "--epochs", "2"]) == 0
    assert "resuming at step 6 (the end of epoch 1)" in capsys.readouterr().out  # (not "epoch 2, after 0 of ...")
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, 13))
    assert "needs --output-dir" in fails(["--resume", "if-exists"], capsys)
    with pytest.MonkeyPatch.context() as mp:  # under torchrun the start is said once, by rank 0
        mp.setenv("RANK", "1")
        pretrain.resolve_config([*TINY_ARGS, "--output-dir", str(tmp_path / "other"), "--resume", "if-exists"])
    assert "no checkpoint in" not in capsys.readouterr().out


def test_unreadable_image_is_named(tmp_path, capsys):
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "d", n=8)
    broken = data / "class0" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(RuntimeError, match="cannot read image .*broken.jpg"):
        pretrain.run([*TINY_ARGS, "--data-path", str(data), "--output-dir", str(tmp_path / "o"), "--epochs", "1"])


@pytest.mark.slow
@pytest.mark.parametrize("loader, workers", [("torch", 0), ("torch", 2), ("torch-gpu", 2)])
def test_torch_loader_bad_file_checkpoints_then_resumes_to_the_clean_run(tmp_path, capsys, loader, workers):
    """A file the torch loader cannot decode in the third batch: the run stops with one line naming it after a
    checkpoint of the two completed steps; with the file replaced, --resume ends where a run that never met it ends
    (loader workers or not: the worker's traceback is not what the user reads)."""
    import torch

    from fastmim.data.folder import ImageFolderDataset
    from fastmim.data.sampler import ResumableDistributedSampler
    from fastmim.train.checkpoint import load_checkpoint
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "d", n=24)
    sampler = ResumableDistributedSampler(24, seed=0)
    sampler.set_epoch(0)
    victim = ImageFolderDataset(data).files[list(sampler)[8]]  # the first sample of the third batch of 4
    good = open(victim, "rb").read()
    args = [*TINY_ARGS, "--data-path", str(data), "--epochs", "1", "--num-workers", str(workers), "--loader", loader,
            "--vis-interval", "100"]  # fmt: skip
    clean, cut = tmp_path / "clean", tmp_path / "cut"
    pretrain.run([*args, "--output-dir", str(clean)])
    with open(victim, "wb") as f:
        f.write(b"\xff\xd8 truncated")
    assert pretrain.main([*args, "--output-dir", str(cut)]) == 2
    out = capsys.readouterr()
    err = out.err[out.err.index("error: ") :].splitlines()[0]  # one line, after the progress bar's refreshes
    assert err.startswith(f"error: cannot read image {victim!r}") and "--resume: the run is checkpointed" in err
    assert "Traceback" not in out.err and "checkpointed at step 2 before stopping" in out.out
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == 2
    with open(victim, "wb") as f:
        f.write(good)
    pretrain.run(["--resume", "--output-dir", str(cut)])
    a, b = load_checkpoint(clean / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.slow
def test_bad_file_under_ddp_stops_every_rank_at_a_checkpoint(tmp_path):
    """torchrun, 2 CPU processes: rank 1's third batch holds a file that cannot be decoded. Every rank stops at that
    batch (none waits in the all-reduce for a rank that died), the two completed steps are checkpointed, the ranks
    name the file in one line (torchrun may end the second before it prints), and with the file replaced --resume
    ends where a clean run ends."""

    from fastmim.data.folder import ImageFolderDataset
    from fastmim.data.sampler import ResumableDistributedSampler
    from fastmim.train.checkpoint import load_checkpoint
    from tests.conftest import make_image_folder, torchrun_clean_then_bad, torchrun_resume_equals

    data = make_image_folder(tmp_path / "d", n=24)
    sampler = ResumableDistributedSampler(24, num_replicas=2, rank=1, seed=0)
    sampler.set_epoch(0)
    victim = ImageFolderDataset(data).files[list(sampler)[4]]  # rank 1's first sample of its third batch of 2
    good = open(victim, "rb").read()
    args = [*TINY_ARGS, "--data-path", str(data), "--epochs", "1", "--batch-size", "2", "--num-workers", "1",
            "--loader", "torch", "--vis-interval", "100"]  # fmt: skip
    r, clean, cut = torchrun_clean_then_bad(args, tmp_path, Path(victim), b"\xff\xd8 truncated")
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    # (torchrun ends the other rank once the first has exited: one or two such lines)
    assert errors and all(ln.startswith(f"error: cannot read image {str(victim)!r}") for ln in errors)
    assert all("--resume: the run is checkpointed" in ln for ln in errors), errors
    assert "rank 1 could not load its batch" in r.stdout and "checkpointed at step 2 before stopping" in r.stdout
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == 2
    torchrun_resume_equals(clean, cut, Path(victim), good, 6)


def test_a_run_that_died_before_its_first_checkpoint_restarts_in_place(image_folder, tmp_path, capsys):
    """Its config.yaml and metrics.jsonl move aside (kept, not deleted); a directory with a checkpoint still refuses."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: old\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "training.png").write_bytes(b"old plot")  # what it wrote before dying goes with it
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps", "1"]
    pretrain.run(args)
    (aside,) = out.glob("unfinished-*")
    assert (aside / "config.yaml").read_text() == "model: old\n" and (aside / "metrics.jsonl").exists()
    assert (aside / "training.png").read_bytes() == b"old plot"
    assert (out / "checkpoint.pt").exists() and "moved to unfinished-" in capsys.readouterr().out
    err = fails(args, capsys)
    assert "already holds a run" in err and "Nothing was overwritten" in err
    import shutil

    other = shutil.copytree(out, tmp_path / "other")  # a resume of one run into another run's folder
    err = fails([*args, "--resume", str(out / "checkpoint.pt"), "--output-dir", str(other)], capsys)
    assert "already holds a run" in err and "the resume of" in err and "pass --resume" not in err, err


def test_a_trained_run_whose_checkpoint_is_gone_is_neither_started_over_nor_resumed(image_folder, tmp_path, capsys):
    """A finished run with its checkpoint.pt deleted (to save space), or a sharded checkpoint copied without its
    meta.pt: its encoder.safetensors shows it trained, so a new run there, --resume and --resume if-exists are all
    refused, naming what is missing; nothing in the folder changes (it was moved aside and the encoder overwritten)."""
    import shutil

    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps", "2"]
    pretrain.run(args)
    (out / "checkpoint.pt").unlink()
    (out / "checkpoint.dcp").mkdir()  # a sharded save's shards without its meta.pt (an rsync cut short)
    (out / "checkpoint.dcp" / "__0_0.distcp").write_bytes(b"shard")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for extra in ([], ["--resume"], ["--resume", "if-exists"]):
        err = fails([*args, *extra], capsys)
        assert "holds a trained run's encoder.safetensors (step 2) but no checkpoint to resume: checkpoint.dcp/ has " \
            "no meta.pt" in err and "Nothing was changed" in err, err  # fmt: skip
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    shutil.rmtree(out / "checkpoint.dcp")
    assert "neither checkpoint.pt nor checkpoint.dcp/ is there (deleted, or not copied?)" in fails(args, capsys)
    assert not list(out.glob("unfinished-*"))


@pytest.mark.slow
def test_max_steps_stops_before_loading_what_it_will_not_use(tmp_path, capsys, monkeypatch):
    """--max-steps 2 on an epoch of 3 batches: the loader (2 workers, which read ahead) never loads the third batch,
    which holds an unreadable file; the reconstructions skip it too; the run ends with its checkpoint."""
    from fastmim.data.folder import ImageFolderDataset
    from fastmim.data.sampler import ResumableDistributedSampler
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "d", n=12)
    sampler = ResumableDistributedSampler(12, seed=0)
    sampler.set_epoch(0)
    order = list(sampler)
    files = ImageFolderDataset(data).files
    with open(files[order[8]], "wb") as f:
        f.write(b"not an image")
    log = tmp_path / "loaded.txt"
    real = ImageFolderDataset.__getitem__

    def logged(self, index):  # runs in the loader workers: a file records what they load
        with open(log, "a") as f:
            f.write(f"{index}\n")
        return real(self, index)

    monkeypatch.setattr(ImageFolderDataset, "__getitem__", logged)
    out = tmp_path / "o"
    args = [*TINY_ARGS, "--data-path", str(data), "--output-dir", str(out), "--max-steps", "2", "--num-workers", "2",
            "--loader", "torch"]  # fmt: skip
    pretrain.run(args)
    loaded = {int(x) for x in log.read_text().split()}
    assert loaded == set(order[:8])  # the two batches trained on, nothing of the third
    assert (out / "checkpoint.pt").exists() and "reconstructions: one picture left out" in capsys.readouterr().out


@pytest.mark.slow
def test_skip_bad_files_replaces_them_by_a_fixed_choice_and_counts_them(tmp_path, capfd):
    """--skip-bad-files: two unreadable files of 12 are replaced, every epoch, by the same stand-ins (2 loader
    workers or none: the same weights), counted as skipped_files in metrics.jsonl; DALI is refused, not chosen."""
    import json

    import torch

    from fastmim.data import WithIndex, decode_indices, replacement_index
    from fastmim.data.folder import ImageFolderDataset
    from fastmim.train.checkpoint import load_checkpoint
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "d", n=12)
    files = ImageFolderDataset(data).files
    for i in (3, 7):
        with open(files[i], "wb") as f:
            f.write(b"not an image")
    ds = WithIndex(ImageFolderDataset(data), skip_bad=True)
    capfd.readouterr()
    img, sent = ds[3]
    stand_in = replacement_index(3, 1, 12)
    assert sent == -1 - stand_in and stand_in not in (3, 7) and img.size == (72, 80)
    said = capfd.readouterr().err  # the file is named where it is skipped (a log: no blank line before it)
    assert said.startswith(f"skipped: cannot read image {files[3]!r}") and f"sample {stand_in} stands in" in said
    # the stand-ins spread over the whole data set whatever its size (a stride sharing a factor with 69 had reached
    # one sample): two unreadable files of 69 stop nothing
    for n in (9, 69, 1761, 40503):
        assert len({replacement_index(5, k, n) for k in range(1, 65)}) > min(n - 2, 40), n
    idx, n = decode_indices(torch.tensor([0, sent, 5]))
    assert idx.tolist() == [0, stand_in, 5] and n == 1
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        pretrain.run([*TINY_ARGS, "--data-path", str(data), "--output-dir", str(out), "--epochs", "2",
                      "--num-workers", str(workers), "--skip-bad-files", "--log-interval", "1"])  # fmt: skip
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["skipped_files"] == 4  # 2 files x 2 epochs
        err = capfd.readouterr().err  # (from the loader workers too)
        assert [err.count(f"skipped: cannot read image {files[i]!r}") for i in (3, 7)] == [1, 1], (workers, err)
        runs[workers] = load_checkpoint(out / "checkpoint.pt")["model"]
    for k, v in runs[0].items():
        torch.testing.assert_close(runs[2][k], v, rtol=0, atol=0, msg=k)
    cut = tmp_path / "cut"  # stopped mid-run and resumed: the count goes on from the checkpoint's
    pretrain.run([*TINY_ARGS, "--data-path", str(data), "--output-dir", str(cut), "--epochs", "2", "--num-workers", "0",
                  "--skip-bad-files", "--log-interval", "1", "--max-steps", "4"])  # fmt: skip
    pretrain.run(["--resume", "--output-dir", str(cut), "--max-steps", "None"])
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_files"] == 4 and load_checkpoint(cut / "checkpoint.pt")["skipped_files"] == 4
    err = fails([*TINY_ARGS, "--data-path", str(data), "--output-dir", str(tmp_path / "x"), "--skip-bad-files",
                 "--loader", "dali"], capfd)  # fmt: skip
    assert "--skip-bad-files needs --loader torch" in err


def test_crc_check_refuses_changed_records_and_takes_files_written_without_crcs(tmp_path, monkeypatch):
    """check_crc reads each record of a torch.save file against its CRC-32; a file saved without CRCs (torch's
    compute_crc32=False writes 0) is not refused, and FASTMIM_VERIFY_CHECKPOINT=0 turns the check off."""
    import torch
    from torch.utils.serialization import config

    from fastmim.train.checkpoint import CorruptCheckpoint, check_crc

    path = tmp_path / "a.pt"
    torch.save({"w": torch.arange(100_000, dtype=torch.float32)}, path)
    check_crc(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of the tensor's record
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="does not match the CRC-32 written with it"):
        check_crc(path)
    monkeypatch.setenv("FASTMIM_VERIFY_CHECKPOINT", "0")
    check_crc(path)
    monkeypatch.delenv("FASTMIM_VERIFY_CHECKPOINT")
    plain = tmp_path / "b.pt"
    before = config.save.compute_crc32  # (not monkeypatch: torch's config object refuses its undo)
    config.save.compute_crc32 = False
    try:
        torch.save({"w": torch.ones(10)}, plain)
    finally:
        config.save.compute_crc32 = before
    check_crc(plain)  # no CRCs recorded: nothing to compare
    assert torch.load(plain)["w"].sum() == 10


def test_a_folder_another_process_writes_in_is_refused_naming_it(image_folder, tmp_path, capsys):
    """Two runs in one folder (two starts, or a requeued job while the old one still drains) wrote over each other's
    checkpoint and metrics; the second is refused while the first holds the folder's lock, which goes with it."""
    from fastmim.train.runlock import LOCK_NAME, RunLock

    out = tmp_path / "run"
    out.mkdir()
    held = RunLock(out, "run mae_vit_tiny_patch16")  # (another open file: flock refuses it as another process)
    assert held.acquire() is None
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps", "1"]
    for argv in (args, [*args, "--resume", "if-exists"]):
        err = fails(argv, capsys)
        assert f"{out} is in use: run mae_vit_tiny_patch16 (pid {os.getpid()} on" in err and "another folder" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    held.release()
    assert not out.exists() or not any(out.iterdir())  # (the lock's file goes with it)
    assert pretrain.main(args) == 0
    assert not (out / LOCK_NAME).exists() and (out / "checkpoint.pt").exists()


def test_a_recipe_files_accumulation_that_a_small_data_set_cannot_fill_is_named_with_the_file(
    image_folder, tmp_path, capsys
):
    """configs/mae_vit_base_in1k.yaml sets accum_iter 8: on a small folder "fewer than --accum-iter 8" did not say
    that the user's --config set it."""
    cfg = ROOT / "configs" / "mae_vit_base_in1k.yaml"
    err = fails(["--config", str(cfg), *TINY_ARGS, "--data-path", str(image_folder), "--output-dir",
                 str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "8"], capsys)  # fmt: skip
    assert "fewer than --accum-iter 8" in err and f"accum_iter set in {cfg}" in err


def test_a_full_disk_or_a_read_only_folder_is_one_line(image_folder, tmp_path, capsys, monkeypatch):
    """A save that runs out of space (torch.save says only "unexpected pos"; safetensors "os error 28") names the file
    and what was kept, exit 2; a folder that cannot be written is one line too, not a traceback."""
    import errno
    import shutil

    import torch

    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps", "1"]
    real_save = torch.save

    def full(obj, f, *a, **k):
        if isinstance(obj, dict) and "step" in obj:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 14939968 vs 14939856")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    err = fails(args, capsys)
    assert f"no space left to write {out / 'checkpoint.pt'}" in err and "Traceback" not in err
    assert "free on its device; the write said: [enforce fail at inline_container.cc:672] . unexpected pos" in err
    assert "); no earlier checkpoint.pt was there: free space, then run again" in err  # (a fresh run's first save)
    assert not list(out.glob(".checkpoint.pt.*"))  # the partial file is gone
    # the same words from a file system that fails otherwise (EFBIG from a file size limit, EIO, a share gone) with
    # space to spare: one line naming the file, not torch.save's traceback
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**9, 10**12 - 10**9))
    err = fails([*args[:-4], "--output-dir", str(tmp_path / "big")], capsys)
    assert err.strip().splitlines()[-1] == f"error: cannot write {tmp_path / 'big' / 'checkpoint.pt'} ([enforce " \
        "fail at inline_container.cc:672] . unexpected pos 14939968 vs 14939856); no earlier checkpoint.pt was " \
        "there: fix the file system's problem, then run again", err  # fmt: skip
    assert "Traceback" not in err
    monkeypatch.undo()
    real_write = Path.write_text

    def no_space(self, *a, **k):
        if ".config.yaml" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", no_space)  # a new run whose first write, config.yaml, finds the disk full
    fresh = tmp_path / "new" / "run"
    err = fails([*args[:-4], "--output-dir", str(fresh)], capsys)
    assert "config.yaml" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()  # the folders made for it are not left behind empty
    monkeypatch.undo()

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    err = fails([*args[:-4], "--output-dir", str(tmp_path / "ro" / "run")], capsys)
    assert err.strip() == f"error: Read-only file system: {tmp_path / 'ro' / 'run'}"


def test_usage_errors_are_said_once_per_node_under_torchrun(monkeypatch, capsys):
    """Every rank parses the same command: local rank 0 says what is wrong with it, the other ranks exit with the
    same status silently (8 copies of one error, before). (A node's own problem, its data path, is said by its local
    rank 0.)"""
    from fastmim.eval.__main__ import main as eval_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(SystemExit) as stop:
            pretrain.main(["--no-such-flag"])
        assert stop.value.code == 2 and ("unrecognized arguments: --no-such-flag" in capsys.readouterr().err) == said
        assert ("--resume was given an empty path" in fails(["--resume="], capsys)) == said
        with pytest.raises(SystemExit):
            eval_main(["knn", "--no-such-flag"])
        assert ("unrecognized arguments" in capsys.readouterr().err) == said
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")  # (a single process whose environment says local rank 1: it says them)
    assert "--resume was given an empty path" in fails(["--resume="], capsys)


def test_a_killed_runs_lock_goes_with_it_though_its_loader_workers_linger(tmp_path):
    """kill -9 of the trainer: its forked loader workers live on for seconds (until PyTorch's watchdog ends them); a
    flock belongs to the open file a fork shares, so they kept the folder locked and a prompt requeue was refused.
    Forked children close their copy at once."""
    import subprocess
    import sys

    from fastmim.train.runlock import RunLock
    from tests.conftest import ROOT

    script = (
        "import os, sys, time\n"
        "from fastmim.train.runlock import RunLock\n"
        "assert RunLock(sys.argv[1]).acquire() is None\n"
        "if os.fork() == 0:\n"
        "    null = os.open(os.devnull, os.O_WRONLY)\n"
        "    os.dup2(null, 1), os.dup2(null, 2)\n"  # (the test's pipes are not held open)
        "    time.sleep(10)\n"  # a loader worker outliving the trainer
        "    os._exit(0)\n"
        "print('locked', flush=True)\n"
        "os._exit(0)\n"  # the trainer dies without releasing (kill -9)
    )
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert r.stdout.strip() == "locked", r.stderr
    lock = RunLock(tmp_path)
    assert lock.acquire() is None  # while the child still sleeps
    lock.release()


def test_the_folder_lock_is_let_go_whatever_stops_the_start(image_folder, tmp_path, capsys, monkeypatch):
    """A Ctrl-C while the folder is checked (or a failed move of an unfinished run aside) left the lock held: the
    next run in this process was refused by its own lock. Without locks (a network file system), a refused start
    does not delete the temporary file of the run that is writing there."""
    import errno
    import fcntl

    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps", "1"]
    real = pretrain.existing_run_markers

    def interrupted(folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "existing_run_markers", interrupted)
    assert pretrain.main(args) == 130
    monkeypatch.setattr(pretrain, "existing_run_markers", real)
    assert not out.exists()  # (made for the run, removed)
    assert pretrain.main(args) == 0
    live = out / ".checkpoint.pt.x1.tmp"  # a save under way in the run that holds the folder
    live.write_bytes(b"\0" * 1024)

    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    err = fails(args, capsys)
    assert "already holds a run" in err and live.exists()


TORCH_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.20 GiB "
    "is free. Of the allocated memory 70.00 GiB is allocated by PyTorch, and 6.00 GiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:"
    "True to avoid fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/"
    "cuda.html#environment-variables)"
)


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_out_of_memory_says_what_would_fit_and_keeps_the_checkpoint(image_folder, tmp_path, capsys, monkeypatch, kind):
    """Running out of memory (CUDA's OutOfMemoryError, or the CPU allocator's) printed a traceback through the
    autograd engine; now one error with the settings and the flags that fit (the same images per step), exit 1, the
    last checkpoint intact, and the bar closed before the message."""
    import torch

    from fastmim.train import step as step_module

    real, calls = step_module.TrainStep.__call__, []

    def runs_out_at_the_fifth(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            if kind == "cuda":
                raise torch.cuda.OutOfMemoryError(TORCH_OOM)  # (torch's message: one line)
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(step_module.TrainStep, "__call__", runs_out_at_the_fifth)
    out = tmp_path / "run"
    argv = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--save-interval", "3"]
    assert pretrain.main(argv) == 1
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "error:" in line]
    assert len(said) == 1 and said[0].startswith("error: out of memory on cpu: "), err
    if kind == "cuda":  # what ran out, without torch's advice and link (its hint is among the fixes)
        assert said[0].endswith("reserved by PyTorch but unallocated.") and "Tried to allocate 2.00 GiB." in said[0]
    else:
        assert "can't allocate memory" in said[0]
    assert "If reserved" not in err and "documentation" not in err and "Traceback" not in err
    assert "--batch-size 4 per process, --accum-iter 1, amp off, activation checkpointing off" in err
    assert "to fit: --batch-size 2 --accum-iter 2 (the same images per optimizer step" in err and "--grad-ckpt" in err
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3
    if kind == "cuda":  # torch's advice against fragmentation is kept
        assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the environment" in err
    # run() raises it as an OutOfMemoryError still (a caller's batch-size back-off catches it); torch's hint is left
    # out where it is set already
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(torch.cuda.OutOfMemoryError, match="to fit: --batch-size 2 --accum-iter 2") as caught:
        calls.clear()
        pretrain.run([*argv[:-2], "--output-dir", str(tmp_path / "again")])
    assert "PYTORCH_CUDA_ALLOC_CONF" not in str(caught.value)


def test_errors_under_torchrun_say_their_rank_on_every_line_and_a_shared_one_once(monkeypatch, capsys):
    """Each rank's out-of-memory advice is its own: every line of it prefixed 'rank N: ' (only the first was, and
    the ranks' blocks interleaved); a non-finite loss or a collapsed fp16 scale, which every rank finds alike, is said
    once, by rank 0 (it was said N times, unprefixed)."""
    monkeypatch.setenv("RANK", "1")

    def raises(error):
        def run(argv):
            raise error

        return run

    monkeypatch.setattr(
        pretrain, "run", raises(pretrain.OutOfMemory("out of memory on cuda:1: x\nsettings: s\nto fit: f"))
    )
    assert pretrain.main([]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["rank 1: error: out of memory on cuda:1: x", "rank 1: settings: s", "rank 1: to fit: f"]
    shared = FloatingPointError("the loss became nan by step 5")
    shared.same_on_every_rank = True  # (what the trainer marks: the all-reduced loss, a collapsed fp16 scale)
    monkeypatch.setattr(pretrain, "run", raises(shared))
    assert pretrain.main([]) == 2 and capsys.readouterr().err == ""
    monkeypatch.setattr(pretrain, "run", raises(FloatingPointError("the weights became non-finite")))  # this rank's
    assert pretrain.main([]) == 2 and capsys.readouterr().err == "rank 1: error: the weights became non-finite\n"
    monkeypatch.setattr(pretrain, "run", raises(shared))
    monkeypatch.setenv("RANK", "0")
    assert pretrain.main([]) == 2 and capsys.readouterr().err == "error: the loss became nan by step 5\n"


def test_a_shard_pattern_the_shell_expanded_is_refused_with_a_quoting_hint(tmp_path, capsys):
    """Unquoted, --data-path=DIR/s-{0..2}.tar is three flags (argparse kept the last: one shard of three, silently)
    and --data-path DIR/s-*.tar one flag and loose paths."""
    out = ["--output-dir", str(tmp_path / "o")]
    shards = [f"--data-path={tmp_path}/s-{i}.tar" for i in range(3)]
    with pytest.raises(SystemExit):
        pretrain.main([*TINY_ARGS, *shards, *out])
    err = capsys.readouterr().err
    assert f"--data-path given twice ('{tmp_path}/s-0.tar', then '{tmp_path}/s-1.tar')" in err and "in quotes" in err
    with pytest.raises(SystemExit):
        pretrain.main([*TINY_ARGS, "--data-path", f"{tmp_path}/s-0.tar", f"{tmp_path}/s-1.tar", *out])
    assert "error: 1 more .tar paths after the data path: the shell expanded a pattern" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a typo'd flag is argparse's own error, naming it
        pretrain.main([*TINY_ARGS, "--data-pth", f"{tmp_path}/s-0.tar", *out])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --data-pth" in err and "shell expanded" not in err


class _RunsNumpyCode:  # the same through a numpy function (numpy.testing's runstring execs a string)
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from numpy.testing._private.utils import runstring

        return (runstring, (f"open({self.marker!r}, 'w').close()", {}))


class _RunsCode:  # what a downloaded .pth can carry: unpickling it calls os.system
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_resume_runs_no_code_from_the_file_and_reads_an_older_numpy_rng_state(tmp_path, capsys):
    """--resume unpickled any file (weights_only=False): a .pth carrying an object ran its code before the "does not
    fit" error. Now only tensors, plain values and numpy arrays (an older fastmim's numpy RNG state) are read."""
    import numpy as np
    import torch

    from fastmim.train.checkpoint import ForeignCheckpointError, load_checkpoint, safe_load

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": _RunsCode(str(marker))}, evil)
    with pytest.raises(ForeignCheckpointError, match=r"holds Python objects fastmim does not load \(posix.system"):
        load_checkpoint(evil)
    assert not marker.exists()
    assert pretrain.main(["--resume", str(evil), "--data-path", "builtin:samples", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "not a fastmim checkpoint" in err and "--init-weights" in err and not marker.exists()
    numpy_code = tmp_path / "numpy_code.pth"  # a numpy function that runs code: not let through for being numpy's
    torch.save({"model": {}, "x": _RunsNumpyCode(str(marker))}, numpy_code)
    with pytest.raises(ForeignCheckpointError, match=r"numpy\.testing\._private\.utils\.runstring"):
        safe_load(numpy_code)
    assert not marker.exists()
    old = tmp_path / "old.pt"  # an older checkpoint's RNG states: numpy's is a tuple holding an ndarray
    torch.save({"step": 3, "rng": {"numpy": np.random.get_state()}, "model": {"w": torch.ones(2)}}, old)
    state = safe_load(old)
    assert state["step"] == 3 and np.array_equal(state["rng"]["numpy"][1], np.random.get_state()[1])
    # written under numpy 1, whose arrays pickle as numpy.core.multiarray (numpy 2: numpy._core): read as well
    numpy1 = tmp_path / "numpy1.pt"
    with zipfile.ZipFile(old) as zin, zipfile.ZipFile(numpy1, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item, data)
    assert "numpy.core.multiarray._reconstruct" in torch.serialization.get_unsafe_globals_in_checkpoint(str(numpy1))
    assert safe_load(numpy1)["step"] == 3
