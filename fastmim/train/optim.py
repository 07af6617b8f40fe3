"""AdamW with MAE's parameter groups and its per-step warmup + cosine learning rate."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms (1-D parameters) and the model's ``no_weight_decay()`` names."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    # "decays": the group a weight-decay schedule (set_weight_decay) sets, whatever its current value
    return [{"params": no_decay, "weight_decay": 0.0, "decays": False},
            {"params": decay, "weight_decay": weight_decay, "decays": True}]  # fmt: skip


def build_adamw(
    model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), graph: bool = False
) -> torch.optim.AdamW:
    """AdamW, fused when the parameters' device supports it (CUDA, and CPU on recent torch).

    ``graph``: for a step captured in a CUDA graph: fused, capturable on CUDA (its step counts live on the device), and
    the learning rate a device tensor that ``set_lr`` fills in place (a float would be frozen into the graph)."""
    groups = param_groups(model, weight_decay)
    if graph:
        device = next(p.device for g in groups for p in g["params"])
        lr_t = torch.tensor(float(lr), dtype=torch.float32, device=device)
        return torch.optim.AdamW(groups, lr=lr_t, betas=betas, fused=True, capturable=device.type == "cuda")
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):  # fused unsupported for this device/dtype/torch
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int, start_lr: float = 0.0) -> float:
    """Learning rate at a fractional epoch: linear warmup from start_lr (MAE 0, I-JEPA 2e-4), then half-cycle cosine
    to min_lr."""
    if epoch < warmup_epochs:
        return start_lr + (lr - start_lr) * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-8)
    progress = min(1.0, (epoch - warmup_epochs) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wd_at(epoch: float, weight_decay: float, weight_decay_end: float, epochs: int) -> float:
    """I-JEPA's weight-decay schedule: half-cycle cosine from weight_decay to weight_decay_end over the whole run."""
    progress = min(1.0, max(0.0, epoch / max(epochs, 1e-8)))
    return weight_decay_end + (weight_decay - weight_decay_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_weight_decay(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Sets the weight decay of the groups that decay (not biases and norms)."""
    for g in optimizer.param_groups:
        if g.get("decays", g["weight_decay"] > 0):
            g["weight_decay"] = value


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Sets every group's learning rate; a tensor learning rate (a graph-captured step reads it) is filled in place."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(value)
        else:
            g["lr"] = value
