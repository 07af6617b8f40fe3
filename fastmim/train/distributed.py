"""Data-parallel set-up for ``torchrun``: NCCL on GPUs, gloo on CPU; rank 0 logs and saves."""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' becomes this process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: fastmim trains on cpu or cuda (auto, cpu, cuda, cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} was asked for but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {dev} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Reads torchrun's environment; joins the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":  # the current device too (one process on cuda:1 included): Triton launches, CUDA
        torch.cuda.set_device(device)  # events and streams take the current device, not their tensors'
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, local_world), device


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` under DistributedDataParallel, without a broadcast of its buffers before every forward (the models'
    buffers are constants or the same on every rank: a relative position index, I-JEPA's fixed position embedding, a
    teacher's update count). torch 2.14 deprecates broadcast_buffers for forward_sync_buffers (which also syncs them
    once at init: harmless here).

    On CPU, DDP's "Grad strides do not match bucket view strides" is hidden: the CPU convolution's backward returns a
    depthwise weight's gradient [C, 1, k, k] with another stride on its size-1 dimension (the same memory layout),
    and DDP compares strides exactly, so every ConvNeXt run warned for nothing."""
    ddp = torch.nn.parallel.DistributedDataParallel
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else \
        "broadcast_buffers"  # fmt: skip
    if device.type == "cpu":
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of obj on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's value of obj, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t)
        t /= info.world_size
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leaves the process group: torchrun's, or the one-process group an --fsdp run alone makes."""
    if dist.is_initialized():
        dist.destroy_process_group()
