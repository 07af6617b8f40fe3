"""torch.compile's mode for ``--compile``: chosen by measurement, per torch version and device type.

``--compile-mode auto`` (the default) takes the mode that measured fastest for this torch version (major.minor) and
device type in the committed results named by ``BEST_COMPILE_MODE_SOURCE`` (benchmarks/gpu_suite.sh, step
``compile_modes``, times MAE ViT-B/16 in every mode); a torch version with no measurement gets inductor's default
mode, and the run says so, so a version whose mode regresses is found by measuring it, never assumed to behave like
another.
"""

from __future__ import annotations

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# the modes that record inductor's own CUDA graphs: they cannot run inside the whole step's graph (--cuda-graph)
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")

# (torch major.minor, device type) -> the mode with the highest img/s in the source's throughput rows of that torch
# version (MAE ViT-B/16, fastmim+compile). Empty until a GPU run has timed the modes.
BEST_COMPILE_MODE_SOURCE: str | None = None
BEST_COMPILE_MODE: dict[tuple[str, str], str] = {}


def torch_minor(version: str = torch.__version__) -> str:
    """'2.11.0+cu130' -> '2.11'."""
    return ".".join(version.split("+")[0].split(".")[:2])


def resolve_compile_mode(
    mode: str, device: torch.device, cuda_graph: bool = False, version: str = torch.__version__
) -> tuple[str, str]:
    """(the mode to pass torch.compile, why it was chosen). ``mode`` is one of COMPILE_MODES or "auto"."""
    if mode != "auto":
        if mode not in COMPILE_MODES:
            raise ValueError(f"--compile-mode {mode!r}: expected auto or one of {', '.join(COMPILE_MODES)}")
        if cuda_graph and mode in CUDAGRAPH_MODES:
            raise ValueError(
                f"--compile-mode {mode} records inductor's own CUDA graphs, which cannot be captured inside the "
                "whole step's graph of --cuda-graph: use default or max-autotune-no-cudagraphs"
            )
        return mode, "asked for"
    key = (torch_minor(version), device.type)
    best = BEST_COMPILE_MODE.get(key)
    if best is None:
        return "default", f"auto: no measurement of the modes for torch {key[0]} on {key[1]} yet"
    if cuda_graph and best in CUDAGRAPH_MODES:
        return "default", f"auto: {best} measured fastest for torch {key[0]} on {key[1]}, but --cuda-graph captures"
    return best, f"auto: measured fastest for torch {key[0]} on {key[1]} ({BEST_COMPILE_MODE_SOURCE})"


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    return torch.compile(model, mode=None if mode == "default" else mode)
