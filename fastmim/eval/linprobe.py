"""MAE's linear probe (``main_linprobe.py``): a frozen encoder, ``BatchNorm1d(D, affine=False, eps=1e-6)`` then a
linear layer (weights trunc-normal, std 0.01) trained by LARS (momentum 0.9, no weight decay), lr = blr x batch /
256 (MAE's batch: 16384) with a linear warm-up and a half-cosine per iteration, on views of MAE's single-draw
random-resized crop + flip (``encoder.train_transform``); evaluated on the centre crop. ``augment=False`` trains on
the cached centre-crop features instead (a shortcut, much cheaper: say so when reporting it)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastmim.eval.encoder import _autocast, pooled_features
from fastmim.eval.knn import _topk_accuracy
from fastmim.eval.lars import LARS
from fastmim.train.optim import lr_at

MIN_LR = 0.0  # MAE's linear probe: the half-cosine ends at 0


class LinearProbe(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(f))


def train_linear_probe(
    encoder: nn.Module,
    train_set,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    device: torch.device,
    *,
    train_feats: torch.Tensor | None = None,
    train_labels: torch.Tensor | None = None,
    epochs: int = 90,
    warmup_epochs: float = 10,
    batch_size: int = 16384,
    blr: float = 0.1,
    pool: str = "auto",
    workers: int = 0,
    seed: int = 0,
    feature_batch: int = 256,
) -> dict:
    """Trains the probe; returns its final top-1 / top-5 on the validation features and the training history.
    ``train_feats``/``train_labels`` given: trains on them (no augmentation); else on ``train_set``'s augmented
    views through the frozen encoder, ``feature_batch`` images at a time (MAE's batch of 16384 is 32 GPUs' 512:
    here one device gathers a step's features chunk by chunk, so only the head's batch is that large). A step takes
    ``batch_size`` samples (all of them where the set is smaller), and lr = blr x that / 256."""
    n = len(train_feats) if train_feats is not None else len(train_set)
    if batch_size < 2 or n < 2:  # (a batch of one: PyTorch's "Expected more than 1 value per channel")
        raise ValueError(f"the linear probe's BatchNorm normalises each feature over a batch: it needs a batch size "
                         f"of at least 2 and as many training images, got {batch_size} and {n}")  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dim = val_feats.shape[1]
    head = LinearProbe(dim, num_classes).to(device)
    used = min(batch_size, n)  # the batch each step takes: all n where the set is smaller than a batch
    per_epoch = n // batch_size if n > batch_size else 1  # (full batches only, as MAE's drop_last)
    lr = blr * used / 256
    opt = LARS(head.parameters(), lr=lr, weight_decay=0.0)
    encoder = encoder.to(device).eval().requires_grad_(False)
    if train_feats is None:  # images in chunks through the frozen encoder, gathered into the step's batch
        loader = torch.utils.data.DataLoader(train_set, batch_size=min(feature_batch, used), shuffle=True,
                                             num_workers=workers, generator=gen,
                                             pin_memory=device.type == "cuda")  # fmt: skip

    def augmented_batches():  # per_epoch full batches; the epoch's last images, too few for one, are not read
        feats, labels, have, steps = [], [], 0, 0
        for x, y in loader:
            with torch.no_grad(), _autocast(device):
                feats.append(pooled_features(encoder, x.to(device, non_blocking=True), pool).float())
            labels.append(y.to(device, non_blocking=True))
            have += len(y)
            if have >= used:
                f, lab = torch.cat(feats), torch.cat(labels)
                yield f[:used], lab[:used]
                steps += 1
                if steps == per_epoch:
                    return
                feats, labels, have = [f[used:]], [lab[used:]], have - used

    history = []
    it = 0
    for epoch in range(epochs):
        head.train()
        total, count = torch.zeros((), device=device), 0  # summed on the device: no host sync per step
        if train_feats is None:
            batches = augmented_batches()
        else:
            order = torch.randperm(n, generator=gen)[: per_epoch * used]
            batches = ((train_feats[idx], train_labels[idx]) for idx in order.split(used))
        for x, y in batches:
            for g in opt.param_groups:
                g["lr"] = lr_at(it / per_epoch, lr, MIN_LR, warmup_epochs, epochs)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(head(x.float()), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(y)
            count += len(y)
            it += 1
        total = float(total)
        if not math.isfinite(total):
            raise FloatingPointError(f"the linear probe's loss became {total} in epoch {epoch}; lower --blr")
        history.append({"epoch": epoch + 1, "loss": total / max(count, 1)})
    head.eval()
    with torch.no_grad():
        logits = head(val_feats.to(device).float()).cpu()
    acc = _topk_accuracy(logits, val_labels, num_classes)
    history[-1].update(acc)
    return {**acc, "lr": lr, "min_lr": MIN_LR, "batch": used, "steps_per_epoch": per_epoch, "history": history}
