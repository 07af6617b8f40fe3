"""The training step's contracts, proven before the step is rewritten for speed: gradient accumulation equals the
larger batch, a resume is exact step by step with stochastic depth drawing from the global RNG, fp16's gradient
scaler skips a step with an infinite gradient and survives a checkpoint, gradient clipping sees unscaled gradients
once per optimizer step, and bf16/fp16 autocast steps of the fused path match the reference path.

Each test also shows it can fail: the resume test breaks the RNG restore and sees the runs part, the scaler test sees
the skipped step in the weights.
"""

from __future__ import annotations

import json

import pytest
import torch

import fastmim
from fastmim import pretrain
from fastmim.masking import random_masking
from fastmim.train import checkpoint as ckpt
from fastmim.train.checkpoint import load_checkpoint
from tests.conftest import TINY_ARGS


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _args(image_folder, out, *extra) -> list[str]:
    return [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--log-interval", "1",
            "--vis-interval", "100", "--loader", "torch", *extra]  # fmt: skip


def _set(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def _assert_states_close(a: dict, b: dict, atol: float, rel: float) -> None:
    """Weights within ``atol``; optimizer moments within ``rel`` of each tensor's largest magnitude (their scale is the
    gradients', ~1e-5 here)."""
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    for pid, sa in a["optimizer"]["state"].items():
        for name, t in sa.items():
            tol = rel * float(t.abs().max()) if t.numel() else 0.0
            torch.testing.assert_close(b["optimizer"]["state"][pid][name], t, rtol=0, atol=tol,
                                       msg=lambda m, w=f"{pid}.{name}": f"optimizer state {w}: {m}")  # fmt: skip


@pytest.mark.slow
def test_accumulation_equals_the_larger_batch(image_folder, tmp_path):
    """--batch-size 4 --accum-iter 2 trains what --batch-size 8 trains: the same samples, masks and lr per step, so the
    same weights, optimizer moments (which a missing 1/accum_iter would double: AdamW's update alone hides it) and
    per-step losses, to float32 rounding. (Weights to 1e-6 absolute, about 1% of the three steps' updates: the key
    biases of attention get no gradient but rounding noise, which AdamW scales up to a full step.)"""
    big, acc = tmp_path / "b8", tmp_path / "b4x2"
    pretrain.run(_set(_args(image_folder, big, "--max-steps", "3"), "--batch-size", "8"))
    pretrain.run(_args(image_folder, acc, "--max-steps", "3", "--accum-iter", "2"))
    a, b = load_checkpoint(big / "checkpoint.pt"), load_checkpoint(acc / "checkpoint.pt")
    assert a["step"] == b["step"] == 3
    _assert_states_close(a, b, atol=1e-6, rel=1e-5)
    ma, mb = _metrics(big), _metrics(acc)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2, 3]
    for ra, rb in zip(ma, mb, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6), (ra, rb)
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-12)


@pytest.mark.slow
def test_accumulation_that_does_not_divide_the_epoch_leaves_its_remainder_untrained(tmp_path):
    """24 images, batch 4 x --accum-iter 4: 6 loader batches, one whole step (4 batches) per epoch, the last 2 left
    out; so two epochs train what --batch-size 16 trains (its one full batch per epoch, the same 16 samples).
    Trained, the 2 left over leaked their gradients into the next epoch's step."""
    from tests.conftest import make_image_folder

    folder = make_image_folder(tmp_path / "data", n=24)
    big, acc = tmp_path / "b16", tmp_path / "b4x4"
    pretrain.run(_set(_args(folder, big, "--epochs", "2"), "--batch-size", "16"))
    pretrain.run(_args(folder, acc, "--epochs", "2", "--accum-iter", "4"))
    a, b = load_checkpoint(big / "checkpoint.pt"), load_checkpoint(acc / "checkpoint.pt")
    assert a["step"] == b["step"] == 2 and (b["epoch"], b["batch"]) == (2, 0)
    _assert_states_close(a, b, atol=1e-6, rel=1e-5)
    for ra, rb in zip(_metrics(big), _metrics(acc), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6), (ra, rb)


@pytest.mark.slow
@pytest.mark.parametrize("mask_type", ["random", "block"])  # drawn by the trainer; by the loader's collate (C++)
def test_every_epoch_draws_new_crops_and_masks_for_each_image(tmp_path, monkeypatch, mask_type):
    """Crops, flips and masks are seeded by (seed, epoch, index): the trainer moves the dataset and the mask collator
    on to each epoch. 4 images at batch 4 for 2 epochs: each step sees all of them, and no image or mask of the
    second epoch repeats one of the first (without the moves every one did: augmentation and masks lost)."""
    if mask_type == "block" and not fastmim.has_native_extension():
        pytest.skip("the loader draws masks only with fastmim._C's generators (not built here)")
    from fastmim.train.step import TrainStep
    from tests.conftest import make_image_folder

    folder = make_image_folder(tmp_path / "data", n=4)
    seen, call = [], TrainStep.__call__

    def spy(self, imgs, mask, *rest, **kw):
        seen.append((imgs.detach().clone(), mask.detach().clone()))
        return call(self, imgs, mask, *rest, **kw)

    monkeypatch.setattr(TrainStep, "__call__", spy)
    pretrain.run(_args(folder, tmp_path / "run", "--epochs", "2", "--mask-type", mask_type))
    assert len(seen) == 2
    (i0, m0), (i1, m1) = seen
    assert i0.shape[0] == m0.shape[0] == 4
    for a in range(4):
        for b in range(4):
            assert not torch.equal(i0[a], i1[b]) and not torch.equal(m0[a], m1[b]), (a, b)


FCMAE = ["--model", "fcmae_convnextv2_atto", "--img-size", "96", "--batch-size", "4", "--num-workers", "0",
         "--warmup-epochs", "1", "--device", "cpu", "--amp", "none", "--drop-path", "0.3"]  # fmt: skip


SIMMIM = ["--model", "simmim_vit_tiny_patch16", "--img-size", "64", "--batch-size", "4", "--num-workers", "0",
          "--warmup-epochs", "1", "--device", "cpu", "--amp", "none", "--drop-path", "0.3"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "restore_rng"),
    [(FCMAE, True), (FCMAE, False), (SIMMIM, True)],
    ids=["fcmae-rng-restored", "fcmae-rng-not-restored", "simmim-vit-rng-restored"],
)
def test_resume_with_drop_path_is_exact_step_by_step(image_folder, tmp_path, monkeypatch, recipe, restore_rng):
    """FCMAE's ConvNeXt and SimMIM's ViT with stochastic depth draw from the global RNG every step: a run stopped
    after 2 steps and resumed reproduces the straight run's per-step losses, weights and optimizer state exactly.
    Without the RNG restore the resumed run draws other drop masks and parts from the straight one (the control that
    this test can fail)."""
    common = [*recipe, "--data-path", str(image_folder), "--log-interval", "1", "--vis-interval", "100",
              "--loader", "torch"]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain.run([*common, "--output-dir", str(straight), "--max-steps", "4"])
    pretrain.run([*common, "--output-dir", str(split), "--max-steps", "2"])
    torch.manual_seed(12345)  # what the process did in between must not matter
    torch.rand(7)
    if not restore_rng:
        monkeypatch.setattr(ckpt, "set_rng_state", lambda state: None)
    pretrain.run(["--resume", "--output-dir", str(split), "--max-steps", "4"])
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    la, lb = [r["loss"] for r in _metrics(straight)], [r["loss"] for r in _metrics(split)]
    assert len(la) == len(lb) == 4
    if restore_rng:
        assert lb == la, (la, lb)  # bit for bit: the same computation in the same order
        _assert_states_close(a, b, atol=0, rel=0)
    else:
        assert lb[:2] == la[:2] and lb[2:] != la[2:]
        with pytest.raises(AssertionError):
            _assert_states_close(a, b, atol=0, rel=0)


@pytest.mark.slow
def test_fp16_scaler_skips_a_step_with_an_infinite_gradient_and_round_trips(image_folder, tmp_path, monkeypatch,
                                                                           capsys):  # fmt: skip
    """--amp fp16 on CPU: an infinite gradient at step 2 makes the GradScaler skip that optimizer step (the weights
    after 2 steps are those after 1, AdamW's decay included) and halve its scale; the scale is saved, restored on
    resume (a fresh scaler would start at 2^16 again), and a resume with --amp none from that checkpoint runs."""
    from fastmim.methods.mae import MaskedAutoencoderViT

    real = MaskedAutoencoderViT.forward_loss
    calls = {"n": 0}

    def poisoned(self, imgs, pred, mask):
        calls["n"] += 1
        if calls["n"] == 2 and pred.requires_grad:
            pred.register_hook(lambda g: torch.full_like(g, float("inf")))
        return real(self, imgs, pred, mask)

    fp16 = _set(_args(image_folder, tmp_path / "x"), "--amp", "fp16")
    one, skipped = tmp_path / "one", tmp_path / "skipped"
    pretrain.run(_set(fp16, "--output-dir", str(one)) + ["--max-steps", "1"])
    assert "note: --amp fp16 on the CPU runs several times slower" in capsys.readouterr().out  # (runs, for this test)
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)
    pretrain.run(_set(fp16, "--output-dir", str(skipped)) + ["--max-steps", "2"])
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", real)
    a, b = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(skipped / "checkpoint.pt")
    assert b["step"] == 2 and a["step"] == 1
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=f"{k}: the step with inf was not skipped")
    assert a["scaler"]["scale"] == 2.0**16 and b["scaler"]["scale"] == 2.0**15
    pretrain.run(["--resume", "--output-dir", str(skipped), "--max-steps", "3"])
    c = load_checkpoint(skipped / "checkpoint.pt")
    assert c["step"] == 3 and c["scaler"]["scale"] == 2.0**15, "the scaler's state was not restored"
    assert c["scaler"]["_growth_tracker"] == b["scaler"]["_growth_tracker"] + 1
    pretrain.run(["--resume", "--output-dir", str(skipped), "--max-steps", "4", "--amp", "none"])
    d = load_checkpoint(skipped / "checkpoint.pt")
    assert d["step"] == 4 and not d["scaler"]  # a disabled scaler saves an empty state
    assert all(torch.isfinite(v).all() for v in d["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_clip_grad_clips_unscaled_gradients_once_per_optimizer_step(image_folder, tmp_path, monkeypatch):
    """--clip-grad with fp16 and accumulation: clipping runs once per optimizer step (not per micro-batch), on the
    unscaled gradients (their norm is the fp32 run's, not 2^16 times it), and leaves their norm at most the limit."""
    real = torch.nn.utils.clip_grad_norm_
    seen: dict[str, list] = {}

    def spy(key):
        def clip(params, max_norm, *a, **k):
            params = list(params)
            total = real(params, max_norm, *a, **k)
            after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            seen.setdefault(key, []).append((max_norm, float(total), float(after)))
            return total

        return clip

    base = _args(image_folder, tmp_path / "x", "--max-steps", "2", "--accum-iter", "2", "--clip-grad", "0.01")
    for key, amp in (("fp16", "fp16"), ("fp32", "none")):
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy(key))
        pretrain.run(_set(_set(base, "--amp", amp), "--output-dir", str(tmp_path / key)))
    assert len(seen["fp16"]) == len(seen["fp32"]) == 2  # two optimizer steps of two micro-batches each
    for (m16, n16, after16), (m32, n32, _) in zip(seen["fp16"], seen["fp32"], strict=True):
        assert m16 == m32 == 0.01
        assert 0.5 < n16 / n32 < 2.0, f"fp16 run clipped a gradient of norm {n16}, the fp32 run {n32}: not unscaled"
        assert after16 <= 0.01 * (1 + 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_step_on_cpu_fused_matches_reference(dtype):
    """A training step under CPU autocast: the fused ops' loss and gradients against the reference path's, by the
    low-precision rule (the fused error against fp32 at most 2x the reference's own, plus a small floor)."""
    torch.manual_seed(0)
    kw = dict(img_size=64, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)
    fused = fastmim.create_model("mae_vit_tiny_patch16", **kw)
    plain = fastmim.create_model("mae_vit_tiny_patch16", fused_ops=False, **kw)
    plain.load_state_dict(fused.state_dict())
    imgs = torch.randn(4, 3, 64, 64)
    mask = random_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(1))

    def step(model, amp):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=amp):
            loss, _, _ = model(imgs, mask=mask)
        loss.backward()
        grads = [torch.zeros(p.numel()) if p.grad is None else p.grad.flatten().float() for p in model.parameters()]
        return loss.detach().float(), torch.cat(grads)

    gold_loss, gold_grad = step(plain, amp=False)
    f_loss, f_grad = step(fused, amp=True)
    r_loss, r_grad = step(plain, amp=True)
    assert abs(f_loss - gold_loss) <= 2 * abs(r_loss - gold_loss) + 1e-3 * abs(gold_loss)
    f_err, r_err = (f_grad - gold_grad).norm(), (r_grad - gold_grad).norm()
    assert f_err <= 2 * r_err + 1e-3 * gold_grad.norm(), (float(f_err), float(r_err))
    assert torch.isfinite(f_grad).all()


@pytest.mark.slow
def test_resume_between_accumulated_steps_is_exact(image_folder, tmp_path):
    """With --accum-iter 2 a run stops only at optimizer-step boundaries (batch 4 of the epoch after 2 steps); the
    resumed run's weights, moments and per-step losses are the straight run's."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain.run(_args(image_folder, straight, "--accum-iter", "2", "--max-steps", "4"))
    pretrain.run(_args(image_folder, split, "--accum-iter", "2", "--max-steps", "2"))
    mid = load_checkpoint(split / "checkpoint.pt")
    assert (mid["epoch"], mid["batch"], mid["step"]) == (0, 4, 2)
    pretrain.run(["--resume", "--output-dir", str(split), "--max-steps", "4"])
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert (b["epoch"], b["batch"], b["step"]) == (a["epoch"], a["batch"], a["step"]) == (1, 2, 4)
    _assert_states_close(a, b, atol=0, rel=0)
    assert [r["loss"] for r in _metrics(split)] == [r["loss"] for r in _metrics(straight)]


@pytest.mark.slow
def test_bf16_autocast_run_on_cpu(image_folder, tmp_path):
    """--amp bf16 trains on CPU through the whole trainer (no scaler: its saved state is empty) with losses close to
    the fp32 run's."""
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    pretrain.run(_args(image_folder, fp32, "--max-steps", "3"))
    pretrain.run(_set(_args(image_folder, bf16, "--max-steps", "3"), "--amp", "bf16"))
    state = load_checkpoint(bf16 / "checkpoint.pt")
    assert state["step"] == 3 and not state["scaler"] and state["config"]["amp"] == "bf16"
    for ra, rb in zip(_metrics(fp32), _metrics(bf16), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=3e-2), (ra, rb)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


_COUNTING_NO_SYNC = """
import sys
from torch.nn.parallel import DistributedDataParallel
entered, no_sync = [0], DistributedDataParallel.no_sync
def counted(self):
    entered[0] += 1
    return no_sync(self)
DistributedDataParallel.no_sync = counted
from fastmim import pretrain
status = pretrain.main(sys.argv[1:])
print(f"no_sync entered {entered[0]} times", flush=True)
sys.exit(status)
"""


@pytest.mark.slow
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-mode"])
def test_ddp_with_accumulation_equals_one_process(image_folder, tmp_path, graph):
    """torchrun, 2 processes x batch 2 x accum 2 (DDP's no_sync on the first micro-batch) trains what one process
    with batch 8 trains: the same 8 images per step, gradients all-reduced once per step (no_sync counted: without
    it the weights are the same, and every micro-batch all-reduces). ``graph-mode``: the ranks
    step through --cuda-graph's code path (uncaptured on CPU: static buffers, gradients kept, tensor lr)."""
    from tests.conftest import run_cli

    ddp, one = tmp_path / "ddp", tmp_path / "one"
    args = _set(_args(image_folder, ddp, "--max-steps", "3", "--accum-iter", "2"), "--batch-size", "2")
    env = {"OMP_NUM_THREADS": "1", **({"FASTMIM_CUDA_GRAPH_ON_CPU": "1"} if graph else {})}
    args += ["--cuda-graph"] if graph else []
    script = tmp_path / "counting_no_sync.py"  # the CLI, with DDP's no_sync counted on each rank
    script.write_text(_COUNTING_NO_SYNC)
    r = run_cli(["--standalone", "--nproc_per_node", "2", str(script), *args],
                module=["-m", "torch.distributed.run"], env=env)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "batch 8 (= 2 x 2 accum x 2 procs)" in r.stdout
    assert r.stdout.count("no_sync entered 3 times") == 2, r.stdout  # each rank's first micro-batch of each step
    pretrain.run(_set(_args(image_folder, one, "--max-steps", "3"), "--batch-size", "8"))
    a, b = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(ddp / "checkpoint.pt")
    assert a["step"] == b["step"] == 3 and len(set(b["weights_sum_per_rank"])) == 1
    _assert_states_close(a, b, atol=1e-6, rel=1e-5)
    for ra, rb in zip(_metrics(one), _metrics(ddp), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)


@pytest.mark.slow
def test_a_two_process_run_stopped_mid_epoch_resumes_on_one_process_as_a_one_process_run(image_folder, tmp_path):
    """2 processes x batch 2 stop inside the first epoch (step 3 of 6); resumed on one process with batch 4, the rest
    of the epoch is dealt to it: every step trains the same 4 images (with the same masks) as a one-process run with
    batch 4 throughout, so the losses and the final weights are that run's (a requeue onto fewer nodes)."""
    from tests.conftest import run_cli

    ddp, one = tmp_path / "ddp", tmp_path / "one"
    args = _set(_args(image_folder, ddp, "--max-steps", "3"), "--batch-size", "2")
    r = run_cli(["--standalone", "--nproc_per_node", "2", "-m", "fastmim.pretrain", *args],
                module=["-m", "torch.distributed.run"], env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert load_checkpoint(ddp / "checkpoint.pt")["batch"] == 3  # inside the epoch of 6 batches
    pretrain.run(["--resume", "--output-dir", str(ddp), "--batch-size", "4", "--max-steps", "6"])
    pretrain.run(_set(_args(image_folder, one, "--max-steps", "6"), "--batch-size", "4"))
    a, b = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(ddp / "checkpoint.pt")
    assert a["step"] == b["step"] == 6 and (b["epoch"], b["batch"]) == (1, 0)
    _assert_states_close(a, b, atol=1e-6, rel=1e-5)
    rows = {row["step"]: row["loss"] for row in _metrics(ddp)}  # (the resumed run's rows after the first run's)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for row in _metrics(one):
        assert rows[row["step"]] == pytest.approx(row["loss"], rel=1e-5), row["step"]


@pytest.mark.slow
def test_two_nodes_by_localhost_rendezvous_equal_one_process(image_folder, tmp_path):
    """Two torchrun "nodes" of one process each, joined by a c10d rendezvous on localhost (the multi-node command of
    the README), train what one process with their combined batch trains; each node's launcher environment
    (LOCAL_RANK 0, LOCAL_WORLD_SIZE 1) is read, not assumed from WORLD_SIZE."""
    import os
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes, one = tmp_path / "nodes", tmp_path / "one"
    args = _set(_args(image_folder, nodes, "--max-steps", "3"), "--batch-size", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
              "--rdzv_id", "fastmim-test"]  # fmt: skip
    procs = [subprocess.Popen([*launch, "-m", "fastmim.pretrain", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    banner = next(o for o in outs if "batch 8 (= 4 x 1 accum x 2 procs)" in o)
    assert "on cpu x2 (2 nodes x 1)" in banner  # LOCAL_WORLD_SIZE read from each node's launcher
    pretrain.run(_set(_args(image_folder, one, "--max-steps", "3"), "--batch-size", "8"))
    a, b = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(nodes / "checkpoint.pt")
    assert a["step"] == b["step"] == 3 and len(set(b["weights_sum_per_rank"])) == 1
    _assert_states_close(a, b, atol=1e-6, rel=1e-5)


@pytest.mark.parametrize("native", [True, False, None])
def test_cpu_autocast_notes_say_what_runs_slowly_here(native, monkeypatch, capsys):
    """bf16 autocast on a CPU without bf16 instructions (AVX2) ran a config's recipe about 10x slower than fp32,
    unsaid, and the fp16 note advised it: each note names what is fast on this CPU."""
    monkeypatch.setattr(pretrain, "cpu_has_bf16", lambda: native)
    pretrain._note_cpu_autocast(torch.bfloat16)
    out = capsys.readouterr().out
    assert ("note: --amp bf16 on this CPU" in out and "add --amp none" in out) == (native is False), out
    pretrain._note_cpu_autocast(torch.float16)
    out = capsys.readouterr().out
    assert "note: --amp fp16 on the CPU runs several times slower" in out
    assert out.rstrip().endswith("use --amp bf16 or none" if native else "use --amp none"), out
