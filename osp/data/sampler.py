"""A sampler whose order is a function of (seed, epoch), sharded over ranks, that can start mid-epoch."""
from __future__ import annotations

from collections.abc import Iterator
from typing import List

import numpy as np
from torch.utils.data import Sampler


def _check(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"ResumableSampler: {name}={value!r}; expected an int >= {low}")
    return int(value)


class ResumableSampler(Sampler):
    """Indices of one rank for one epoch, in an order fixed by (seed, epoch), resumable mid-epoch.

    The epoch's order is a permutation of range(num_samples) drawn from (seed, epoch) (the identity
    with ``shuffle=False``). With ``drop_last`` it is cut to a multiple of ``num_replicas`` (the tail
    is dropped); without, it is extended by wrapping around to the next multiple. Rank r takes
    positions r, r + num_replicas, ... (as DistributedSampler does), so every rank gets the same count
    and the ranks' shares are disjoint (with ``drop_last``).

    ``set_epoch(epoch, start)`` selects the epoch and skips the first ``start`` indices of this rank's
    share: a training loop resuming after k finished batches of size b passes start = k * b and sees
    no sample twice in that epoch. ``len(sampler)`` is this rank's whole share (the same on every
    rank); an iteration yields its last ``len(sampler) - start`` indices (``remaining``).

    ``yield_epoch=True`` yields (epoch, index) pairs, which VideoCaptionDataset and
    CachedLatentDataset accept as keys: the epoch then reaches DataLoader workers that live across
    epochs (``persistent_workers=True``), where a ``dataset.set_epoch`` in the main process does not.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool = True, yield_epoch: bool = False):
        self.num_samples = _check("num_samples", num_samples, 1)
        self.seed = _check("seed", seed, 0)
        self.num_replicas = _check("num_replicas", num_replicas, 1)
        self.rank = _check("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"ResumableSampler: rank={rank}; expected 0 <= rank < num_replicas={num_replicas}")
        self.shuffle, self.drop_last, self.yield_epoch = bool(shuffle), bool(drop_last), bool(yield_epoch)
        if drop_last and self.num_samples < self.num_replicas:
            raise ValueError(f"ResumableSampler: num_samples={num_samples} < num_replicas={num_replicas} with "
                             "drop_last=True leaves the ranks nothing; expected at least one sample per rank")
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        n, r = self.num_samples, self.num_replicas
        return n // r if self.drop_last else -(-n // r)

    @property
    def remaining(self) -> int:
        """Indices the next iteration yields: len(self) - start."""
        return len(self) - self.start

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = _check("epoch", epoch, 0)
        start = _check("start", start, 0)
        if start > len(self):
            raise ValueError(f"ResumableSampler: start={start}; expected at most this rank's {len(self)} indices")
        self.start = start

    def order(self, epoch: int) -> List[int]:
        """The whole epoch's order before sharding (num_samples indices)."""
        if not self.shuffle:
            return list(range(self.num_samples))
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        return rng.permutation(self.num_samples).tolist()

    def indices(self, epoch: int) -> List[int]:
        """This rank's whole share of ``epoch``."""
        order = self.order(epoch)
        total = len(self) * self.num_replicas
        if total > len(order):
            order = (order * (-(-total // len(order))))[:total]
        return order[:total][self.rank::self.num_replicas]

    def __iter__(self) -> Iterator:
        share = self.indices(self.epoch)[self.start:]
        if self.yield_epoch:
            return iter([(self.epoch, i) for i in share])
        return iter(share)
