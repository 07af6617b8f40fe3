"""--fsdp (FSDP2, ``fastmim.train.fsdp``): a 2-process gloo run on CPU trains what one process trains, its sharded
checkpoint resumes on one process (sharded or not) and converts to the single-file checkpoint; a single-file
checkpoint resumes sharded; a teacher recipe (data2vec 2.0, with accumulation and clipping) trains under FSDP as under
DDP; the blocks' other entry points (fused norm, the teacher's FFN outputs), activation checkpointing, I-JEPA, FCMAE
and bf16 mixed precision train on a sharded model."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import fastmim
from fastmim import pretrain
from fastmim.train import checkpoint as ckpt
from fastmim.train.convert import convert
from fastmim.train.fsdp import shard_units
from tests.conftest import run_cli, tiny_args_for
from tests.train.test_trainer_proofs import _args, _assert_states_close, _metrics, _set


def _torchrun(args: list[str], nproc: int = 2):
    r = run_cli(["--standalone", "--nproc_per_node", str(nproc), "-m", "fastmim.pretrain", *args],
                module=["-m", "torch.distributed.run"], env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _losses(out) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in _metrics(out)]


def _assert_losses_close(a, b, rel: float) -> None:
    la, lb = _losses(a), _losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb]
    for (s, x), (_, y) in zip(la, lb, strict=True):
        assert y == pytest.approx(x, rel=rel), (s, x, y)


def test_shard_units_are_the_blocks_innermost_first():
    mae = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, decoder_depth=2)
    assert shard_units(mae) == [*mae.blocks, *mae.decoder_blocks]
    d2v = fastmim.create_model("data2vec2_vit_tiny_patch16", img_size=64)
    units = shard_units(d2v)
    assert all(b in units for b in [*d2v.blocks, *d2v.teacher.model.blocks])
    fc = fastmim.create_model("fcmae_convnextv2_atto", img_size=64)
    assert [b for s in fc.encoder.stages for b in s.blocks] == [u for u in shard_units(fc) if u not in
                                                                 set(fc.decoder.modules())]  # fmt: skip


@pytest.mark.slow
def test_two_process_fsdp_resumes_on_one_process_as_a_single_process_run(image_folder, tmp_path):
    """2 processes x batch 2 under --fsdp for an epoch; resumed on one process (batch 4, FSDP over one rank) for the
    second; the per-step losses, weights and AdamW moments are those of one process with batch 4 throughout. The
    sharded checkpoint converts to a single-file one and an encoder.safetensors equal to the run's, and converted at
    step 6 it resumes (without FSDP) as the run goes on."""
    ref, sh = tmp_path / "ref", tmp_path / "sh"
    pretrain.run(_args(image_folder, ref, "--epochs", "2"))
    args = _set(_args(image_folder, sh, "--epochs", "2", "--fsdp", "--max-steps", "6"), "--batch-size", "2")
    r = _torchrun(args)
    assert "FSDP (sharded over 2)" in r.stdout and "batch 4 (= 2 x 1 accum x 2 procs)" in r.stdout
    dcp = sh / ckpt.DCP_NAME
    assert len(list(dcp.glob("*.distcp"))) == 2 and not (sh / ckpt.CHECKPOINT_NAME).exists()
    assert ckpt.load_checkpoint(dcp)["step"] == 6
    conv6 = tmp_path / "conv6"  # converted mid-run, the single file resumes (a run moved off FSDP) as the run would
    conv6.mkdir()
    convert(dcp, conv6 / ckpt.CHECKPOINT_NAME)
    pretrain.run(["--resume", str(conv6 / ckpt.CHECKPOINT_NAME), "--no-fsdp", "--batch-size", "4", "--max-steps", "12"])
    pretrain.run(["--resume", str(dcp), "--batch-size", "4", "--max-steps", "12"])
    assert len(list(dcp.glob("*.distcp"))) == 1  # rewritten by the one process
    _assert_losses_close(ref, sh, rel=1e-5)
    state = convert(dcp, tmp_path / "conv.pt", encoder=tmp_path / "enc.safetensors")
    assert state["step"] == 12 and state["epoch"] == 2
    _assert_states_close(ckpt.load_checkpoint(ref / ckpt.CHECKPOINT_NAME), state, atol=1e-6, rel=1e-5)
    moved = ckpt.load_checkpoint(conv6 / ckpt.CHECKPOINT_NAME)
    assert moved["step"] == 12
    _assert_states_close(ckpt.load_checkpoint(ref / ckpt.CHECKPOINT_NAME), moved, atol=1e-6, rel=1e-5)
    ref_rows = dict(_losses(ref))
    assert [s for s, _ in _losses(conv6)] == list(range(7, 13))
    assert all(loss == pytest.approx(ref_rows[s], rel=1e-5) for s, loss in _losses(conv6))
    ours, conv = load_file(sh / "encoder.safetensors"), load_file(tmp_path / "enc.safetensors")
    assert ours.keys() == conv.keys() and all(torch.equal(ours[k], conv[k]) for k in ours)
    with safe_open(str(tmp_path / "enc.safetensors"), "pt") as f, safe_open(str(sh / "encoder.safetensors"), "pt") as g:
        assert f.metadata()["img_size"] == g.metadata()["img_size"]  # eval reads a ConvNeXt's size from it
    with pytest.raises(FileExistsError, match="nothing was overwritten"):
        convert(dcp, tmp_path / "conv.pt")
    with pytest.raises(ValueError, match="is a single-file checkpoint already"):
        convert(tmp_path / "conv.pt", tmp_path / "again.pt")
    # a save interrupted between its two renames leaves checkpoint.dcp.old: still the run's checkpoint
    dcp.rename(sh / f"{ckpt.DCP_NAME}.old")
    assert ckpt.run_checkpoint(sh) == sh / f"{ckpt.DCP_NAME}.old"
    assert ckpt.load_checkpoint(dcp)["step"] == 12
    # a sharded directory without its meta.pt is an unfinished save, not a checkpoint
    (sh / f"{ckpt.DCP_NAME}.old" / "meta.pt").unlink()
    assert ckpt.run_checkpoint(sh) is None


@pytest.mark.slow
def test_single_file_checkpoint_resumes_sharded_and_sharded_resumes_whole(image_folder, tmp_path, capsys):
    """One process for an epoch (checkpoint.pt); resumed with --fsdp on 2 processes for the second (the whole
    checkpoint cut into shards): the run of one process throughout. And the other way: the sharded checkpoint
    resumed without --fsdp on one process."""
    ref, run, back = tmp_path / "ref", tmp_path / "run", tmp_path / "back"
    pretrain.run(_args(image_folder, ref, "--epochs", "2"))
    pretrain.run(_args(image_folder, run, "--epochs", "2", "--max-steps", "6"))
    shutil.copytree(run, back)
    _torchrun(["--resume", str(run / ckpt.CHECKPOINT_NAME), "--fsdp", "--batch-size", "2", "--max-steps", "12"])
    assert not (run / ckpt.CHECKPOINT_NAME).exists()  # the sharded checkpoint replaced it: not left stale
    shutil.copy(back / ckpt.CHECKPOINT_NAME, run / ckpt.CHECKPOINT_NAME)  # an older one copied back in
    assert ckpt.run_checkpoint(run) == run / ckpt.DCP_NAME  # the later of the two
    os.utime(run / ckpt.CHECKPOINT_NAME)  # the stale file renewed (a plain copy of the folder): its step decides
    assert ckpt.run_checkpoint(run) == run / ckpt.DCP_NAME
    capsys.readouterr()
    pretrain._say_other_checkpoint(run / ckpt.DCP_NAME)
    assert "holds checkpoint.dcp (step 12) and checkpoint.pt (step 6, older;" in capsys.readouterr().out
    _assert_losses_close(ref, run, rel=1e-5)
    _assert_states_close(ckpt.load_checkpoint(ref / ckpt.CHECKPOINT_NAME), convert(run / ckpt.DCP_NAME,
                         tmp_path / "c.pt"), atol=1e-6, rel=1e-5)  # fmt: skip
    # sharded (one rank) to step 9, then whole: the same run again
    pretrain.run(["--resume", str(back / ckpt.CHECKPOINT_NAME), "--fsdp", "--max-steps", "9"])
    pretrain.run(["--resume", "auto", "--output-dir", str(back), "--no-fsdp", "--max-steps", "12"])
    assert "note: removed checkpoint.dcp (step 9): this run's checkpoint.pt (step 12) replaces it" in \
        capsys.readouterr().out  # fmt: skip
    assert ckpt.run_checkpoint(back) == back / ckpt.CHECKPOINT_NAME and not (back / ckpt.DCP_NAME).exists()
    _assert_losses_close(ref, back, rel=1e-5)
    _assert_states_close(ckpt.load_checkpoint(ref / ckpt.CHECKPOINT_NAME),
                         ckpt.load_checkpoint(back / ckpt.CHECKPOINT_NAME), atol=1e-6, rel=1e-5)  # fmt: skip


@pytest.mark.slow
def test_teacher_recipe_under_fsdp_trains_as_under_ddp(image_folder, tmp_path):
    """data2vec 2.0 (an EMA teacher, whose target pass calls each block's ``forward_with_ffn``) with accumulation and
    gradient clipping, on 2 processes: --fsdp trains what DDP trains (the same per-rank decoder noise), the teacher's
    sharded EMA included."""
    ddp, sh = tmp_path / "ddp", tmp_path / "sh"
    base = [*tiny_args_for("data2vec2_vit_tiny_patch16"), "--data-path", str(image_folder), "--num-masks", "2",
            "--batch-size", "2", "--accum-iter", "2", "--clip-grad", "0.5", "--max-steps", "3", "--log-interval", "1",
            "--loader", "torch"]  # fmt: skip
    _torchrun([*base, "--output-dir", str(ddp)])
    _torchrun([*base, "--output-dir", str(sh), "--fsdp"])
    _assert_losses_close(ddp, sh, rel=1e-5)
    a, b = ckpt.load_checkpoint(ddp / ckpt.CHECKPOINT_NAME), convert(sh / ckpt.DCP_NAME, tmp_path / "c.pt")
    assert int(b["model"]["teacher.updates"]) == 3
    assert not torch.equal(b["model"]["teacher.model.blocks.0.mlp.fc1.weight"], b["model"]["blocks.0.mlp.fc1.weight"])
    _assert_states_close(a, b, atol=1e-6, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, extra",
    [
        ("mae_vit_tiny_patch16", ["--fused-norm", "--grad-ckpt"]),
        ("ijepa_vit_tiny_patch16", []),
        ("fcmae_convnextv2_atto", []),
        ("a2mim_vit_tiny_patch16", []),
        ("mae_vit_tiny_patch16", ["--amp", "bf16"]),
    ],
    ids=["mae-fused-norm-grad-ckpt", "ijepa", "fcmae", "a2mim", "mae-bf16"],
)
def test_one_rank_fsdp_trains_as_the_plain_model(image_folder, tmp_path, model, extra):
    """FSDP over one process (its own one-rank group): the recipe's entry points all gather their weights, and the
    losses are the plain model's (bf16: FSDP's bf16 weights against autocast's casts, to bf16 rounding)."""
    plain, sh = tmp_path / "plain", tmp_path / "sh"
    bf16 = extra == ["--amp", "bf16"]
    if model.startswith("mae_"):
        base = _args(image_folder, plain, "--max-steps", "3", *([] if bf16 else extra))
    else:
        base = [*tiny_args_for(model), "--data-path", str(image_folder), "--output-dir", str(plain), "--max-steps", "3",
                "--log-interval", "1", "--loader", "torch", *extra]  # fmt: skip
    base = _set(base, "--amp", "bf16") if bf16 else base
    pretrain.run(base)
    pretrain.run([*_set(base, "--output-dir", str(sh)), "--fsdp"])
    _assert_losses_close(plain, sh, rel=3e-2 if bf16 else 1e-5)
    assert (sh / "encoder.safetensors").exists() and ckpt.run_checkpoint(sh) == sh / ckpt.DCP_NAME


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--amp", "fp16"], "--fsdp trains with --amp bf16 or none"),
        (["--cuda-graph"], "--fsdp with --cuda-graph is not supported"),
        (["--compile"], "--fsdp with --compile is not supported"),
    ],
)
def test_fsdp_refuses_what_it_does_not_support(image_folder, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert pretrain.main([*_args(image_folder, out, "--fsdp"), *flags]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def _flip(path, offset: int, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_not_resumed(image_folder, tmp_path, capsys, monkeypatch):
    """Bytes changed inside a checkpoint after it was written: the single file fails its CRC records, a sharded
    one's shard the weights' sums saved beside it; a missing shard is named. Each is one line, exit 2, and nothing
    trains on wrong weights. Before, both resumed with exit 0."""
    whole, sh = tmp_path / "whole", tmp_path / "sh"
    base = _args(image_folder, whole, "--max-steps", "2")
    pretrain.run(base)
    pretrain.run([*_set(base, "--output-dir", str(sh)), "--fsdp"])
    capsys.readouterr()
    # a tensor record in the middle of the zip archive (the weights and optimizer state are most of the bytes)
    path = whole / ckpt.CHECKPOINT_NAME
    intact = path.read_bytes()
    _flip(path, len(intact) // 2)
    assert pretrain.main(["--resume", "--output-dir", str(whole), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "is corrupt: its record" in err and "does not match the CRC-32 written with it" in err
    assert "Traceback" not in err
    path.write_bytes(intact)
    assert pretrain.main(["--resume", "--output-dir", str(whole), "--max-steps", "3"]) == 0  # intact: resumes
    capsys.readouterr()

    shard = next((sh / ckpt.DCP_NAME).glob("*.distcp"))
    kept = shard.read_bytes()
    at = len(kept) // 4  # inside the weights' records (the shard holds the model's tensors, then the optimizer's)
    shard.write_bytes(kept[:at] + bytes(4096) + kept[at + 4096 :])  # one zeroed page
    assert pretrain.main(["--resume", "--output-dir", str(sh), "--fsdp", "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert f"is corrupt: {shard.name} does not match the CRC-32 recorded" in err and "Traceback" not in err
    from fastmim.train.convert import main as convert_main

    assert convert_main([str(sh / ckpt.DCP_NAME), str(tmp_path / "c.pt")]) == 2
    assert "is corrupt" in capsys.readouterr().err and not (tmp_path / "c.pt").exists()
    # without the recorded CRCs (as if written without them), the sums saved with the weights still see the page
    meta_path = sh / ckpt.DCP_NAME / "meta.pt"
    meta = torch.load(meta_path, weights_only=False)
    torch.save({k: v for k, v in meta.items() if k != "shard_crc"}, meta_path)
    assert pretrain.main(["--resume", "--output-dir", str(sh), "--fsdp", "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "is corrupt: its weights sum to" in err and "Traceback" not in err
    torch.save(meta, meta_path)
    shard.unlink()
    assert pretrain.main(["--resume", "--output-dir", str(sh), "--fsdp", "--max-steps", "3"]) == 2
    assert f"is corrupt: {shard.name} is missing" in capsys.readouterr().err
    monkeypatch.setenv("FASTMIM_VERIFY_CHECKPOINT", "0")  # unchecked, DCP's own error: one line all the same
    assert pretrain.main(["--resume", "--output-dir", str(sh), "--fsdp", "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "cannot be read (a shard missing, truncated or damaged?)" in err and "Traceback" not in err
    monkeypatch.delenv("FASTMIM_VERIFY_CHECKPOINT")
    shard.write_bytes(kept)
    assert convert_main([str(sh), str(tmp_path / "c.pt")]) == 2
    assert "is a run's folder: its sharded checkpoint is" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "nowhere"), str(tmp_path / "c.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert convert_main([str(sh / ckpt.DCP_NAME), str(tmp_path / "c.pt")]) == 0  # intact: converts
    state = ckpt.load_checkpoint(tmp_path / "c.pt")  # and keeps the sums, which a resume from it checks
    e, b = state["epoch"], state["batch"]  # (a finished 3-epoch run was said to stop in "epoch 4, after 0")
    said = f"step {state['step']}: " + (f"epoch {e + 1}, after {b} of its batches" if b else f"the end of epoch {e}")
    assert said + ")" in capsys.readouterr().out
    model = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, decoder_embed_dim=64, decoder_depth=1,
                                 decoder_num_heads=2)  # TINY_ARGS' model  # fmt: skip
    model.load_state_dict(state["model"])
    sums = ckpt.weights_sums(model.parameters())
    assert state["weights_sum"] == pytest.approx(sums[0].item(), rel=1e-5)


def test_a_whole_checkpoint_of_another_network_is_refused_by_its_model_keys():
    """load_full_state (a single-file checkpoint into --fsdp's shards) names the model's missing keys, as a plain
    load does, before the optimizer's state is renumbered (whose refusal would name parameters, not the network)."""
    from fastmim.train.fsdp import load_full_state
    from fastmim.train.optim import build_adamw, param_names

    a = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, decoder_depth=1)
    b = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, decoder_depth=2)
    oa, ob = build_adamw(a, 1e-3, 0.05), build_adamw(b, 1e-3, 0.05)
    with pytest.raises(RuntimeError, match=r"missing keys \['decoder_blocks\.1\..*unexpected keys \[\]"):
        load_full_state(b, ob, a.state_dict(), oa.state_dict(), param_names(a, oa))
    load_full_state(a, oa, a.state_dict(), oa.state_dict(), param_names(a, oa))  # its own: loads


def test_a_save_removes_the_other_formats_older_checkpoint_only(tmp_path, capsys):
    """After a switch of --fsdp, the save in the new format removes the checkpoint of the other format it replaces
    (an earlier step), and keeps one of a later step (copied in)."""
    from types import SimpleNamespace

    from fastmim.train.engine import Trainer

    later = SimpleNamespace(output_dir=tmp_path, sharded=True, pos=SimpleNamespace(step=5))
    torch.save({"step": 9}, tmp_path / ckpt.CHECKPOINT_NAME)
    Trainer._drop_other_format(later)
    assert (tmp_path / ckpt.CHECKPOINT_NAME).exists() and "removed" not in capsys.readouterr().out
    torch.save({"step": 3}, tmp_path / ckpt.CHECKPOINT_NAME)
    Trainer._drop_other_format(later)
    assert not (tmp_path / ckpt.CHECKPOINT_NAME).exists()
    assert "note: removed checkpoint.pt (step 3): this run's checkpoint.dcp (step 5) replaces it" in \
        capsys.readouterr().out  # fmt: skip
    (tmp_path / ckpt.CHECKPOINT_NAME).write_bytes(b"damaged")  # its step unreadable: kept (it may be resumed unchecked)
    Trainer._drop_other_format(later)
    assert (tmp_path / ckpt.CHECKPOINT_NAME).exists()
    whole = SimpleNamespace(output_dir=tmp_path, sharded=False, pos=SimpleNamespace(step=5))
    for name in (ckpt.DCP_NAME, f"{ckpt.DCP_NAME}.old"):  # a sharded one and the .old an interrupted save left
        (tmp_path / name).mkdir()
        torch.save({"step": 4}, tmp_path / name / "meta.pt")
    Trainer._drop_other_format(whole)
    assert not (tmp_path / ckpt.DCP_NAME).exists() and not (tmp_path / f"{ckpt.DCP_NAME}.old").exists()
