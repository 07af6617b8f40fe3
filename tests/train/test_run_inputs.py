"""What a resumed run reads and draws is what the saved run did, or it is said: the data set's file list (a digest in
the checkpoint), the loader it read with and the masks' generator (the run's provenance, also in config.yaml)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from fastmim import pretrain
from fastmim.provenance import as_comments
from fastmim.train.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import TINY_ARGS, make_image_folder

ARGS = [*TINY_ARGS, "--vis-interval", "100", "--loader", "torch"]  # 24 images, batch 4: 6 steps an epoch


def test_the_data_sets_file_list_is_checked_on_resume(tmp_path, capsys):
    """A file added (or removed, or renamed) shifts the sorted list's indices: refused inside an epoch (even at the
    same count: one added and one removed), said at an epoch's end; a file replaced at its path (the fix for a bad
    file) and the folder copied elsewhere keep the run's data set."""
    data = make_image_folder(tmp_path / "d")
    out = tmp_path / "run"
    pretrain.run([*ARGS, "--data-path", str(data), "--output-dir", str(out), "--max-steps", "2"])
    first = data / "class0" / "img000.jpg"
    shutil.copy(first, data / "class0" / "img000b.jpg")
    (data / "class1" / "img001.jpg").unlink()  # one added, one removed: the same count
    with pytest.raises(ValueError, match=r"the data set's files changed since the checkpoint \(24 images then, 24 "
                                         r"now.*stopped inside epoch 1.*--max-steps 6 stops at its end"):  # fmt: skip
        pretrain.run(["--resume", "--output-dir", str(out), "--data-path", str(data)])
    for k in range(4):  # 28 images: 7 steps an epoch now, the saved run's epoch ends at 6 all the same
        shutil.copy(first, data / "class0" / f"more{k}.jpg")
    with pytest.raises(ValueError, match=r"\(24 images then, 28 now.*--max-steps 6 stops at its end"):
        pretrain.run(["--resume", "--output-dir", str(out), "--data-path", str(data)])
    for k in range(4):
        (data / "class0" / f"more{k}.jpg").unlink()
    (data / "class0" / "img000b.jpg").rename(data / "class1" / "img001.jpg")  # the names as they were
    first.write_bytes(first.read_bytes())  # rewritten in place
    moved = shutil.copytree(data, tmp_path / "elsewhere" / "d")
    capsys.readouterr()
    pretrain.run(["--resume", "--output-dir", str(out), "--data-path", str(moved), "--max-steps", "6"])
    assert "files changed" not in capsys.readouterr().out
    shutil.copy(first, moved / "class0" / "zzz.jpg")
    pretrain.run(["--resume", "--output-dir", str(out), "--data-path", str(moved), "--max-steps", "7"])
    assert "note: the data set's files changed since the checkpoint (24 images then, 25 now" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 7


def test_a_data_set_that_grew_between_epochs_renumbers_the_steps_and_says_so(tmp_path, capsys):
    """Resumed at an epoch's end on a data set with more images, the run counts its steps in the new epoch length
    (epoch 1 of 7 steps ends at step 7): metrics.jsonl's and the encoder's steps jump; that was not said."""
    data = make_image_folder(tmp_path / "d")
    out = tmp_path / "run"
    pretrain.run([*ARGS, "--data-path", str(data), "--output-dir", str(out), "--max-steps", "6"])
    for k in range(4):  # 28 images: 7 steps an epoch
        shutil.copy(data / "class0" / "img000.jpg", data / "class0" / f"more{k}.jpg")
    capsys.readouterr()
    pretrain.run(["--resume", "--output-dir", str(out), "--max-steps", "8"])
    said = capsys.readouterr().out
    assert "note: step 6 of the saved run is step 7 now: an epoch is 7 steps (dataset_size 24 -> 28)" in said, said
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 8


def test_config_yaml_records_the_runs_provenance_and_still_reads_back(tmp_path, image_folder):
    out = tmp_path / "run"
    pretrain.run([*ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps", "1"])
    text = (out / "config.yaml").read_text()
    assert "#   loader: torch" in text and "#   torch: " in text and "#   native_ext: " in text
    assert "#   commit: " in text and "#   data: " in text
    assert yaml.safe_load(text)["loader"] == "torch"  # comments: the config itself is unchanged
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["provenance"]["loader"] == "torch" and saved["provenance"]["torch"]
    assert isinstance(saved["data_digest"], str)
    pretrain.run(["--config", str(out / "config.yaml"), "--output-dir", str(tmp_path / "again"), "--max-steps", "1"])
    assert load_checkpoint(tmp_path / "again" / "checkpoint.pt")["data_digest"] == saved["data_digest"]
    odd = "a: 1\n" + as_comments({"data": "/x\ny: 2", "loader": "torch"})  # a line break must not end the comment
    assert yaml.safe_load(odd) == {"a": 1} and "#   data: '/x\\ny: 2'" in odd


def test_a_checkpoint_of_an_earlier_fastmim_resumed_inside_an_epoch_says_its_crops_differ(tmp_path, image_folder,
                                                                                          capsys):  # fmt: skip
    out = tmp_path / "run"
    pretrain.run([*ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps", "2"])
    state = load_checkpoint(out / "checkpoint.pt")
    del state["provenance"], state["data_digest"]  # as written before they were recorded
    save_checkpoint(out / "checkpoint.pt", state)
    capsys.readouterr()
    pretrain.run(["--resume", "--output-dir", str(out), "--max-steps", "3"])
    out = capsys.readouterr().out
    assert "note: this checkpoint was written by an earlier fastmim: the rest of epoch 1 will have other crops" in out
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert saved["provenance"]["earlier"] == [{"until_step": 2, "fastmim": "an earlier fastmim (no record)"}]


def test_a_resume_that_draws_masks_with_another_generator_says_so(tmp_path, image_folder, capsys):
    """Block masks come from the native extension's C++ generator where it loads, from torch's where it does not:
    a resume on the other side (a broken install) draws other masks, which is said."""
    out = tmp_path / "run"
    args = [*ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--mask", "block", "--mask-ratio", "0.5"]
    pretrain.run([*args, "--max-steps", "2"])
    path = out / "checkpoint.pt"
    state = load_checkpoint(path)
    state["provenance"]["native_ext"] = not state["provenance"]["native_ext"]  # as if saved on the other side
    save_checkpoint(path, state)
    capsys.readouterr()
    pretrain.run(["--resume", "--output-dir", str(out), "--max-steps", "3"])
    assert "note: the block masks from here on differ from the ones this run would have drawn" in (
        capsys.readouterr().out
    )


def test_a_resume_that_auto_gives_another_loader_says_so(tmp_path, capsys):
    """A run that read with the torch loader, its folder scanned since: at an epoch's end --loader auto takes DALI,
    whose crops and order differ; said, with the flag that keeps the run's."""
    pytest.importorskip("nvidia.dali", reason="optional dependency absent: DALI (fastmim[dali])")
    from fastmim.data.scan import scan

    data = make_image_folder(tmp_path / "d")
    out = tmp_path / "run"
    common = [*TINY_ARGS, "--vis-interval", "100", "--data-path", str(data)]
    pretrain.run([*common, "--output-dir", str(out), "--max-steps", "6", "--loader", "torch"])
    scan(str(data), workers=0, progress=False, out=None)
    capsys.readouterr()
    pretrain.run(["--resume", "--output-dir", str(out), "--max-steps", "7", "--loader", "auto"])
    assert "note: this run read its data with the torch loader; --loader auto now picks dali" in (
        capsys.readouterr().out
    )


def test_a_dali_run_stopped_mid_epoch_on_shards_with_bad_images_is_not_told_to_scan_again():
    """--loader auto gives a DALI run's resume to torch when its shards' scan found bad images: "scan the data
    again" (the advice for a scan gone out of date) cannot help there; the shards must be rewritten."""
    from fastmim.config import PretrainConfig

    state = {"loader": [{"dali": b"x"}], "batch": 3, "provenance": {"loader": "dali"}}
    bad = ("tar shards not cleared for DALI: the scan found 2 bad image(s) in them, and DALI reads every sample of a "
           "shard: rewrite the shards without them (python -m fastmim.data.scan lists them)")  # fmt: skip
    with pytest.raises(pretrain.UsageError) as e:
        pretrain._check_loader_on_resume(PretrainConfig(data_path="/d/s.tar"), state, "torch", bad)
    assert "scan the data again" not in str(e.value) and "resume with --loader dali" in str(e.value)
    stale = "tar shards not cleared for DALI: they have not been scanned (or changed since): run python -m ..."
    with pytest.raises(pretrain.UsageError, match="scan the data again"):
        pretrain._check_loader_on_resume(PretrainConfig(data_path="/d/s.tar"), state, "torch", stale)
