"""The DALI loader on CPU (device_id=None): shapes and values, seeding, checkpoint restore, sharding, decode errors."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmim.data.dali import DaliDecodeError, dali_problem
from fastmim.data.folder import list_images
from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import ROOT, make_image_folder

pytestmark = pytest.mark.skipif(dali_problem() is not None, reason=f"optional dependency absent: {dali_problem()}")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return list_images(make_image_folder(tmp_path_factory.mktemp("dali"), n=24, size=(90, 70)))


def loader(files, batch=4, **kw):
    from fastmim.data.dali import DaliLoader

    return DaliLoader(files, batch, kw.pop("img_size", 32), num_threads=2, **kw)


def epoch_batches(ld):
    return [(x.clone(), i.clone()) for x, i in ld]


def test_shapes_dtypes_and_value_range(files):
    ld = loader(files, batch=5)
    assert len(ld) == 24 // 5
    batches = epoch_batches(ld)
    assert len(batches) == 4
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    for x, idx in batches:
        assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert idx.shape == (5,) and idx.dtype == torch.int64
        assert lo - 1e-4 <= float(x.min()) and float(x.max()) <= hi + 1e-4
        assert float(x.std()) > 0.05  # real pixels, not a constant
    seen = torch.cat([i for _, i in batches]).tolist()
    assert len(set(seen)) == 20 and all(0 <= i < 24 for i in seen)
    # index i is files[i]: the pixels match that file's (cropped, flipped) colours in the mean
    assert ld.files is not files and ld.files == files


def test_the_same_seed_gives_the_same_batches_and_another_seed_others(files):
    a, b, c = (epoch_batches(loader(files, seed=s)) for s in (3, 3, 4))
    assert all(torch.equal(x, y) and torch.equal(i, j) for (x, i), (y, j) in zip(a, b, strict=True))
    assert not all(torch.equal(i, j) for (_, i), (_, j) in zip(a, c, strict=True))


def test_restoring_a_checkpoint_gives_the_next_batches_mid_epoch_and_across_epochs(files):
    ld = loader(files, seed=1)
    it = iter(ld)
    next(it), next(it)
    state = ld.state_dict()
    assert (state["epoch"], state["batch"]) == (0, 2)
    rest = [(x.clone(), i.clone()) for x, i in it]  # batches 2..5 of epoch 0
    ld.set_epoch(1)
    following = epoch_batches(ld)[:2]  # epoch 1 starts
    again = loader(files, seed=1)
    again.load_state_dict(state)
    again.set_epoch(0, 2 * 4)  # what the trainer asks on resume: a no-op at the restored position
    got = epoch_batches(again)
    assert len(got) == len(rest) == 4
    assert all(torch.equal(x, y) and torch.equal(i, j) for (x, i), (y, j) in zip(got, rest, strict=True))
    again.set_epoch(1)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(epoch_batches(again)[:2], following, strict=True))
    # a checkpoint at an epoch's end stands there (nothing is read while saving); the next epoch follows from it
    end = loader(files, seed=1)
    epoch_batches(end)
    s_end = end.state_dict()
    assert (s_end["epoch"], s_end["batch"]) == (0, 6)
    fresh = loader(files, seed=1)
    fresh.load_state_dict(s_end)
    fresh.set_epoch(0, 6 * 4)  # the trainer at the epoch's end: a no-op
    assert epoch_batches(fresh) == []
    fresh.set_epoch(1)
    assert torch.equal(epoch_batches(fresh)[0][0], following[0][0])


def test_epochs_differ_and_the_loader_only_moves_forward(files):
    ld = loader(files, seed=2)
    e0 = torch.cat([i for _, i in epoch_batches(ld)])
    ld.set_epoch(1)
    e1 = torch.cat([i for _, i in epoch_batches(ld)])
    assert sorted(e0.tolist()) == sorted(e1.tolist()) and not torch.equal(e0, e1)  # one shard, reshuffled
    with pytest.raises(ValueError, match="cannot be moved to epoch 0, batch 1"):
        ld.set_epoch(0, 4)
    with pytest.raises(ValueError, match="not a multiple of the batch size"):
        ld.set_epoch(2, 3)
    ld.set_epoch(3)  # skipping ahead reads epoch 2 and drops it
    assert (ld.epoch, ld.batch) == (3, 0)


def test_shards_split_the_dataset_without_overlap_or_loss(files):
    seen = []
    for rank in range(3):
        ld = loader(files, rank=rank, world_size=3, seed=5)
        assert len(ld) == 2  # 24 / 3 = 8 per rank, batches of 4
        seen.append(set(torch.cat([i for _, i in epoch_batches(ld)]).tolist()))
    assert all(not (seen[a] & seen[b]) for a in range(3) for b in range(a + 1, 3))
    assert set().union(*seen) == set(range(24))
    # 25 images over 3 ranks: equal shards of 8, one image left out per epoch (DALI's sharding, drop-last)
    assert loader(files + files[:1], rank=2, world_size=3).shard_size == 8


def test_a_bad_file_stops_the_loader_with_its_path_and_the_checkpoint_resumes_after_a_fix(files, tmp_path):
    bad_dir = tmp_path / "bad"
    shutil.copytree(str(files[0].rsplit("/", 2)[0]), bad_dir)
    paths = list_images(bad_dir)
    victim = paths[7]
    good_copy = tmp_path / "good.jpg"
    shutil.copy(victim, good_copy)
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 3])  # truncated JPEG
    ld = loader(paths, seed=0)
    with pytest.raises(DaliDecodeError, match="cannot decode") as err:
        epoch_batches(ld)
    assert err.value.path == victim and victim in str(err.value)
    state = ld.state_dict()  # the state after the last good batch
    shutil.copy(good_copy, victim)  # the file fixed in place
    resumed = loader(paths, seed=0)
    resumed.load_state_dict(state)
    rest = epoch_batches(resumed)
    assert state["batch"] + len(rest) == len(ld) and 7 in torch.cat([i for _, i in rest]).tolist()
    resumed.close()
    open(victim, "wb").close()  # an empty file: DALI's reader cannot memory-map it (before any decoder)
    with pytest.raises(DaliDecodeError, match="cannot decode") as err:
        epoch_batches(loader(paths, seed=0))
    assert err.value.path.strip() == victim


def test_exif_orientation_is_ignored_as_the_torch_loaders_do(tmp_path):
    """A JPEG whose EXIF says "rotate 90 degrees": DALI reads the stored pixels, as PIL (the torch loaders) and nvJPEG
    do, so --loader auto gives the same images whether DALI is installed or not. The red channel grows down the
    stored rows: every crop (no flips up or down) keeps its bottom half redder than its top half; rotated, the
    gradient would run across."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "exif"
    root.mkdir()
    rows = np.linspace(0, 255, 40).astype(np.uint8)
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[..., 0] = rows[:, None]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    for i in range(8):
        Image.fromarray(arr).save(root / f"{i}.jpg", quality=95, exif=exif.tobytes())
    x, _ = epoch_batches(loader(list_images(root), batch=8, hflip=0.0))[0]
    red = x[:, 0]  # normalised, per sample [32, 32]
    gap = red[:, 16:].mean((1, 2)) - red[:, :16].mean((1, 2))
    assert (gap > 0.5).all(), gap


def test_bad_arguments_name_the_problem(files):
    with pytest.raises(ValueError, match="DALI device must be one of"):
        loader(files, device="gpu")
    with pytest.raises(ValueError, match="interp must be one of"):
        loader(files, interp="nearest")
    assert loader(files).interp == "linear" and loader(files, interp="cubic").interp == "cubic"  # auto on CPU
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="decodes on a GPU and none is visible"):
            loader(files, device="mixed")
    with pytest.raises(ValueError, match="fewer than one batch of 32"):
        loader(files, batch=32)
    with pytest.raises(ValueError, match="rank 3 is outside"):
        loader(files, rank=3, world_size=2)
    ld = loader(files)
    with pytest.raises(ValueError, match="saved for 24 images over 1 ranks; this run has 23 over 1"):
        loader(files[:-1]).load_state_dict(ld.state_dict())


# --- the pretraining CLI with --loader dali ---


@pytest.mark.slow
def test_pretrain_with_dali_resumes_mid_epoch_to_the_uninterrupted_model(image_folder, tmp_path):
    from fastmim import pretrain
    from fastmim.train.checkpoint import load_checkpoint
    from tests.conftest import TINY_ARGS

    common = [*TINY_ARGS, "--data-path", str(image_folder), "--loader", "dali", "--allow-unscanned", "--epochs", "2",
              "--log-interval", "1"]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain.run([*common, "--output-dir", str(straight), "--max-steps", "8"])
    pretrain.run([*common, "--output-dir", str(split), "--max-steps", "3"])
    first = load_checkpoint(split / "checkpoint.pt")
    assert (first["epoch"], first["batch"], first["step"]) == (0, 3, 3)
    assert first["loader"][0]["batch"] == 3 and first["loader"][0]["dali"]
    pretrain.run(["--resume", "--output-dir", str(split), "--max-steps", "8"])
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert (b["epoch"], b["batch"], b["step"]) == (1, 2, 8)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    # the file list is shuffled with the seed: another seed inside the epoch would read other files than the rest
    with pytest.raises(ValueError, match="DALI's file list is shuffled with the seed: --seed 0 finishes the epoch, "
                                         "--max-steps 12 stops at its end, then change it"):  # fmt: skip
        pretrain.run(["--resume", "--output-dir", str(split), "--max-steps", "10", "--seed", "5"])


def test_pretrain_refuses_an_unscanned_folder_for_dali_and_auto_falls_back(image_folder, tmp_path, capsys):
    from fastmim import pretrain
    from tests.conftest import TINY_ARGS

    args = [*TINY_ARGS, "--data-path", str(image_folder), "--max-steps", "1", "--output-dir"]
    with pytest.raises(pretrain.UsageError, match="has not been scanned .*python -m fastmim.data.scan"):
        pretrain.run([*args, str(tmp_path / "a"), "--loader", "dali"])
    pretrain.run([*args, str(tmp_path / "b")])  # auto: the torch loader, saying why
    out = capsys.readouterr().out
    assert "loader torch (0 workers): the folder has no up-to-date scan for DALI" in out
    assert "not torch-gpu: this run is on cpu, GPU decoding needs CUDA" in out  # why not the GPU loader either


def test_a_scanned_folder_with_bad_files_says_what_each_loader_reads(tmp_path, monkeypatch, capsys):
    """One folder, a scan that found a bad file: auto reads the scan with DALI and says how many bad images it leaves
    out, naming the folder; --loader torch reads the folder as it is and, on the bad file, says what it is and
    points at the scan (or --skip-bad-files)."""
    from fastmim import pretrain
    from fastmim.data.scan import scan
    from tests.conftest import TINY_ARGS

    monkeypatch.setenv("FASTMIM_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "d", n=8)
    (data / "class0" / "aaa_empty.jpg").write_bytes(b"")
    listed = scan(str(data), workers=0, progress=False).list_path
    args = [*TINY_ARGS, "--data-path", str(data), "--max-steps", "1", "--vis-interval", "100", "--output-dir"]
    pretrain.run([*args, str(tmp_path / "auto")])
    out = capsys.readouterr().out
    assert f"data: 8 images from {data}, loader DALI" in out
    assert f"the folder's up-to-date scan {listed}, which leaves out the 1 bad image it found" in out
    assert pretrain.main([*args, str(tmp_path / "torch"), "--loader", "torch", "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    err = err[err.index("error: ") :].splitlines()[0]
    assert f"cannot read image '{data / 'class0' / 'aaa_empty.jpg'}': empty file (0 bytes)" in err
    assert f"(or start a run with --data-path {listed}, this folder's up-to-date scan, which leaves out the 1 bad " \
           "image it found, or with --skip-bad-files)" in err  # fmt: skip


@pytest.mark.slow
def test_a_bad_file_met_in_training_checkpoints_names_the_file_and_the_run_resumes_once_fixed(image_folder, tmp_path,
                                                                                              capsys):  # fmt: skip
    from fastmim import pretrain
    from fastmim.data.dali import DaliLoader
    from fastmim.train.checkpoint import load_checkpoint
    from tests.conftest import TINY_ARGS

    files = list_images(image_folder)
    third_batch = list(DaliLoader(files, 4, 64, num_threads=1, seed=0))[2][1].tolist()
    victim = files[third_batch[1]]
    good = open(victim, "rb").read()
    open(victim, "wb").write(good[: len(good) // 3])
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--loader", "dali", "--allow-unscanned", "--epochs", "2"]
    # no garbage collection: the stopped run's objects stay as they are (DALI shares a file's mapping among the
    # process's pipelines while one holds it: the run must release its pipeline itself, or the resume below would
    # read the bytes of the bad file again)
    gc.disable()
    try:
        assert pretrain.main([*args, "--output-dir", str(out)]) == 2
        err = capsys.readouterr()
        assert f"DALI cannot decode {victim!r}" in err.err and "checkpointed at step 2" in err.out
        assert "Replace the file at the same path and run again with --resume" in err.err
        assert err.err.rstrip().endswith("the run is checkpointed at step 2")
        assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
        open(victim, "wb").write(good)  # fixed in place
        assert pretrain.main(["--resume", "--output-dir", str(out)]) == 0
    finally:
        gc.enable()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 12  # (two epochs: across an epoch boundary)
    # the resumed run reads the batch that failed, now fixed, and ends as a run that never met the bad file (DALI's
    # state after the failed batch has moved past it: the checkpoint holds the one from before)
    straight = tmp_path / "straight"
    assert pretrain.main([*args, "--output-dir", str(straight), "--log-interval", "1"]) == 0
    a, b = load_checkpoint(straight / "checkpoint.pt")["model"], load_checkpoint(out / "checkpoint.pt")["model"]
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_a_bad_file_in_the_first_batch_says_run_again_not_resume(image_folder, tmp_path, capsys):
    """No step done, no checkpoint: DALI's error says to run again (there is nothing to --resume) and that nothing
    is lost; the same folder then runs once the file is replaced."""
    from fastmim import pretrain
    from fastmim.data.dali import DaliLoader
    from tests.conftest import TINY_ARGS

    files = list_images(image_folder)
    victim = files[next(iter(DaliLoader(files, 4, 64, num_threads=1, seed=0)))[1].tolist()[0]]
    good = open(victim, "rb").read()
    open(victim, "wb").write(good[: len(good) // 3])
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--loader", "dali", "--allow-unscanned", "--output-dir",
            str(out), "--max-steps", "1"]  # fmt: skip
    gc.disable()  # (see above: the stopped run must release DALI's mapping of the file itself)
    try:
        assert pretrain.main(args) == 2
        err = capsys.readouterr().err
        assert f"DALI cannot decode {victim!r}" in err and "--resume" not in err, err
        assert "and run again: no step had completed, nothing is lost" in err, err
        open(victim, "wb").write(good)
        assert pretrain.main(args) == 0  # the same command: the folder holds no run to refuse
    finally:
        gc.enable()


def test_a_dali_run_whose_scan_went_stale_is_told_to_scan_again_not_refused_for_its_size(capsys):
    """--loader auto on resume: the checkpoint holds DALI's reader state but the folder's scan is out of date, so auto
    would pick the torch loader (all files, bad ones included): mid-epoch that is refused saying to scan again; at an
    epoch boundary it goes on, with a note. --loader given, or a run that did not read with DALI: nothing said."""
    from fastmim.config import PretrainConfig
    from fastmim.pretrain import UsageError, _check_loader_on_resume

    cfg = PretrainConfig(data_path="/data/x")
    why = "the folder has no up-to-date scan for DALI (python -m fastmim.data.scan)"
    dali = {"loader": [{"dali": b"...", "epoch": 0, "batch": 3}], "batch": 3}
    with pytest.raises(UsageError, match=r"read its data with DALI and stopped mid-epoch, but --loader auto now picks "
                                         r"torch: .*\(python -m fastmim.data.scan /data/x\) and resume"):  # fmt: skip
        _check_loader_on_resume(cfg, dali, "torch", why)
    _check_loader_on_resume(cfg, {**dali, "batch": 0}, "torch", why)
    assert "note: this run read its data with DALI" in capsys.readouterr().out
    for c, state, kind in [(cfg, dali, "dali"), (cfg, {"loader": None, "batch": 3}, "torch"), (cfg, None, "torch"),
                           (PretrainConfig(data_path="/data/x", loader="torch"), dali, "torch")]:  # fmt: skip
        _check_loader_on_resume(c, state, kind, why)
    assert capsys.readouterr().out == ""


def test_auto_keeps_the_torch_loader_of_a_run_stopped_mid_epoch_after_its_folder_is_scanned(image_folder, tmp_path,
                                                                                          capsys):  # fmt: skip
    """A run that read with the torch loader (no scan yet) and stopped mid-epoch, resumed with --loader auto after
    the folder was scanned: auto would now pick DALI, which cannot continue the torch loader's epoch; it keeps the
    torch loader and says why, and the resumed run equals the uninterrupted one. At the epoch's end it is DALI's."""
    from fastmim import pretrain
    from fastmim.data.scan import scan
    from fastmim.train.checkpoint import load_checkpoint
    from tests.conftest import TINY_ARGS

    common = [*TINY_ARGS, "--data-path", str(image_folder), "--vis-interval", "100"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain.run([*common, "--output-dir", str(straight), "--max-steps", "4"])
    pretrain.run([*common, "--output-dir", str(split), "--max-steps", "2"])  # 6 steps an epoch: stopped inside it
    scan(str(image_folder))
    capsys.readouterr()
    pretrain.run(["--resume", "--output-dir", str(split), "--max-steps", "4"])
    assert "loader torch (0 workers): the run read with a torch loader and stopped mid-epoch" in capsys.readouterr().out
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    pretrain.run(["--resume", "--output-dir", str(split), "--max-steps", "6"])  # to the epoch's end, still torch
    pretrain.run(["--resume", "--output-dir", str(split), "--max-steps", "7"])
    assert "loader DALI" in capsys.readouterr().out  # a new epoch: the scanned folder is DALI's


def test_the_bad_file_line_says_what_the_run_kept():
    """The CLI's line for a bad file, for each thing the run may have kept: a checkpoint at the last step, one
    before it (steps lost), none (no step done, or steps done and lost); for the torch loader's error and DALI's,
    with and without a file name."""
    from fastmim.data.folder import BadImageError
    from fastmim.pretrain import bad_file_message

    def bad(e, resumable, saved, lost):
        e.resumable, e.saved_step, e.steps_lost = resumable, saved, lost
        return bad_file_message(e)

    named = DaliDecodeError("DALI cannot decode '/d/x.jpg'; the run stops: DALI cannot skip a sample", "/d/x.jpg")
    line = bad(named, True, 4, 0)
    assert line.startswith("DALI cannot decode '/d/x.jpg'") and line.count("run again with --resume") == 2, line
    assert line.endswith(": the run is checkpointed at step 4"), line
    assert bad(named, True, 4, 3).endswith("checkpointed at step 4 (3 steps after it lost)")
    line = bad(named, False, 0, 0)
    assert "--resume" not in line and "end-of-epoch" not in line and line.endswith("nothing is lost"), line
    assert bad(named, False, 0, 5).endswith("no checkpoint had been written (5 steps done, lost)")
    unnamed = DaliDecodeError("DALI cannot decode an image of this batch and does not say which (x)", None)
    line = bad(unnamed, False, 0, 0)
    assert "python -m fastmim.data.scan DATA_PATH" in line and "and run again: nothing" not in line, line
    assert "and run again: no step had completed" in line, line
    torch_bad = BadImageError("Traceback ...\nBadImageError: cannot read image '/d/y.png': truncated", "/d/y.png")
    line = bad(torch_bad, True, 2, 1)
    assert line == ("cannot read image '/d/y.png': truncated. Replace the file at the same path and run again with "
                    "--resume: the run is checkpointed at step 2 (1 step after it lost)"), line  # fmt: skip
    assert str(named).endswith("and resume from an end-of-epoch checkpoint")  # the loader's own message, as before
    member = BadImageError("cannot read image '/d/s0.tar:37376:x.jpg': truncated", "/d/s0.tar:37376:x.jpg")
    assert "Rewrite the shard with a good image under the same member name (a shard without it is another data " \
        "set, which a resume inside the epoch refuses), or pass --skip-bad-files, and run again" in \
        bad(member, False, 0, 0)  # fmt: skip


@pytest.mark.slow
def test_under_torchrun_a_bad_file_on_one_rank_checkpoints_every_rank_before_that_batch(tmp_path):
    """Two processes (gloo), DALI: rank 1 cannot decode a file of its third batch while rank 0 loaded its own; both
    stop there, rank 0 gives its batch back, and the checkpoint of step 2 resumes (file replaced) to the weights of a
    run that never met the bad file."""
    from fastmim.data.dali import DaliLoader
    from fastmim.train.checkpoint import load_checkpoint
    from tests.conftest import TINY_ARGS, make_image_folder, torchrun_clean_then_bad, torchrun_resume_equals

    data = make_image_folder(tmp_path / "d", n=24)
    files = list_images(data)
    third = list(DaliLoader(files, 2, 64, rank=1, world_size=2, seed=0, num_threads=1))[2][1].tolist()
    victim = files[third[0]]
    good = open(victim, "rb").read()
    args = [*TINY_ARGS, "--data-path", str(data), "--epochs", "1", "--batch-size", "2", "--loader", "dali",
            "--allow-unscanned", "--vis-interval", "100"]  # fmt: skip
    r, clean, cut = torchrun_clean_then_bad(args, tmp_path, Path(victim), good[: len(good) // 3])
    assert r.returncode != 0 and "rank 1 could not load its batch" in r.stdout, r.stdout + r.stderr
    assert "checkpointed at step 2 before stopping" in r.stdout, r.stdout + r.stderr
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == 2
    torchrun_resume_equals(clean, cut, Path(victim), good, 6)


def test_only_errors_that_name_a_sample_become_decode_errors(files):
    """DALI 2.x names the sample it cannot decode; on nvImageCodec it reports a failure without a file (a decode
    error that says how to find it); any other error (an older DALI's message, out of memory in the GPU decoder)
    passes through unchanged rather than being blamed on a file."""
    ld = loader(files)
    named = RuntimeError("Error in CPU operator `nvidia.dali.fn.decoders.image_random_crop`\nencountered:\n\n"
                         "Failed to decode sample #3 : /data/x/bad file.jpg\nCurrent pipeline object is no longer "
                         "valid.")  # fmt: skip
    err = ld._decode_error(named)
    assert isinstance(err, DaliDecodeError) and err.path == "/data/x/bad file.jpg"
    unnamed = RuntimeError("Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image_random"
                           "_crop`,\nencountered:\n\nnvImageCodec failure: '#4'\nCurrent pipeline object is no longer "
                           "valid.")  # fmt: skip
    err = ld._decode_error(unnamed)  # nvImageCodec's report names no file: the message says how to find it
    assert isinstance(err, DaliDecodeError) and err.path is None and "fastmim.data.scan" in str(err)
    assert "nvImageCodec failure: '#4'" in str(err)
    for other in (RuntimeError("Error in CPU operator `nvidia.dali.fn.decoders.image_random_crop`: bad stream"),
                  RuntimeError("Error in MIXED operator `nvidia.dali.fn.decoders.image`: out of memory")):  # fmt: skip
        assert ld._decode_error(other) is other


@pytest.mark.slow
def test_a_dali_mid_epoch_checkpoint_is_not_resumed_by_the_torch_loader(image_folder, tmp_path):
    """The torch sampler would read other samples for the rest of the epoch: refused, naming the way out."""
    from fastmim import pretrain
    from tests.conftest import TINY_ARGS

    out = tmp_path / "run"
    pretrain.run([*TINY_ARGS, "--data-path", str(image_folder), "--loader", "dali", "--allow-unscanned",
                  "--max-steps", "2", "--output-dir", str(out)])  # fmt: skip
    with pytest.raises(ValueError, match="resume with --loader dali"):
        pretrain.run(["--resume", "--output-dir", str(out), "--loader", "torch", "--max-steps", "4"])


def test_a_fork_after_a_dropped_loader_does_not_hang(files, tmp_path):
    """A loader dropped in a reference cycle leaves its pipeline to the garbage collector; were it collected in a
    forked DataLoader worker, its destructor would wait forever for threads the child lacks. Every fork is preceded
    by a collection once DALI is in use (a fresh process, with a deadline, shows it)."""
    script = tmp_path / "fork.py"
    script.write_text(
        "import sys, torch\n"
        "from fastmim.data.dali import DaliLoader\n"
        "files = sys.argv[1:]\n"
        "for _ in range(3):\n"
        "    ld = DaliLoader(files, 4, 32, num_threads=2)\n"
        "    next(iter(ld))\n"
        "    ld.cycle = ld  # unreachable after del: only the collector frees it\n"
        "    del ld\n"
        "loader = torch.utils.data.DataLoader(list(range(8)), batch_size=4, num_workers=2)\n"
        "print(sum(len(b) for b in loader))\n"
    )
    r = subprocess.run([sys.executable, str(script), *files], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "8", r.stderr[-2000:]


def test_hflip_probability_reaches_the_pipeline(files):
    """--hflip: 0 mirrors no image (I-JEPA), 1 every one: with the same seed (the same crops) the two epochs are
    each other's mirror images."""
    none, every = (epoch_batches(loader(files, seed=5, hflip=p)) for p in (0.0, 1.0))
    for (x0, i0), (x1, i1) in zip(none, every, strict=True):
        assert torch.equal(i0, i1)
        torch.testing.assert_close(x1, x0.flip(-1))
