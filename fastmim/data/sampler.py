"""A distributed sampler that can start in the middle of an epoch, for exact mid-epoch resume."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch), shards by rank (DistributedSampler's layout, padded
    to a multiple of the world size) and skips the first ``start_index`` samples of this rank's share.

    Args:
        num_samples_total: dataset length.
        num_replicas, rank: the data-parallel world.
        seed: shuffling seed, identical on all ranks.
        shuffle: shuffle each epoch.
    """

    def __init__(self, num_samples_total: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle=True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.n = num_samples_total
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_index = 0
        self.stop_index: int | None = None
        self.per_rank = -(-self.n // num_replicas)  # ceil
        self.order: dict | None = None  # an epoch resumed on another layout (set_order)

    def set_order(self, order: dict | None) -> None:
        """``{"epoch": e, "stages": [[world, consumed], ...], "offset": k, "seed": s}``: epoch ``e`` was begun by
        runs on other layouts. The first stage's run dealt the epoch's order (from seed ``s`` when given: a run
        resumed with another seed finishes the epoch it began; padded to its ``world``) over its ranks, as this
        sampler does, and they consumed its first ``consumed`` samples together; each later stage dealt what was left
        over its ranks and consumed its first ``consumed`` (a prefix of it, whatever cut its shares had). This
        sampler deals the rest over its own ranks, each share cut to the same length, after ``k`` unused slots (the
        samples the resumed epoch counts as done). Any other epoch is dealt as usual. None: no such epoch."""
        self.order = order

    @staticmethod
    def rest(order: list[int], stages) -> list[int]:
        """What the runs of ``stages`` left of an epoch's ``order`` (see ``set_order``)."""
        rest = list(order)
        for i, (world, consumed) in enumerate(stages):
            if i == 0:  # the epoch's first run padded the order to a multiple of its ranks
                rest += rest[: -(-len(rest) // world) * world - len(rest)]
            rest = rest[consumed:]  # (what a run consumed is a prefix of its dealing, before or after the cut)
        return rest

    def set_epoch(self, epoch: int, start_index: int = 0, stop_index: int | None = None) -> None:
        """Selects the epoch's order, the first sample (within this rank's share) to yield and, with ``stop_index``,
        where to stop: a run that ends inside the epoch (--max-steps) does not load what it will not use."""
        self.epoch = epoch
        self.start_index = start_index
        self.stop_index = stop_index

    def _rank_indices(self) -> list[int]:
        begun = self.order is not None and self.order["epoch"] == self.epoch  # (the rest of an epoch begun elsewhere)
        if self.shuffle:
            seed = self.order.get("seed", self.seed) if begun else self.seed
            g = torch.Generator().manual_seed(seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if begun:
            rest = self.rest(order, self.order["stages"])
            each = len(rest) // self.num_replicas
            return [-1] * self.order["offset"] + rest[self.rank :: self.num_replicas][:each]  # (-1: never read)
        total = self.per_rank * self.num_replicas
        order += order[: total - len(order)]  # pad by repeating the start, as DistributedSampler
        return order[self.rank : total : self.num_replicas]

    def __iter__(self):
        indices = self._rank_indices()[self.start_index : self.stop_index]
        if indices and indices[0] < 0:  # (a rebuilt epoch's unused slots: the trainer starts after them)
            raise RuntimeError("ResumableDistributedSampler: started inside the slots a rebuilt epoch counts as done")
        return iter(indices)

    def __len__(self) -> int:
        per_rank = self.per_rank
        if self.order is not None and self.order["epoch"] == self.epoch:
            per_rank = len(self._rank_indices())
        stop = per_rank if self.stop_index is None else min(self.stop_index, per_rank)
        return max(0, stop - self.start_index)
