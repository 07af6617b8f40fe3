"""End-to-end pretraining throughput: whole training steps of a recipe in several modes, side by side in one process.

    python benchmarks/throughput.py --recipe mae --model vit_base_patch16 --batch-size 256 --amp bf16
    python benchmarks/throughput.py --model vit_large_patch16 --batch-size 128 --modes fastmim+compile --profile
    python benchmarks/throughput.py --model vit_base_patch16 --data /data/imagenet/train   # data-bound img/s

A step is forward, backward and the optimizer (fused AdamW, MAE's groups). Modes, each on a fresh model built from
the same seed:

  reference          the straightforward PyTorch implementation the recipe's paper describes (benchmarks/recipes.py)
  fastmim            the recipe on fastmim.ops (fused gather, decoder-input scatter, loss)
  reference+compile  the reference under torch.compile (--compile-mode)
  fastmim+compile    fastmim under torch.compile
  MODE+graph         any of them with the whole step (forward, backward, optimizer) replayed from CUDA graphs, as
                     ``--cuda-graph`` trains (fastmim.train.step.TrainStep): 3 eager steps, the capture, then replays;
                     masks are drawn outside the graph each step and copied in, as the trainer does (on CPU the same
                     code runs uncaptured)

Images are synthetic and already on the device unless --data names an image folder: then each step takes the next
batch from fastmim's loader and img/s is what that data path sustains: --loader torch decodes and augments in worker
processes (pinned host memory), torch-gpu (the default on CUDA) decodes on the GPU (nvJPEG) and augments there, the
row saying where the loader's time went (``loader_ms_per_batch``). --also-synthetic times each mode on synthetic
images first and gives the real-data run's wall img/s over the synthetic one's (``real_over_synthetic``; target
>= 0.90). Reports per mode: img/s (median over the timed steps after warm-up; on CUDA each step is
the interval between consecutive CUDA events, so it includes any wait for the host or the data), p20/p80, img/s
over the whole timed span, model FLOPs per image (recipes.py's formula, checked against torch.utils.flop_counter's
count of one step), achieved TFLOP/s, MFU against the bf16 dense peak (--peak-tflops, else a measured large
matmul), the step's floor (its matmul FLOPs at the matmul rate measured in the same run, never the given spec peak,
plus the bytes it must move, 44 per trainable parameter, at the measured copy bandwidth; activations left out, so a
lower bound) and the step's time over it (`floor_gap`),
peak memory (CUDA), the first step's time (compilation), graph breaks, and speedups over the reference modes before
it (all ratios are printed at the end). One JSON row per mode (device, versions, commit, date) goes to stdout
and --out as soon as the mode is done. --profile adds a torch.profiler trace per mode and prints the top kernels by
time and a breakdown by kind (matmul, attention, Triton, elementwise, ...).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import checked_device, copy_bandwidth, environment, out_file, write_row  # noqa: E402
from benchmarks.recipes import RECIPES, core_model, get_recipe  # noqa: E402
from fastmim.data.folder import usable_cpus  # noqa: E402
from fastmim.masking import MaskInfo  # noqa: E402
from fastmim.models.vit import set_grad_ckpt  # noqa: E402
from fastmim.ops._dispatch import COMPILED_OPS, compiled_ops, set_compiled_ops  # noqa: E402
from fastmim.train.compile_mode import COMPILE_MODES, CUDAGRAPH_MODES, compile_model  # noqa: E402
from fastmim.train.fsdp import init_single_process_group, shard_model  # noqa: E402
from fastmim.train.optim import build_adamw  # noqa: E402
from fastmim.train.step import TrainStep  # noqa: E402

MODES = ("reference", "fastmim", "reference+compile", "fastmim+compile")  # the default --modes
TARGET_REAL_OVER_SYNTHETIC = 0.90  # --data --also-synthetic: real-data img/s over synthetic, same mode
GRAPH_MODES = tuple(f"{m}+graph" for m in MODES)
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# kernel-name patterns, first match wins: where the device time of a step goes
KERNEL_KINDS = (
    ("attention", r"flash|fmha|attention|sdpa"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|sm\d+_|addmm|\bmm\b|matmul|linear|conv"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    # fastmim.ops' Triton kernels (fastmim/ops/triton) and its C++ ops on CPU
    ("fastmim.ops", r"fastmim|_masked_loss_|_gather_rows_|_invert_ids_|_scatter_back_|_scatter_masked_|_patch_copy_"),
    ("triton (inductor)", r"triton"),
    ("gather/scatter/index", r"gather|scatter|index"),
    ("norm", r"layer_norm|layernorm|norm"),
    ("copy/memset", r"(^|[^a-z])cat|copy|memcpy|memset|fill"),
)


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES + GRAPH_MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {bad or text!r}; choose from {', '.join(MODES + GRAPH_MODES)}"
        )
    return list(dict.fromkeys(modes))


def parse_model_arg(text: str) -> tuple[str, object]:
    from fastmim.config import key_value

    try:
        return key_value(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="mae", choices=sorted(RECIPES))
    ap.add_argument("--model", default=None, help="encoder name, the recipe prefix optional (default: "
                    "vit_base_patch16; convnextv2_base for fcmae)")  # fmt: skip
    ap.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=parse_model_arg,
        help="a model keyword argument, e.g. depth=2 or mask_ratio=0.6 (repeatable)",
    )
    ap.add_argument(
        "--grad-ckpt", action="store_true", help="per-block activation checkpointing (the trainer's --grad-ckpt)"
    )
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 over a group of one process: FSDP's own cost")
    ap.add_argument("--batch-size", type=int, default=256, help="default 256")
    ap.add_argument("--img-size", type=int, default=224, help="default 224")
    ap.add_argument("--amp", choices=sorted(AMP), default="bf16", help="default bf16")
    ap.add_argument("--modes", type=parse_modes, default=list(MODES),
                    help=f"comma-separated, from {', '.join(MODES + GRAPH_MODES)} (default "
                    f"{','.join(MODES)})")  # fmt: skip
    ap.add_argument("--compile-mode", choices=COMPILE_MODES, default="default", help="torch.compile's mode")
    ap.add_argument("--compiled-ops", choices=COMPILED_OPS, default=None,
                    help="how torch.compile sees the fused ops: opaque custom ops, or their Triton kernels launched by "
                    "inductor, or auto: per op, whichever measured faster (fastmim.ops.set_compiled_ops; default: "
                    "FASTMIM_COMPILED_OPS, else auto)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation in the first (default 5)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default=None, help="an image folder: feed the real loader instead of synthetic images")
    ap.add_argument("--workers", type=int, default=None, help="loader workers with --data (default: per CPU count)")
    ap.add_argument("--loader", choices=("auto", "torch", "torch-gpu"), default="auto", help="with --data: torch "
                    "(decode in the workers), torch-gpu (decode on the GPU) or auto (torch-gpu on CUDA)")  # fmt: skip
    ap.add_argument("--also-synthetic", action="store_true", help="with --data: time each mode on synthetic images "
                    "too, first, and report real-data img/s over synthetic (target >= 0.90)")  # fmt: skip
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for MFU; else measured")
    ap.add_argument(
        "--peak-matmul-size",
        type=int,
        default=None,
        help="side of the measuring matmul (default 8192 on a GPU, 1024 on CPU)",
    )
    ap.add_argument("--no-flop-count", action="store_true", help="skip torch.utils.flop_counter's count of a step")
    ap.add_argument("--profile", action="store_true", help="profile --profile-steps steps of each mode")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--profile-dir", default="benchmarks/profiles", help="where the traces (.json.gz) go")
    ap.add_argument("--top", type=int, default=15, help="kernels listed per profiled mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, type=out_file, help="append the JSON rows to this file")
    return ap


def model_kwargs(args) -> dict:
    return {"img_size": args.img_size, **dict(args.model_arg)}


def check_args(ap: argparse.ArgumentParser, args) -> None:
    graphs = [m for m in args.modes if m.endswith("+compile+graph")]
    if graphs and args.compile_mode in CUDAGRAPH_MODES:
        ap.error(
            f"--compile-mode {args.compile_mode} records inductor's own CUDA graphs, which cannot be captured inside "
            f"the whole step's graph of {', '.join(graphs)}: use default or max-autotune-no-cudagraphs"
        )
    if args.compile_mode != "default" and not any("+compile" in m for m in args.modes):  # (was ignored, unsaid)
        ap.error(f"--compile-mode {args.compile_mode} applies to the compiled modes; --modes {','.join(args.modes)} "
                 "has none")  # fmt: skip
    for name in ("batch_size", "img_size", "steps", "profile_steps", "top"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be 0 or more, got {args.warmup}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        ap.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    checked_device(ap, args.device)  # (tpu, meta: one line, not a traceback)
    if args.peak_matmul_size is not None and args.peak_matmul_size < 1:
        ap.error(f"--peak-matmul-size must be at least 1, got {args.peak_matmul_size}")
    if args.workers is not None and args.workers < 0:
        ap.error(f"--workers must be 0 or more, got {args.workers}")
    if args.amp == "fp16" and not args.device.startswith("cuda"):
        ap.error("--amp fp16 needs a CUDA device (CPU autocast runs bf16 or none)")
    if args.fsdp and (args.amp == "fp16" or any("+" in m for m in args.modes)):
        ap.error("--fsdp runs the eager modes (reference, fastmim) with --amp bf16 or none, as the trainer's --fsdp")
    recipe = get_recipe(args.recipe)
    args.model = args.model or recipe.default_model
    other = [r for r in RECIPES.values() if r is not recipe and args.model.startswith(r.model_prefix)]
    if other:  # another recipe's full name (fcmae_convnextv2_atto under the default --recipe mae)
        ap.error(f"--model {args.model} is a {other[0].name} model: add --recipe {other[0].name} (and --model "
                 f"{args.model.removeprefix(other[0].model_prefix)} or the full name)")  # fmt: skip
    if args.data is not None and not Path(args.data).is_dir():  # before the peak and the FLOP count are measured
        ap.error(f"--data {args.data!r} " + ("is not a folder of images" if Path(args.data).exists() else
                                               "does not exist"))  # fmt: skip
    if args.data is None and (args.also_synthetic or args.workers is not None or args.loader != "auto"):
        ap.error("--also-synthetic, --workers and --loader are for --data (the default feeds synthetic images)")


# --- timing -------------------------------------------------------------------------------------------------------


class StepTimer:
    """Per-step times in seconds. CUDA: an event at every step boundary, read once at the end, so timing adds no host
    sync and each interval includes any time the device waited for the host. CPU: perf_counter (execution is
    synchronous)."""

    def __init__(self, device: torch.device, steps: int):
        self.cuda = device.type == "cuda"
        self.marks = []
        self.steps = steps

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def times(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]
        return [b - a for a, b in itertools.pairwise(self.marks)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Dense matmul TFLOP/s of one size^3 product in ``dtype`` (median of 10 after warm-up): the faster of ``a @ b``
    and ``F.linear`` (the model's own call; on a CPU without bf16 units a bf16 ``a @ b`` runs ~20x slower than a bf16
    linear's oneDNN path, which put the model above "100% MFU")."""
    import torch.nn.functional as F

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    for fn in (lambda: a @ b, lambda: F.linear(a, b)):
        for _ in range(3):
            fn()
        timer = StepTimer(device, 10)
        sync(device)
        for _ in range(10):
            timer.mark()
            fn()
        timer.mark()
        best = max(best, 2.0 * size**3 / statistics.median(timer.times()) / 1e12)
    return best


def median_ms(device: torch.device, fn, reps: int = 10) -> float:
    """Median time of fn in ms over ``reps`` calls after 3 warm-ups (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    timer = StepTimer(device, reps)
    sync(device)
    for _ in range(reps):
        timer.mark()
        fn()
    timer.mark()
    return statistics.median(timer.times()) * 1e3


# The bytes a training step cannot avoid moving, per trainable fp32 parameter: the forward reads the weight, the
# backward reads it again and writes its gradient, fused AdamW reads the weight, the gradient and both moments and
# writes the weight and both moments: 11 accesses of 4 bytes. Activations are left out, so this is a lower bound.
BYTES_PER_PARAM = 11 * 4


def step_floor(flops_per_step: float, params: int, peak_tflops: float, copy_gbps: float) -> dict:
    """The step's floor: its matmul FLOPs at the matmul rate measured in the same run (not the spec sheet's peak, which
    no matmul reaches) plus the bytes it must move at the copy bandwidth measured in the same run."""
    matmul_ms = flops_per_step / (peak_tflops * 1e12) * 1e3
    nbytes = params * BYTES_PER_PARAM
    bytes_ms = nbytes / (copy_gbps * 1e9) * 1e3

    def sig(x: float) -> float:
        return float(f"{x:.5g}")

    return {"floor_ms": sig(matmul_ms + bytes_ms), "floor_matmul_ms": sig(matmul_ms), "floor_bytes_ms": sig(bytes_ms),
            "floor_bytes_gb": sig(nbytes / 1e9)}  # fmt: skip


def flop_check(recipe, model_name: str, args, device: torch.device, dtype) -> dict:
    """torch.utils.flop_counter's count of one image's training step beside the formula's, for the same pass (batch
    1, the model built with the recipe's count_kwargs, e.g. explicit attention matmuls so that every device counts
    them; forward only where the counter's backward is not comparable). Norms, activations and the optimizer count
    in neither."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(args.seed)
    model = recipe.build(model_name, "fastmim", **{**model_kwargs(args), **recipe.count_kwargs}).to(device)
    imgs = torch.randn(1, 3, args.img_size, args.img_size, device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(imgs)[0]
        if recipe.count_backward:
            loss.backward()
    formula = recipe.flops(model, forward_only=not recipe.count_backward)
    return {"pass": "fwd+bwd" if recipe.count_backward else "fwd", "formula_gflop": float(f"{formula / 1e9:.5g}"),
            "counted_gflop": float(f"{counter.get_total_flops() / 1e9:.5g}")}  # fmt: skip


# --- data ---------------------------------------------------------------------------------------------------------


def make_batches(args, device: torch.device, real: bool | None = None):
    """Returns (next_batch() -> images on the device, description, the loader's stats or None): one fixed synthetic
    batch, or (``real``: default when --data is given) the real loader, cycled."""
    if not (args.data is not None if real is None else real):
        g = torch.Generator().manual_seed(args.seed)
        imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
        return lambda: imgs, "synthetic", None

    from fastmim.data import ImageFolderDataset, build_pretrain_loader, default_num_workers, pretrain_transform

    kind = data_loader_kind(args, device)
    dataset = ImageFolderDataset(args.data, transform=pretrain_transform(args.img_size), seed=args.seed)
    workers = args.workers if args.workers is not None else default_num_workers()
    stats = None
    if kind == "torch-gpu":
        from fastmim.data.gpu_decode import EncodedImages, GpuDecodeLoader, collate_encoded

        encoded, sampler = build_pretrain_loader(EncodedImages(dataset), args.batch_size, workers, seed=args.seed,
                                                 collate_images=collate_encoded)  # fmt: skip
        loader = GpuDecodeLoader(encoded, dataset, device, args.img_size, seed=args.seed)
        stats = loader.stats
    else:
        loader, sampler = build_pretrain_loader(dataset, args.batch_size, workers, seed=args.seed,
                                                pin_memory=device.type == "cuda")  # fmt: skip
    state = {"it": None, "epoch": -1}

    def next_batch():
        while True:
            if state["it"] is None:
                state["epoch"] += 1
                sampler.set_epoch(state["epoch"])
                dataset.set_epoch(state["epoch"])
                state["it"] = iter(loader)
            try:
                x = next(state["it"])
                break
            except StopIteration:
                state["it"] = None
        x = x[0] if isinstance(x, list | tuple) else x
        return x.to(device, non_blocking=True)

    return next_batch, f"{args.data} ({len(dataset)} images, loader {kind}, {workers} workers)", stats


MIN_TRUSTED_STEPS = 5  # fewer timed steps: DOUBTFUL
MAX_SPREAD = 1.25  # p80 above this times p20: DOUBTFUL


def sanity_notes(row: dict, device_type: str) -> list[str]:
    """What makes a row's numbers doubtful: faster than its floor or above 100% MFU (the peak or the bandwidth was
    measured while other work loaded the machine, or the spec peak is wrong), too few timed steps or step times
    spread wide, or a CPU run on a machine busier than its cores (OpenMP threads then wait for each other: the
    timings depend on what else ran)."""
    notes = []
    if row.get("floor_gap") is not None and row["floor_gap"] < 1:
        notes.append("DOUBTFUL: faster than its floor (the peak or copy rate was measured under other load?)")
    elif row.get("mfu") is not None and row["mfu"] > 1:
        notes.append("DOUBTFUL: above 100% MFU (a --peak-tflops below the device's, or a peak measured under load)")
    if row.get("steps") is not None and row["steps"] < MIN_TRUSTED_STEPS:
        notes.append(f"DOUBTFUL: {row['steps']} timed step(s): a median and p20/p80 of so few say little (--steps "
                     f"{MIN_TRUSTED_STEPS * 2} or more)")  # fmt: skip
    p20, p80 = row.get("step_ms_p20"), row.get("step_ms_p80")
    if p20 and p80 and p80 > MAX_SPREAD * p20:  # (committed rows: at most 1.15x; a GPU's 1.01x)
        notes.append(f"DOUBTFUL: step times spread from {p20:g} ms (p20) to {p80:g} ms (p80): something else ran, "
                     "or the steps differ (more --steps, an idle machine)")  # fmt: skip
    others = row.get("host_load_1m", 0) - row.get("host_threads", 0)  # the load beyond this run's own threads
    if device_type == "cpu" and others > 0.5 * row.get("host_cpus", 1e9):
        notes.append(f"DOUBTFUL: load {row['host_load_1m']} on {row['host_cpus']} CPUs, {others:.1f} beyond this "
                     "run's threads (rerun on an idle machine, or with OMP_NUM_THREADS=1)")  # fmt: skip
    return notes


def data_loader_kind(args, device: torch.device) -> str:
    """--loader, or by default torch-gpu where torchvision decodes JPEGs on the device, else torch."""
    if args.loader != "auto":
        return args.loader
    if device.type == "cuda":
        from fastmim.data.gpu_decode import gpu_decode_problem

        if gpu_decode_problem(device) is None:
            return "torch-gpu"
    return "torch"


# --- profile ------------------------------------------------------------------------------------------------------


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, low):
            return kind
    return "elementwise/other"


def profile_steps(step, device: torch.device, steps: int, trace_path: Path, top: int) -> dict:
    """Runs ``steps`` steps under torch.profiler, writes a Chrome trace, returns the top kernels (CUDA; CPU ops on
    CPU) by self time per step and the time per kind."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))
    events = prof.key_averages()

    def device_time(e):  # microseconds; older torch names it cuda
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    if device.type == "cuda":
        kernels = [e for e in events if "CUDA" in str(getattr(e, "device_type", "")) and device_time(e) > 0]
        kernels = kernels or [e for e in events if device_time(e) > 0]
        timed = [(e.key, device_time(e), e.count) for e in kernels]
    else:
        timed = [(e.key, e.self_cpu_time_total, e.count) for e in events if e.self_cpu_time_total > 0]
    total = sum(t for _, t, _ in timed) or 1.0
    timed.sort(key=lambda r: -r[1])
    kinds: dict[str, float] = {}
    for name, t, _ in timed:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + t
    return {
        "trace": str(trace_path),
        "device": device.type,
        "time_per_step_ms": round(total / steps / 1e3, 3),
        "top": [
            {
                "name": name[:160],
                "ms_per_step": round(t / steps / 1e3, 3),
                "pct": round(100 * t / total, 1),
                "calls_per_step": round(n / steps, 1),
                "kind": kernel_kind(name),
            }
            for name, t, n in timed[:top]
        ],  # fmt: skip
        "kinds_pct": {k: round(100 * v / total, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
    }


def print_profile(tag: str, prof: dict) -> None:
    what = "kernel time" if prof["device"] == "cuda" else "self CPU time of ops"
    print(f"\n--- {tag}: {prof['time_per_step_ms']:.2f} ms {what} per step; trace {prof['trace']}", file=sys.stderr)
    print("    by kind: " + ", ".join(f"{k} {v}%" for k, v in prof["kinds_pct"].items()), file=sys.stderr)
    for r in prof["top"]:
        print(f"    {r['ms_per_step']:8.3f} ms {r['pct']:5.1f}%  x{r['calls_per_step']:<6g} {r['name'][:110]}",
              file=sys.stderr)  # fmt: skip


# --- one mode -----------------------------------------------------------------------------------------------------


def graph_break_count() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    except Exception:  # private API; its absence must not fail a benchmark
        return None


def run_mode(
    mode: str,
    recipe,
    model_name: str,
    args,
    device: torch.device,
    next_batch,
    fpi: float,
    peak: float,
    copy_gbps: float,
    matmul_tflops: float,
    feed: str = "synthetic",
):
    """Builds, warms up and times one mode; returns its row. ``peak``: the TFLOP/s that MFU divides by (the spec when
    given); ``matmul_tflops``: the matmul rate measured on this device in this run, which the floor uses; ``feed``:
    synthetic or real (--data), in the profile's name."""
    impl, *flags = mode.split("+")
    compiled, graph = "compile" in flags, "graph" in flags
    dtype = AMP[args.amp]
    torch.manual_seed(args.seed)
    model = recipe.build(model_name, impl, **model_kwargs(args)).to(device)
    if args.grad_ckpt:
        set_grad_ckpt(model)
    if args.fsdp:
        init_single_process_group(device)
        shard_model(model, dtype)
    opt = build_adamw(model, 1.5e-4, 0.05, graph=graph)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # as the trainer does for fp16
    fwd = model
    if compiled:
        torch._dynamo.reset()
        fwd = compile_model(model, args.compile_mode)
    core = core_model(model)
    # a graph replays what the host decided at capture: masks drawn on the host (a seed) come in as inputs; the
    # paper's reference draws its noise on the device, which a replay redraws
    masks_outside = graph and core is model and hasattr(core, "make_mask")

    def forward(imgs, *mask):
        return fwd(imgs, mask=MaskInfo(*mask))[0] if mask else fwd(imgs)[0]

    runner = TrainStep(forward, model.parameters(), opt, scaler, device=device, amp_dtype=dtype, graph=graph)

    def step():
        imgs = next_batch()
        if masks_outside:
            return runner(imgs, *core.make_mask(imgs.shape[0], device))
        return runner(imgs)

    t0 = time.perf_counter()
    first_loss = step()
    sync(device)
    first_step_s = time.perf_counter() - t0
    if not torch.isfinite(first_loss).item():
        raise FloatingPointError(f"mode {mode}: the first step's loss is {first_loss.item()}")
    # a graph mode runs its eager warm-up steps and the capture before anything is timed
    warmup = max(args.warmup, runner.warmup + 2 if graph else 0)
    for _ in range(warmup - 1):
        step()
    sync(device)
    if runner.capture and runner.captured == 0:
        raise RuntimeError(f"mode {mode}: no step was captured during the warm-up")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(device, args.steps)
    wall0 = time.perf_counter()
    for _ in range(args.steps):
        timer.mark()
        loss = step()
    timer.mark()
    times = timer.times()
    wall = time.perf_counter() - wall0
    if os.environ.get("FASTMIM_BENCH_DEBUG"):
        print(f"  {mode} step times (ms): {[round(t * 1e3, 2) for t in times]}", file=sys.stderr)
    med = statistics.median(times)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [med] * 4
    ips = args.batch_size / med
    row = {
        "benchmark": "throughput", "recipe": recipe.name, "model": model_name, "mode": mode,
        "model_args": dict(args.model_arg) or None,
        "grad_ckpt": args.grad_ckpt, "fsdp": args.fsdp,
        "compile_mode": args.compile_mode if compiled else None, "cuda_graph": runner.capture,
        "compiled_ops": compiled_ops() if compiled else None,
        "batch_size": args.batch_size,
        "img_size": args.img_size, "amp": args.amp, "steps": args.steps, "warmup": max(warmup, 1),
        "img_per_s": float(f"{ips:.5g}"), "img_per_s_wall": float(f"{args.batch_size * args.steps / wall:.5g}"),
        "step_ms_median": round(med * 1e3, 2), "step_ms_p20": round(q[0] * 1e3, 2),
        "step_ms_p80": round(q[-1] * 1e3, 2), "first_step_s": round(first_step_s, 2),
        "gflop_per_img": float(f"{fpi / 1e9:.5g}"), "achieved_tflops": float(f"{fpi * ips / 1e12:.4g}"),
        "mfu": float(f"{fpi * ips / (peak * 1e12):.4g}"),
        "loss": round(float(loss.detach()), 5),
    }  # fmt: skip
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row.update(step_floor(fpi * args.batch_size, params, matmul_tflops, copy_gbps))
    row["floor_gap"] = float(f"{med * 1e3 / row['floor_ms']:.4g}")  # the step's time over its floor
    if compiled:
        row["graph_breaks"] = graph_break_count()
    if device.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if hasattr(os, "getloadavg"):  # the machine's load meanwhile (a CPU run shares its cores with everything else)
        row["host_load_1m"], row["host_cpus"] = round(os.getloadavg()[0], 2), usable_cpus()
        row["host_threads"] = torch.get_num_threads() + ((args.workers or 0) if args.data else 0)
    if args.profile:
        # (named by what sets it apart: two configurations of one model and batch overwrote each other's trace)
        extra = "".join(f"-{k}={v}" for k, v in sorted(dict(args.model_arg).items()))
        extra += f"-{args.compile_mode}" if compiled and args.compile_mode != "default" else ""
        extra = re.sub(r"[^\w.=-]", "_", extra + ("-real" if feed == "real" else ""))
        trace = Path(args.profile_dir) / (f"{model_name}-{args.img_size}px-b{args.batch_size}-{args.amp}{extra}-"
                                          f"{mode.replace('+', '_')}.json.gz")  # fmt: skip
        row["profile"] = profile_steps(step, device, args.profile_steps, trace, args.top)
        print_profile(mode, row["profile"])
    return row


def release(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_ratios(row: dict, done: list[dict]) -> None:
    """The row's img/s over each reference mode's measured before it (the default order measures them first)."""
    for base in done:
        if base["mode"] in ("reference", "reference+compile") and "img_per_s" in base and "img_per_s" in row:
            row[f"speedup_vs_{base['mode'].replace('+', '_')}"] = float(f"{row['img_per_s'] / base['img_per_s']:.4g}")


def print_summary(rows: list[dict]) -> None:
    """Every measured mode against every other, so the ratios are complete whatever the order of --modes."""
    ok = [r for r in rows if "img_per_s" in r]
    if len(ok) < 2:
        return
    print("\n  img/s ratios (row / column): " + "  ".join(f"{r['mode']:>17}" for r in ok), file=sys.stderr)
    for a in ok:
        cells = "  ".join(f"{a['img_per_s'] / b['img_per_s']:>17.2f}" for b in ok)
        print(f"  {a['mode']:<28} {cells}", file=sys.stderr)


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    try:
        return measure(ap, args)
    except KeyboardInterrupt:  # (each mode's row is written whole when it ends: the file holds the finished ones)
        said = f" to {args.out}" if args.out else " (printed above; no --out)"
        print(f"interrupted: the modes that finished are written{said}; the one running was not", file=sys.stderr)
        return 130


def measure(ap: argparse.ArgumentParser, args) -> int:
    """Times ``args.modes`` (checked by ``check_args``), writing each mode's row as it ends."""
    if args.compiled_ops:
        set_compiled_ops(args.compiled_ops)
    recipe = get_recipe(args.recipe)
    model_name = recipe.model_name(args.model)
    device = torch.device(args.device)
    dtype = AMP[args.amp]
    try:  # a bad model name or size fails here, before anything is timed
        with torch.device("meta"):
            fpi = recipe.flops(recipe.build(model_name, "fastmim", **model_kwargs(args)))
    except ValueError as e:
        ap.error(str(e))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs (--amp none) as a GPU user would run them
        torch.backends.cudnn.allow_tf32 = True

    env = environment(device)
    common = {}
    size = args.peak_matmul_size or (8192 if device.type == "cuda" else 1024)
    peak_dtype = dtype or torch.float32
    common["peak_tflops_measured"] = float(f"{measure_peak_tflops(device, peak_dtype, size):.4g}")
    common["peak_measured_with"] = f"{str(peak_dtype).removeprefix('torch.')} matmul or linear {size}^3"
    common["peak_tflops"] = args.peak_tflops or common["peak_tflops_measured"]
    common["peak_source"] = "given" if args.peak_tflops else "measured"
    common["copy_gbps_measured"] = float(
        f"{copy_bandwidth(device, lambda fn: median_ms(device, fn), 1024 if device.type == 'cuda' else 128):.4g}"
    )
    if not args.no_flop_count:
        common["flop_check"] = check = flop_check(recipe, model_name, args, device, dtype)
        if check["pass"] == "fwd+bwd" and abs(check["formula_gflop"] - fpi / 1e9) > 1e-3 * check["formula_gflop"]:
            # (I-JEPA: the counted pass draws one set of target blocks; MFU uses the masks' expected counts)
            check["note"] = ("formula_gflop is the formula for the masks the counted pass drew; gflop_per_img, which "
                             "MFU uses, is the formula for the masks' expected counts")  # fmt: skip
        release(device)
    feeds = [make_batches(args, device, real=False)] if args.data is None or args.also_synthetic else []
    if args.data is not None:
        feeds.append(make_batches(args, device, real=True))
    print(f"{recipe.name} {model_name}, batch {args.batch_size}, {args.amp}, on {env['device']}: "
          f"{fpi / 1e9:.2f} GFLOP per image, peak {common['peak_tflops']} TFLOP/s ({common['peak_source']}), "
          f"data {' and '.join(desc for _, desc, _ in feeds)}", file=sys.stderr)  # fmt: skip

    rows = []
    for mode in args.modes:
        synthetic = None
        for next_batch, data_desc, stats in feeds:
            before = dict(stats) if stats is not None else None
            try:
                row = run_mode(
                    mode,
                    recipe,
                    model_name,
                    args,
                    device,
                    next_batch,
                    fpi,
                    common["peak_tflops"],
                    common["copy_gbps_measured"],
                    common["peak_tflops_measured"],
                    feed="synthetic" if data_desc == "synthetic" else "real",
                )
            except Exception as e:  # out of memory, a capture that fails, a non-finite loss: a row, and the next mode
                what = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
                row = {"benchmark": "throughput", "recipe": recipe.name, "model": model_name, "mode": mode,
                       "batch_size": args.batch_size, "amp": args.amp,
                       "error": f"{what}: {str(e)[:300]}"}  # fmt: skip
                if not isinstance(e, torch.cuda.OutOfMemoryError):
                    traceback.print_exc()
            release(device)
            row["data"] = data_desc
            if stats is not None:  # where the loader's time went over this mode's steps, per batch
                n = max(stats["batches"] - before["batches"], 1)
                row["loader_ms_per_batch"] = {k[:-2]: round(1000 * (stats[k] - before[k]) / n, 2) for k in stats
                                              if k.endswith("_s")}  # fmt: skip
            if data_desc == "synthetic":
                synthetic = row
            elif synthetic is not None and "img_per_s" in row and "img_per_s" in synthetic:
                row["synthetic_img_per_s_wall"] = synthetic["img_per_s_wall"]
                row["real_over_synthetic"] = float(f"{row['img_per_s_wall'] / synthetic['img_per_s_wall']:.4g}")
            add_ratios(row, [r for r in rows if r.get("data") == data_desc])
            rows.append(row)
            status = row.get("error") or (
                f"{row['img_per_s']:.1f} img/s, MFU {row['mfu']:.1%}, step {row['step_ms_median']:.1f} "
                f"ms = {row['floor_gap']:.2f}x its floor of {row['floor_ms']:.1f} ms"
            )
            for warning in sanity_notes(row, device.type):
                status += f"; {warning}"
            if mode.endswith("+graph") and "error" not in row and not row.get("cuda_graph"):
                status += " (uncaptured: CUDA graphs need a CUDA device; the same step code ran eagerly)"
            if "real_over_synthetic" in row:
                ok = "met" if row["real_over_synthetic"] >= TARGET_REAL_OVER_SYNTHETIC else "NOT met"
                if device.type != "cuda":  # (the target is a GPU's: here the decoding ran on the CPU, a dry run)
                    ok = "a GPU target, not judged on cpu"
                status += (
                    f"; real data {row['real_over_synthetic']:.1%} of synthetic (wall img/s; target >= "
                    f"{TARGET_REAL_OVER_SYNTHETIC:.0%}: {ok})"
                )
                if "loader_ms_per_batch" in row:  # (the torch-gpu loader times its parts)
                    status += f"; loader ms per batch {row['loader_ms_per_batch']}"
            tag = "synthetic" if data_desc == "synthetic" else "real data"
            print(f"  {mode:<18} {tag:<10} {status}", file=sys.stderr)
            # now: a later mode that fails or times out loses only itself
            write_row({**common, **env, **row}, args.out)  # the row's own keys win (compiled_ops None when eager)
    print_summary([r for r in rows if r.get("data") == feeds[-1][1]])
    if args.fsdp and torch.distributed.is_initialized():  # the group of one the FSDP modes made
        torch.distributed.destroy_process_group()
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
