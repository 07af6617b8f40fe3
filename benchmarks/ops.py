"""fastmim.ops against the eager PyTorch reference and torch.compile(reference), side by side in one process.

    python benchmarks/ops.py                      # MAE ViT-B/16 shapes on a GPU, smaller ones on CPU
    python benchmarks/ops.py --ops loss --batch-size 64 --out benchmarks/results/ops.jsonl

For each op and pass (forward, backward, forward+backward): median time with p20/p80, host time per call (GPU: the
wall-clock time of issuing a call while the GPU runs behind, so Python checks, backend choice, autograd, allocation
and launches), extra peak memory (GPU), and achieved bandwidth counted as the bytes the op cannot avoid (what it must
read and write once), plus the device's measured copy bandwidth for comparison. On a GPU every fused backend that can
run is timed (``fastmim[cuda]``: the CUDA kernels of fastmim._cuda; ``fastmim[triton]``), each forced in turn.
With ``--cuda-graph`` the forward and the forward+backward passes on a GPU are also replayed from a CUDA graph
(``ms_graph``; the backward alone cannot be captured: its forward ran outside the capture): kernel time without the
Python and launch overhead, which at these sizes can be as long as the kernels; a capture that fails (seen on
torch 2.11 + triton 3.6) leaves CUDA's random state unusable, so graph timing stops for the rest of the run, and the
other columns go on. With ``--compiled-fused`` the ops that have Triton twins (gather, scatter, loss, patchify) are
also timed compiled: ``fastmim+compile[opaque]`` (inductor calls the custom ops) and ``fastmim+compile[triton]``
(``set_compiled_ops("triton")``: inductor launches fastmim's Triton kernels itself), against the compiled reference
(issue 14, item 4). Rows are written as each op finishes. Dtypes are those the MAE recipe hands each op under bf16
autocast on a GPU (fp32 on CPU). Never asserts anything: the targets live in the issue and the closing notes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import checked_device, copy_bandwidth, environment, out_file, positive_int, write_row  # noqa: E402
from fastmim import _ext  # noqa: E402
from fastmim.masking import random_masking  # noqa: E402
from fastmim.ops import (  # noqa: E402
    add_layer_norm,
    add_layer_norm_ref,
    attention,
    bias_gelu,
    fft_loss,
    fft_loss_ref,
    gather_visible,
    gather_visible_ref,
    grn,
    grn_ref,
    hog_target,
    hog_target_ref,
    layer_norm,
    layer_norm_ref,
    low_pass_target,
    low_pass_target_ref,
    masked_mse_loss,
    masked_mse_loss_ref,
    patch_fft_loss,
    patch_fft_loss_ref,
    patchify,
    patchify_ref,
    scatter_masked,
    scatter_masked_ref,
)
from fastmim.ops._dispatch import NO_CUDA_KERNEL, choose_backend, set_backend, set_compiled_ops  # noqa: E402

OPS = ("gather", "scatter", "loss", "patchify", "grn", "add_ln", "ln", "bias_gelu", "attn", "attn_enc", "hog", "fft",
       "pfft", "lowpass")  # fmt: skip
PASSES = ("fwd", "bwd", "fwd+bwd")
# the cases whose ops have a Triton twin (fastmim.ops.set_compiled_ops), by --ops key and by op name
TWIN_OPS = {"gather": "gather_visible", "scatter": "scatter_masked", "loss": "masked_mse_loss", "patchify": "patchify"}


@dataclass
class Case:
    """One op at one shape: inputs (those requiring grad get gradients), the two functions, bytes per pass."""

    op: str
    shape: str
    dtypes: str
    inputs: list
    fused: Callable
    ref: Callable
    bytes_fwd: int
    bytes_bwd: int
    backend: str  # what auto picks here
    op_name: str = ""  # the name the dispatcher knows the op by
    # other implementations to time beside eager (impl name -> function), each fastmim row gets its speedup over them
    baselines: dict[str, Callable] = field(default_factory=dict)

    def fused_backends(self, device: torch.device) -> list[str]:
        """The fused backends to time: on a GPU each one that runs there, else the one auto picks."""
        if device.type != "cuda":
            return [self.backend]
        names = ["cuda"] if _ext.cuda_available() and (self.op_name or self.op) not in NO_CUDA_KERNEL else []
        return names + ["triton"]


def build_cases(ops, b: int, img: int, patch: int, enc_dim: int, dec_dim: int, ratio: float, device, lowp: bool):
    n = (img // patch) ** 2
    info = random_masking(b, n, ratio, device=device, generator=torch.Generator().manual_seed(0))
    k = info.ids_keep.shape[1]  # (MAE's rule: N - int(N (1 - ratio)) hidden; the labels say the share hidden)
    hidden = f"{(n - k) / n:.0%} masked"
    act = torch.bfloat16 if lowp else torch.float32  # autocast activations; parameters and images stay fp32
    f32 = torch.float32

    def t(*shape, dtype=f32, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    cases = []
    if "gather" in ops:  # encoder: patch embedding + fp32 pos embedding is fp32 under autocast
        x = t(b, n, enc_dim)
        es = x.element_size()
        cases.append(Case("gather_visible", f"B{b} N{n} K{k} D{enc_dim}", str(x.dtype), [x, info.ids_keep],
                          gather_visible, gather_visible_ref, 2 * b * k * enc_dim * es + b * k * 8,
                          b * k * enc_dim * es + b * n * enc_dim * es,
                          choose_backend("gather_visible", device, (x.dtype,))))  # fmt: skip
    if "scatter" in ops:  # decoder: bf16 decoder_embed output, fp32 mask token and frozen fp32 pos embedding
        xv, cls = t(b, k, dec_dim, dtype=act), t(b, 1, dec_dim, dtype=act)
        mt, pos = t(1, 1, dec_dim), t(1, n + 1, dec_dim, grad=False)
        out_es = torch.promote_types(act, f32).itemsize
        fwd = b * k * dec_dim * xv.element_size() + (n + 1) * dec_dim * 4 + b * n * 8 + b * (n + 1) * dec_dim * out_es
        bwd = b * (n + 1) * dec_dim * out_es + b * k * dec_dim * xv.element_size()
        cases.append(Case("scatter_masked", f"B{b} N{n} K{k} D{dec_dim} +cls +pos", f"x {act}, params fp32",
                          [xv, info.ids_restore, mt, pos, cls], scatter_masked, scatter_masked_ref, fwd, bwd,
                          choose_backend("scatter_masked", device, (act, f32))))  # fmt: skip
    if "loss" in ops:  # bf16 decoder predictions, fp32 images, 75% masked, norm-pix
        d = patch * patch * 3
        pred, imgs = t(b, n, d, dtype=act), t(b, 3, img, img, grad=False)
        m = info.mask
        frac = float(m.float().mean())
        read = int(frac * b * n * d * (pred.element_size() + 4)) + b * n * 4
        cases.append(Case("masked_mse_loss", f"B{b} {img}px p{patch} {hidden}", f"pred {act}, imgs fp32",
                          [pred, imgs, m], lambda p, i, m: masked_mse_loss(p, i, m, patch),
                          lambda p, i, m: masked_mse_loss_ref(p, i, m, patch), read,
                          read + b * n * d * pred.element_size(),
                          choose_backend("masked_mse_loss", device, (act, f32))))  # fmt: skip
    if "patchify" in ops:
        imgs = t(b, 3, img, img)
        nbytes = 2 * imgs.numel() * 4
        cases.append(Case("patchify", f"B{b} {img}px p{patch}", "fp32", [imgs], lambda x: patchify(x, patch),
                          lambda x: patchify_ref(x, patch), nbytes, nbytes,
                          choose_backend("patchify", device, (f32,))))  # fmt: skip
    if "grn" in ops:  # FCMAE ConvNeXtV2-Base's last-stage hidden activations: bf16 x, fp32 GRN parameters
        x, w, bias = t(b, 76, 2048, dtype=act), t(2048), t(2048)
        nbytes = x.numel() * x.element_size()
        cases.append(Case("grn", f"B{b} N76 C2048", f"x {act}, params fp32", [x, w, bias], grn, grn_ref, 2 * nbytes,
                          3 * nbytes, choose_backend("grn", device, (x.dtype, w.dtype))))  # fmt: skip
    if "add_ln" in ops:  # the MAE decoder's residual add + LayerNorm: bf16 branch output, fp32 stream and params
        tokens = n + 1
        x, r, w, bias = t(b, tokens, dec_dim, dtype=act), t(b, tokens, dec_dim), t(dec_dim), t(dec_dim)
        elems = x.numel()
        y_es = torch.tensor([], dtype=act).element_size()
        fwd = elems * (x.element_size() + 4 + 4 + y_es) + b * tokens * 8  # x, stream in; s, y, mean/rstd out
        bwd = elems * (y_es + 4 + 4 + 4 + x.element_size())  # dy, ds, s in; d stream, dx out
        cases.append(Case("add_layer_norm", f"B{b} N{tokens} C{dec_dim}", f"x {act}, stream and params fp32",
                          [x, r, w, bias], lambda *a: add_layer_norm(*a, 1e-6, act),
                          lambda *a: add_layer_norm_ref(*a, 1e-6, act), fwd, bwd,
                          choose_backend("add_layer_norm", device, (act, f32, f32, f32))))  # fmt: skip
    if "ln" in ops:  # an FCMAE block's LayerNorm on its visible rows (ConvNeXtV2-B stage 3 at 40% visible): bf16 in
        rows, ch = max(1, b // 4) * 196 * 2 // 5 * 4, 512  # bf16 out (layer_norm) vs autocast's fp32 LN and the cast
        x, w, bias = t(rows, ch, dtype=act), t(ch), t(ch)
        es = x.element_size()
        cases.append(Case("layer_norm", f"M{rows} C{ch}", f"x {act}, params fp32", [x, w, bias],
                          lambda *a: layer_norm(*a, 1e-6, act), lambda *a: layer_norm_ref(*a, 1e-6, act),
                          x.numel() * 2 * es + rows * 8, x.numel() * 3 * es,
                          choose_backend("add_layer_norm", device, (act, f32, f32)), "add_layer_norm"))  # fmt: skip
    if "bias_gelu" in ops:  # the MAE encoder MLP's fc1 output (bf16, 4x the width) and its fp32 bias
        tokens, hidden = k + 1, 4 * enc_dim
        x, bias = t(b, tokens, hidden, dtype=act), t(hidden)
        elems = x.numel() * x.element_size()
        # eager, as the unfused MLP without its matmul: the bias added in the matmul's dtype, then GELU
        cases.append(Case("bias_gelu", f"B{b} N{tokens} C{hidden}", f"x {act}, bias fp32", [x, bias], bias_gelu,
                          lambda x, b: F.gelu(x + b.to(x.dtype)), 2 * elems, 3 * elems,
                          choose_backend("bias_gelu", device, (act, f32))))  # fmt: skip
    # attention from the packed qkv: the MAE decoder (N+1 tokens, 16 heads of 32) and encoder (K+1, 12 of 64); the
    # reference is the model's SDPA path (permute views in, transpose + reshape copy out)
    for key, tokens, heads, dim in (("attn", n + 1, 16, dec_dim), ("attn_enc", k + 1, 12, enc_dim)):
        if key not in ops:
            continue
        heads = min(heads, max(1, dim // 8))  # small --*-dim runs (the CPU smoke test) keep a head dim of 8+
        hd = dim // heads
        qkv = t(b, tokens, 3, heads, hd, dtype=act)
        nbytes = qkv.numel() * qkv.element_size()
        cases.append(Case("attention" if key == "attn" else "attention (encoder)", f"B{b} N{tokens} H{heads} hd{hd}",
                          str(act), [qkv], lambda q: attention(q).flatten(2), _sdpa_from_packed, nbytes * 4 // 3,
                          nbytes * 2, choose_backend("attention", device, (act,)), op_name="attention",
                          baselines=attention_baselines(device)))  # fmt: skip
    if "hog" in ops:  # MaskFeat's target: HOG of the masked 40% of the patches vs the official whole-image HOG
        imgs = t(b, 3, img, img, grad=False)
        hog_mask = torch.rand(b, n, generator=torch.Generator().manual_seed(1)).to(device) < 0.4
        cell = min(8, patch)
        nbytes = imgs.numel() * 4 + b * n * 27 * (patch // cell) ** 2 * 4
        cases.append(Case("hog_target", f"B{b} {img}px p{patch} 40% masked", "fp32", [imgs, hog_mask],
                          lambda x, m: hog_target(x, m, patch, cell), lambda x, m: hog_target_ref(x, patch, cell),
                          nbytes, 0,
                          choose_backend("hog_target", device, (f32,))))  # fmt: skip
    if "fft" in ops:  # A2MIM's frequency loss: bf16 reconstructions, fp32 images, 32-px mask patches at 60%
        mp = 2 * patch
        pred, imgs = t(b, 3, img, img, dtype=act), t(b, 3, img, img, grad=False)
        fmask = (torch.rand(b, (img // mp) ** 2, generator=torch.Generator().manual_seed(2)) < 0.6).float().to(device)
        nbytes = pred.numel() * (pred.element_size() + 4)
        auto = choose_backend("fft_loss", device, (act, f32))
        cases.append(Case("fft_loss", f"B{b} {img}px mask {mp}px 60%", f"pred {act}, imgs fp32", [pred, imgs, fmask],
                          lambda x, y, m: fft_loss(x, y, m, mp), lambda x, y, m: fft_loss_ref(x, y, m, mp), nbytes,
                          pred.numel() * pred.element_size(), auto))  # fmt: skip
    if "pfft" in ops:  # the patch-wise focal frequency loss on MAE's bf16 decoder output, 75% masked
        d = patch * patch * 3
        pred, imgs = t(b, n, d, dtype=act), t(b, 3, img, img, grad=False)
        m = info.mask
        read = int(float(m.float().mean()) * b * n * d * (pred.element_size() + 4)) + b * n * 4
        cases.append(Case("patch_fft_loss", f"B{b} {img}px p{patch} {hidden}", f"pred {act}, imgs fp32",
                          [pred, imgs, m], lambda p, i, m: patch_fft_loss(p, i, m, patch),
                          lambda p, i, m: patch_fft_loss_ref(p, i, m, patch), read,
                          read + b * n * d * pred.element_size(),
                          choose_backend("patch_fft_loss", device, (act, f32))))  # fmt: skip
    if "lowpass" in ops:  # PixMIM's target: the official fft2 / fftshift / circle / ifft2 / abs, r = 40 at 224 px
        imgs = t(b, 3, img, img, grad=False)
        radius = 40.0 * img / 224
        nbytes = imgs.numel() * 4 * 2
        cases.append(Case("low_pass_target", f"B{b} {img}px r{radius:g}", "fp32", [imgs],
                          lambda x: low_pass_target(x, radius), lambda x: low_pass_target_ref(x, radius), nbytes, 0,
                          choose_backend("low_pass_target", device, (f32,))))  # fmt: skip
    return cases


def _sdpa_from_packed(qkv: torch.Tensor) -> torch.Tensor:
    """What the ViT's Attention does with SDPA: [B, N, 3, H, hd] -> [B, N, H * hd]."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


# SDPA's kernels, each pinned (eager lets SDPA choose): rows "sdpa[cudnn]", ... beside "eager"
SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")


def attention_baselines(device: torch.device) -> dict[str, Callable]:
    """The attention kernels fastmim's is measured against: each of SDPA's backends pinned (one that cannot run these
    inputs gives an error row, not a time), and flash-attn's packed-qkv kernel where flash_attn is installed (CUDA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip

    def pinned(kind):
        def fn(qkv):
            with sdpa_kernel([kind]):
                return _sdpa_from_packed(qkv)

        return fn

    out = {f"sdpa[{name}]": pinned(kinds[name]) for name in SDPA_BACKENDS}
    if device.type == "cuda":
        try:
            from flash_attn import flash_attn_qkvpacked_func  # [B, N, 3, H, hd] in, [B, N, H, hd] out
        except ImportError:
            print("flash_attn not installed: no flash-attn row", file=sys.stderr)
        else:
            out["flash_attn"] = lambda qkv: flash_attn_qkvpacked_func(qkv).flatten(2)
    return out


def timer(device: torch.device, reps: int):
    """Returns measure(fn) -> (median, p20, p80) in ms: triton's do_bench on CUDA, a perf_counter loop on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        def measure(fn):
            med, p20, p80 = do_bench(fn, warmup=25, rep=max(reps, 20) * 5, quantiles=[0.5, 0.2, 0.8])
            return med, p20, p80

        return measure

    def measure_cpu(fn):
        for _ in range(2):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
        return statistics.median(times), q[0], q[-1]

    return measure_cpu


def graph_timer(device: torch.device, enabled: bool = True):
    """On CUDA (and ``enabled``): measure(fn) -> median ms with the calls replayed from a CUDA graph (kernel time
    without Python and launch overhead, which at these sizes can exceed the kernel itself); None elsewhere, and for
    the rest of the run once a capture has failed (a failed capture can leave the CUDA state unusable for more)."""
    if device.type != "cuda" or not enabled:
        return lambda fn: None
    from triton.testing import do_bench_cudagraph

    failed: list[str] = []

    def measure(fn):
        if failed:
            return None
        try:
            return do_bench_cudagraph(fn, rep=20, return_mode="median")
        except Exception as e:  # a closure that cannot be captured: report, keep the other columns
            failed.append(f"{type(e).__name__}: {e}")
            print(f"CUDA graph capture failed ({failed[0]}); no more graph timings in this run", file=sys.stderr)
            return None

    return measure


def passes(fn: Callable, inputs: list) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """The three timed closures for fn(*inputs): forward (graph built, as in training), backward alone on a kept
    graph, forward + backward; and, for CUDA-graph replay, forward and forward + backward on fresh copies of the
    leaves that nothing has run on yet (a leaf's gradient accumulator lives on the stream of its first backward: one
    made outside the capture invalidates it)."""
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def fwd():
        return fn(*inputs)

    if not leaves:  # a target (hog_target, low_pass_target): nothing to differentiate, the forward only
        return {"fwd": fwd}, {"fwd": fwd}
    out = fwd()
    outs = out if isinstance(out, tuple) else (out,)  # every output gets a gradient (add_layer_norm: y and s)
    # from a CPU generator: CUDA's random state may be unusable after a failed graph capture (graph_timer)
    gen = torch.Generator().manual_seed(0)
    grad_out = tuple(torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs)

    def bwd():
        torch.autograd.grad(outs, leaves, grad_out, retain_graph=True)

    def fwd_bwd():
        torch.autograd.grad(fn(*inputs), leaves, grad_out)

    fresh = [x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor) and x.requires_grad else x
             for x in inputs]  # fmt: skip
    fresh_leaves = [x for x in fresh if isinstance(x, torch.Tensor) and x.requires_grad]

    def graph_fwd():
        return fn(*fresh)

    def graph_fwd_bwd():
        torch.autograd.grad(fn(*fresh), fresh_leaves, grad_out)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}, {"fwd": graph_fwd, "fwd+bwd": graph_fwd_bwd}


def host_us(fn: Callable, device: torch.device, calls: int = 20) -> float | None:
    """Host time per call on a GPU, in us: ``calls`` calls issued back to back without a sync (the launch queue holds
    them while the GPU runs behind), timed on the host clock. None on CPU, where host time is the whole time."""
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize(device)
    return round((t1 - t0) / calls * 1e6, 1)


def peak_extra_mb(fn: Callable, device: torch.device) -> float | None:
    """Memory the call allocates beyond what existed before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    ap.add_argument(
        "--batch-size", type=positive_int, default=None, help="default: 256 on a GPU (MAE ViT-B/16), 32 on CPU"
    )
    ap.add_argument("--img-size", type=positive_int, default=224)
    ap.add_argument("--patch-size", type=positive_int, default=16)
    ap.add_argument("--encoder-dim", type=positive_int, default=768)
    ap.add_argument("--decoder-dim", type=positive_int, default=512)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--fp32", action="store_true", help="fp32 activations on a GPU too (default: bf16 as autocast)")
    ap.add_argument("--reps", type=positive_int, default=None,
                    help="CPU: timed repetitions (default 10); GPU: the timing budget of triton's do_bench, 5 ms per "
                    "rep and at least 100 ms (default 20: 100 ms)")  # fmt: skip
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) column")
    ap.add_argument("--cuda-graph", action="store_true", help="also time each pass replayed from a CUDA graph")
    ap.add_argument(
        "--compiled-fused",
        action="store_true",
        help=f"also time the fused ops compiled, opaque and as Triton twins ({', '.join(TWIN_OPS)})",
    )
    ap.add_argument("--out", default=None, type=out_file, help="append the JSON rows to this file")
    args = ap.parse_args(argv)

    device = checked_device(ap, args.device)
    if args.img_size % args.patch_size:
        ap.error(f"--img-size {args.img_size} is not a multiple of --patch-size {args.patch_size}")
    if not 0 < args.mask_ratio < 1:
        ap.error(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    if args.cuda_graph and device.type != "cuda":
        ap.error("--cuda-graph times CUDA-graph replays: it needs a CUDA device")
    if args.compiled_fused and args.no_compile:
        ap.error("--compiled-fused times the fused ops under torch.compile: leave out --no-compile")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if not ops:
        ap.error(f"--ops names no op; choose from {OPS}")
    if unknown:
        ap.error(f"unknown ops {unknown}; choose from {OPS}")
    b = args.batch_size or (256 if device.type == "cuda" else 32)
    reps = args.reps or (20 if device.type == "cuda" else 10)
    torch.manual_seed(0)
    measure, measure_graph = timer(device, reps), graph_timer(device, args.cuda_graph)
    env = environment(device)
    copy_gbps = copy_bandwidth(device, lambda fn: measure(fn)[0], 1024 if device.type == "cuda" else 256)
    write_row({"benchmark": "ops", "op": "copy", "impl": "torch copy_", "gbps": round(copy_gbps, 1), **env}, args.out)
    lowp = device.type == "cuda" and not args.fp32
    cases = build_cases(ops, b, args.img_size, args.patch_size, args.encoder_dim, args.decoder_dim,
                        args.mask_ratio, device, lowp)  # fmt: skip
    table = []
    for case in cases:
        # impl -> (function, forced backend, compiled-ops mode)
        impls: dict[str, tuple[Callable, str | None, str | None]] = {
            f"fastmim[{name}]": (case.fused, name, None) for name in case.fused_backends(device)
        }
        impls["eager"] = (case.ref, None, None)
        for name, fn in case.baselines.items():
            impls[name] = (fn, None, None)
        if not args.no_compile:
            torch._dynamo.reset()
            impls["compiled"] = (torch.compile(case.ref), None, None)
            if args.compiled_fused and case.op in TWIN_OPS.values():
                for mode in ("opaque", "triton"):  # traced at the first call, under the mode set then
                    impls[f"fastmim+compile[{mode}]"] = (torch.compile(case.fused), None, mode)
        times: dict[tuple[str, str], float] = {}
        for impl, (fn, backend, mode) in impls.items():
            prev = set_backend(backend) if backend else None
            prev_mode = set_compiled_ops(mode) if mode else None
            try:
                if impl in case.baselines:  # a kernel that cannot run these inputs (SDPA's flash on fp32, ...)
                    try:
                        fn(*case.inputs)
                    except RuntimeError as e:
                        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                        print(f"{case.op} {impl}: cannot run here ({why})", file=sys.stderr)
                        write_row({"benchmark": "ops", "op": case.op, "impl": impl, "shape": case.shape,
                                   "dtypes": case.dtypes, "error": why, **env}, args.out)  # fmt: skip
                        continue
                closures, graph_closures = passes(fn, case.inputs)
                for pas, closure in closures.items():
                    med, p20, p80 = measure(closure)
                    times[(impl, pas)] = med
                    nbytes = {"fwd": case.bytes_fwd, "bwd": case.bytes_bwd}.get(pas, case.bytes_fwd + case.bytes_bwd)
                    gbps = nbytes / (med * 1e-3) / 1e9
                    row = {"benchmark": "ops", "op": case.op, "pass": pas, "impl": impl, "shape": case.shape,
                           "dtypes": case.dtypes, "ms_median": round(med, 4), "ms_p20": round(p20, 4),
                           "ms_p80": round(p80, 4), "host_us": host_us(closure, device),
                           "peak_extra_mb": peak_extra_mb(closure, device), "gbps": round(gbps, 1),
                           "fraction_of_copy_bw": round(gbps / copy_gbps, 3), **env}  # fmt: skip
                    # the backward alone would replay the graph of a forward run outside the capture, on another
                    # stream: capturing it invalidates the capture (seen on the H200); fwd and fwd+bwd only
                    graph_ms = measure_graph(graph_closures[pas]) if pas in graph_closures else None
                    if graph_ms is not None:  # CUDA: the same pass replayed from a CUDA graph
                        row["ms_graph"] = round(graph_ms, 4)
                        row["gbps_graph"] = round(nbytes / (graph_ms * 1e-3) / 1e9, 1)
                        row["fraction_of_copy_bw_graph"] = round(nbytes / (graph_ms * 1e-3) / 1e9 / copy_gbps, 3)
                    print(f"{case.op} {pas} {impl}: {med:.3f} ms", file=sys.stderr)
                    table.append(row)
            finally:
                if backend:
                    set_backend(prev)
                if mode:
                    set_compiled_ops(prev_mode)
        for row in table:
            if row["op"] == case.op and row["impl"].startswith("fastmim"):
                row["speedup_vs_eager"] = round(times[("eager", row["pass"])] / row["ms_median"], 3)
                if ("compiled", row["pass"]) in times:
                    row["speedup_vs_compiled"] = round(times[("compiled", row["pass"])] / row["ms_median"], 3)
                for name in case.baselines:
                    if (name, row["pass"]) in times:
                        key = "speedup_vs_" + name.replace("[", "_").rstrip("]")  # speedup_vs_sdpa_flash
                        row[key] = round(times[(name, row["pass"])] / row["ms_median"], 3)
        for row in table:
            if row["op"] == case.op:
                write_row(row, args.out)  # as each op finishes: a run cut short keeps what it measured
    print(f"\ncopy bandwidth {copy_gbps:.0f} GB/s on {env['device']}")
    print(f"{'op':17} {'pass':8} {'impl':18} {'median ms':>10} {'host us':>8} {'GB/s':>8} {'x eager':>8} "
          f"{'x compiled':>10} {'graph ms':>9} {'graph GB/s':>10}")  # fmt: skip

    def cell(v):
        return "" if v is None else v

    for r in table:
        print(f"{r['op']:17} {r['pass']:8} {r['impl']:18} {r['ms_median']:10.3f} {cell(r['host_us']):>8} "
              f"{r['gbps']:8.1f} {cell(r.get('speedup_vs_eager')):>8} {cell(r.get('speedup_vs_compiled')):>10} "
              f"{cell(r.get('ms_graph')):>9} {cell(r.get('gbps_graph')):>10}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
