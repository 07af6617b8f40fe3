"""One training micro-step, eager or replayed from CUDA graphs: forward under autocast, the scaled backward, and on
the last micro-batch of an optimizer step the unscale, gradient clipping, optimizer step, scaler update and zeroing.

The trainer and benchmarks/throughput.py both step through ``TrainStep``, so what is timed is what trains.

Graph mode (``graph=True``) captures each distinct call, (last micro-batch or not, the inputs' shapes and dtypes), in
a CUDA graph once it has run ``warmup`` times eagerly, then replays it; the host then launches one graph per
micro-batch instead of thousands of kernels. What a replay needs, and the eager warm-up runs already do, so that
they train exactly as the replays do:

- inputs are copied into static buffers (a replay reads the same addresses every time);
- gradients stay allocated: backward accumulates into them and the optimizer step zeroes them in place (eager mode
  sets them to None instead); parameters that never get a gradient keep none;
- the learning rate is a device tensor that ``set_lr`` fills in place, the optimizer is fused and capturable
  (``build_adamw(graph=True)``), and fp16's GradScaler runs without a host sync (the fused optimizer takes its
  scale and found-inf flag as tensors and skips the update on the device);
- autocast runs without its weight-cast cache (an autocast region around the step, whose cache outlives one call,
  would otherwise hand a replay casts made before the weights' last update).

Randomness stays exact: a replay draws from the CUDA generator at its current offset and advances it as the eager
step would, so drop path and device-side masks match eager numbers and a checkpoint's RNG state resumes them. Host
state must not change between replays: anything the forward decides on the host (a seed drawn on the CPU, a shape)
is frozen into the graph, so masks are given as inputs. On CPU, graph mode runs the same code through the static
buffers without capturing (nothing to capture), which is how CI checks it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn


class TrainStep:
    """``step(*inputs, last=...)`` runs one micro-batch and returns its loss (detached, float32, on the device).
    Inputs are tensors (copied into the graph's buffers) or hashable host values (ints, None: a different value is a
    different call, with its own graph).

    Args:
        forward: ``forward(*inputs) -> loss``, the model's loss on one micro-batch.
        params: the trainable parameters (clipping and the in-place zeroing act on their gradients).
        optimizer, scaler: the optimizer and the GradScaler (disabled unless fp16).
        accum_iter: micro-batches per optimizer step; each backward takes loss / accum_iter.
        clip_grad: max gradient norm, clipped on unscaled gradients once per optimizer step (None: no clipping).
        amp_dtype: autocast dtype (None: fp32).
        graph: capture CUDA graphs (on CUDA; elsewhere the same code runs uncaptured).
        warmup: eager runs of each distinct call before it is captured (DDP needs 11).
        no_sync: a context for the micro-batches before the last (DDP's ``no_sync``), or None.
    Returned losses of a graph are the graph's static output: read (or copy) them before the next call.
    """

    def __init__(
        self,
        forward: Callable[..., torch.Tensor],
        params: Iterable[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        *,
        device: torch.device,
        accum_iter: int = 1,
        clip_grad: float | None = None,
        amp_dtype: torch.dtype | None = None,
        graph: bool = False,
        warmup: int = 3,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        if accum_iter < 1:
            raise ValueError(f"accum_iter must be at least 1, got {accum_iter}")
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 (optimizer state and lazy initialisation), got {warmup}")
        self.forward = forward
        self.params = [p for p in params if p.requires_grad]
        self.optimizer, self.scaler = optimizer, scaler
        self.device = torch.device(device)
        self.accum_iter, self.clip_grad, self.amp_dtype = accum_iter, clip_grad, amp_dtype
        self.graph, self.warmup, self.no_sync = graph, warmup, no_sync
        self.capture = graph and self.device.type == "cuda"
        if graph:
            check_graph_optimizer(optimizer, self.device)
        self._static: dict[tuple, list[torch.Tensor]] = {}
        self._runs: dict[tuple, int] = {}
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._stream = torch.cuda.Stream(self.device) if self.capture else None

    @property
    def captured(self) -> int:
        """How many calls (distinct by last/shapes/dtypes) are replayed from a graph."""
        return len(self._graphs)

    # --- the step itself ---
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # a graph must not capture casts cached by an earlier call (the cache is per autocast region anyway)
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=not self.graph)

    def _run(self, inputs, last: bool) -> torch.Tensor:
        sync = contextlib.nullcontext() if last or self.no_sync is None else self.no_sync()
        with sync:  # the backward too: FSDP2 reads it there (DDP decides at the forward)
            with self._autocast():
                loss = self.forward(*inputs)
            self.scaler.scale(loss / self.accum_iter).backward()
        out = loss.detach().float()
        if last:
            if self.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.graph:  # the same gradient tensors for every replay
                grads = [p.grad for p in self.params if p.grad is not None]
                if grads:
                    torch._foreach_zero_(grads)
            else:
                self.optimizer.zero_grad(set_to_none=True)
        return out

    def __call__(self, *inputs: torch.Tensor, last: bool = True) -> torch.Tensor:
        if not self.graph:
            return self._run(inputs, last)
        key = (last, *((tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else t for t in inputs))
        static = self._static.get(key)
        if static is None:  # allocated outside any graph: replays read these addresses
            static = self._static[key] = [
                torch.empty_like(t, device=self.device) if isinstance(t, torch.Tensor) else t for t in inputs
            ]
        for dst, src in zip(static, inputs, strict=True):
            if isinstance(dst, torch.Tensor) and dst is not src:
                dst.copy_(src, non_blocking=True)
        captured = self._graphs.get(key)
        if captured is not None:
            graph, loss = captured
            graph.replay()
            return loss
        if not self.capture:  # CPU: the graph-mode step, uncaptured
            return self._run(static, last)
        runs = self._runs.get(key, 0)
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        if runs < self.warmup:  # on the capture stream, so lazy initialisation (cuBLAS workspaces, ...) happens there
            with torch.cuda.stream(self._stream):
                loss = self._run(static, last)
            current.wait_stream(self._stream)
            loss.record_stream(current)
            self._runs[key] = runs + 1
            return loss
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
                loss = self._run(static, last)
        except RuntimeError as e:
            if isinstance(e, torch.cuda.OutOfMemoryError):  # (what the trainer's caller advises on, as it is)
                raise
            raise RuntimeError(
                f"capturing the training step in a CUDA graph failed: {e}\nSomething in the step waits for the host "
                "(a .item(), a data-dependent shape, a CPU tensor) or is not capturable; train without --cuda-graph "
                "(TrainStep(graph=False)) or remove that call from the step"
            ) from e
        # capture_begin wrote the RNG's seed and offset holders on the capture stream; the replay below refills
        # them on the current stream: order the two
        current.wait_stream(self._stream)
        if self._pool is None:
            self._pool = graph.pool()  # one memory pool for all graphs: they never run concurrently
        self._graphs[key] = (graph, loss)
        graph.replay()  # capturing ran nothing: this is the call's step
        return loss


def check_graph_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """A graph-captured step needs a fused optimizer (one launch, fp16 found-inf handled on the device), capturable on
    CUDA, with a tensor learning rate: what ``build_adamw(graph=True)`` makes."""
    for g in optimizer.param_groups:
        if not isinstance(g.get("lr"), torch.Tensor):
            raise ValueError("a CUDA-graph step needs the learning rate as a tensor: build_adamw(..., graph=True)")
        if not g.get("fused"):
            raise ValueError("a CUDA-graph step needs a fused optimizer: build_adamw(..., graph=True)")
        if device.type == "cuda" and not g.get("capturable"):
            raise ValueError("a CUDA-graph step needs a capturable optimizer: build_adamw(..., graph=True)")
