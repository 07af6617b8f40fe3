"""AdamW with MAE's parameter groups and its per-step warmup + cosine learning rate."""

from __future__ import annotations

import bisect
import math
import re

import torch
from torch import nn

from fastmim.config import DECAY_EXEMPT  # --decay-exempt: which parameters weight decay leaves alone


def decay_exempt_rule(model: nn.Module, exempt: str = "official"):
    """(name, parameter) -> True for a parameter weight decay leaves alone.

    ``official``: the rule of the recipe's official pretraining code (the model's ``official_no_decay``): MAE, I-JEPA
    and data2vec 2.0 exempt only biases and 1-D parameters, so their class and mask tokens decay (FCMAE's GRN
    parameters decay too: they are (1, C) there); SimMIM exempts the class token too, MaskFeat the mask token, PixMIM
    both, A2MIM both, its learned position embedding and the relative position tables; a learned position embedding
    decays under MAE's and MaskFeat's rules (fixed by default, it is not trained).
    ``tokens``: 1-D parameters and the model's ``no_weight_decay()`` names (the class, mask and position tokens:
    timm's convention for them, and fastmim's rule before --decay-exempt). The relative position tables decay under it
    (timm's Beit exempts them; runs started with it keep it), and the start-up line says so. A model without
    ``official_no_decay`` (a user's) takes the ``tokens`` rule either way."""
    if exempt not in DECAY_EXEMPT:
        raise ValueError(f"decay_exempt must be one of {', '.join(DECAY_EXEMPT)}, got {exempt!r}")
    official = getattr(model, "official_no_decay", None)
    if exempt == "official" and official is not None:
        return official
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return lambda name, p: p.ndim <= 1 or name in skip


def param_groups(model: nn.Module, weight_decay: float, exempt: str = "official") -> list[dict]:
    """[no weight decay, weight decay]: the parameters ``decay_exempt_rule(model, exempt)`` exempts, the others."""
    rule = decay_exempt_rule(model, exempt)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if rule(name, p) else decay).append(p)
    # "decays": the group a weight-decay schedule (set_weight_decay) sets, whatever its current value
    return [{"params": no_decay, "weight_decay": 0.0, "decays": False},
            {"params": decay, "weight_decay": weight_decay, "decays": True}]  # fmt: skip


def decay_summary(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """What the optimizer's groups do beyond "biases and 1-D parameters exempt": the multi-dimensional parameters it
    exempts and the 1-D ones it decays, each block's named once (``blocks.*.``), and which tokens and position
    embeddings decay. For the run's start-up lines."""
    names = {p: n for n, p in model.named_parameters()}
    exempt = {names[p] for g in optimizer.param_groups if not g.get("decays", g["weight_decay"] > 0)
              for p in g["params"]}  # fmt: skip
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def listed(selected) -> str:
        return ", ".join(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in selected)) or "none"

    also = [n for n, p in trained.items() if n in exempt and p.ndim > 1]
    but = [n for n, p in trained.items() if n not in exempt and (p.ndim <= 1 or n.endswith(".bias"))]
    tokens = [n for n in trained if n not in exempt and (n.endswith("token") or "pos_embed" in n)]
    tables = [n for n in trained if n not in exempt and n.endswith("relative_position_bias_table")]
    said = "exempt: biases and 1-D parameters" + (f", {listed(also)}" if also else "")
    said += f" (but not {listed(but)})" if but else ""
    return said + f"; decayed tokens: {listed(tokens)}" + (f"; decayed bias tables: {listed(tables)}" if tables else "")


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters' names, in the order its ``state_dict()`` numbers them (saved with a checkpoint:
    a resume whose groups differ, a changed --decay-exempt, renumbers the state by name)."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for g in optimizer.param_groups for p in g["params"]]


def saved_param_names(state: dict, model: nn.Module) -> list[str]:
    """The names of the parameters a checkpoint's optimizer state numbers: saved with it (``optimizer_params``)
    since config format 4; before, the groups of the ``tokens`` rule numbered them."""
    if state.get("optimizer_params") is not None:
        return list(state["optimizer_params"])
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for g in param_groups(model, 0.0, "tokens") for p in g["params"]]


def regroup_state(saved: dict, saved_names: list[str], optimizer: torch.optim.Optimizer, names: list[str]) -> dict:
    """An ``optimizer.state_dict()`` whose parameters ``saved_names`` names (in its numbering), renumbered for
    ``optimizer``, whose parameters ``names`` names, in its groups: each parameter keeps its own moments whichever
    group it moved to (the groups' settings are this optimizer's). Each moment's shape is checked against its
    parameter's (a state put on the wrong parameter is refused here: the fused AdamW would read out of bounds)."""
    count = sum(len(g["params"]) for g in saved["param_groups"])
    if count != len(saved_names) or sorted(saved_names) != sorted(names):
        gone, new = sorted(set(saved_names) - set(names)), sorted(set(names) - set(saved_names))
        raise ValueError(f"the checkpoint's optimizer does not fit this model's parameters ({count} saved, "
                         f"{len(names)} now; not here: {gone[:3]}, not saved: {new[:3]})")  # fmt: skip
    number = {n: i for i, n in enumerate(names)}
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_names == names and [len(g["params"]) for g in saved["param_groups"]] == sizes:
        out = saved
    else:
        groups, start = [], 0
        for g in optimizer.state_dict()["param_groups"]:
            groups.append({**g, "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        out = {"state": {number[saved_names[i]]: st for i, st in saved["state"].items()}, "param_groups": groups}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, st in out["state"].items():
        p = params[i]
        for k, t in st.items():
            if isinstance(t, torch.Tensor) and t.ndim and t.shape != p.shape:
                raise ValueError(f"the checkpoint's optimizer state does not fit this model: {k} {tuple(t.shape)} "
                                 f"numbered for {names[i]} {tuple(p.shape)} (its parameter names, optimizer_params, "
                                 f"or the model differ)")  # fmt: skip
    return out


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas=(0.9, 0.95),
    graph: bool = False,
    exempt: str = "official",
) -> torch.optim.AdamW:
    """AdamW, fused when the parameters' device supports it (CUDA, and CPU on recent torch).

    ``graph``: for a step captured in a CUDA graph: fused, capturable on CUDA (its step counts live on the device), and
    the learning rate a device tensor that ``set_lr`` fills in place (a float would be frozen into the graph).
    ``exempt``: the parameters without weight decay (``decay_exempt_rule``)."""
    groups = param_groups(model, weight_decay, exempt)
    if graph:
        device = next(p.device for g in groups for p in g["params"])
        lr_t = torch.tensor(float(lr), dtype=torch.float32, device=device)
        return torch.optim.AdamW(groups, lr=lr_t, betas=betas, fused=True, capturable=device.type == "cuda")
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):  # fused unsupported for this device/dtype/torch
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int, start_lr: float = 0.0,
          milestones: tuple[float, ...] = (), gamma: float = 0.1) -> float:  # fmt: skip
    """Learning rate at a fractional epoch: linear warmup from start_lr (MAE 0, I-JEPA 2e-4), then half-cycle cosine
    to min_lr; with ``milestones`` (epochs) instead lr x gamma ** (the milestones reached): SimMIM's multistep
    schedule, A2MIM's mmcv step policy. Set before each update (MAE's, mmcv's), the update at a milestone already
    decays; SimMIM's scheduler sets the rate after each update, so there every value comes one update later."""
    if epoch < warmup_epochs:
        return start_lr + (lr - start_lr) * epoch / warmup_epochs
    if milestones:
        return lr * gamma ** bisect.bisect_right(milestones, epoch)
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
