"""DINO's weighted k-nearest-neighbour classifier (``eval_knn.py``): L2-normalised features, cosine similarities
``s = f_test . f_train^T``, the k most similar training samples, each voting ``exp(s / T)`` for its class."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_scores(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores [N_test, num_classes]: ``sum over the k nearest training samples j of class c of exp(s_j / T)``,
    each row scaled by ``exp(-max_j s_j / T)`` (its nearest neighbour votes 1), so that a small T cannot overflow: the
    ranking of the classes is DINO's.

    Args:
        train, test: features [N, D] (normalised here); train_labels: [N_train] ints in [0, num_classes).
        k: neighbours (DINO: 20; fewer training samples: all of them); temperature: DINO's 0.07.
        chunk: test rows per similarity block (memory: chunk x N_train).
    """
    return _knn_log_votes(train, train_labels, test, num_classes, k, temperature, chunk).exp()


def _knn_log_votes(train, train_labels, test, num_classes: int, k: int, temperature: float, chunk: int = 1024):
    """log of ``knn_scores`` (-inf for a class none of the k neighbours has), summed per class in log space: at a
    small T the votes of every class but the nearest neighbour's underflow to 0 in ``knn_scores``, and top-5 would
    rank those classes arbitrarily, where their log votes still order them."""
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(
            f"knn: features must be [N, D] with the same D, got {tuple(train.shape)} and {tuple(test.shape)}"
        )
    if train_labels.shape != (train.shape[0],):
        raise ValueError(f"knn: {train.shape[0]} training features but {tuple(train_labels.shape)} labels")
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn: k must be >= 1 and the temperature > 0, got k={k}, T={temperature}")
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float(), dim=1)
    k = min(k, train.shape[0])
    labels = train_labels.to(train.device).long()
    out = torch.empty(test.shape[0], num_classes, dtype=torch.float32, device=test.device)
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T  # [c, N_train]
        top, idx = sim.topk(k, dim=1)
        cls = labels[idx]
        # (s - s_max) / T: DINO's log weights s / T less the row's constant s_max / T, the same ranking; exp(s / T)
        # overflowed fp32 for s / T > 88.7 (T < 0.0113), every near neighbour voting inf
        x = (top - top[:, :1]) / temperature
        peak = torch.full_like(out[: sim.shape[0]], -math.inf).scatter_reduce(1, cls, x, "amax")
        summed = torch.zeros_like(peak).scatter_add_(1, cls, (x - peak.gather(1, cls)).exp())
        out[start : start + chunk] = summed.log() + peak  # (a class with no neighbour: log 0 - inf)
    return out


def knn_accuracy(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) of ``knn_scores`` (top-5 over min(5, classes) classes)."""
    scores = _knn_log_votes(train, train_labels, test, num_classes, k, temperature)
    return _topk_accuracy(scores, test_labels, num_classes)


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[top-1 hits, top-5 hits, samples] (float64, on the scores' device): counts that add up over batches and
    processes; top-5 over min(5, classes) classes."""
    ranked = scores.topk(min(5, num_classes), dim=1).indices
    hit = ranked == labels.to(scores.device).view(-1, 1).long()
    return torch.stack([hit[:, 0].sum(), hit.any(1).sum(), hit.new_tensor(len(labels), dtype=torch.long)]).double()


def percent(hits: torch.Tensor) -> dict[str, float]:
    """``topk_hits`` counts -> {"top1", "top5"} in %."""
    n = max(float(hits[2]), 1.0)
    return {"top1": 100.0 * float(hits[0]) / n, "top5": 100.0 * float(hits[1]) / n}


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    return percent(topk_hits(scores, labels, num_classes))
