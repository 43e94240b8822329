"""Training batches: the toolbox's optional drop-last rule and a method's smallest batch.

Why a batch sampler of our own: `DataLoader(drop_last=...)` can only drop a short trailing batch,
never merge it; a method with batch statistics (a BatchNorm projector) crashes on a batch of one.
The random order is drawn exactly as `DataLoader(shuffle=True)` draws it (a `RandomSampler` seeded
from torch's default generator), so with the defaults the batches are the same as before.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator, Optional, Sized

from torch.utils.data import RandomSampler, Sampler

from ..errors import BenchsuiteError


def tail_rule(n: int, batch_size: int, drop_last: bool, min_batch_size: int) -> list[int]:
    """Batch sizes of one epoch over `n` samples.

    1. drop_last (the toolbox's rule): the last partial batch is dropped when the set holds at
       least one full batch; a set smaller than one batch stays one batch.
    2. min_batch_size: a trailing batch smaller than it is merged into the batch before it.
    """
    if n <= 0:
        return []
    if min_batch_size > n:
        raise BenchsuiteError(f"the training set has {n} image(s), fewer than the method's min_batch_size "
                              f"{min_batch_size}; use more shots or classes")
    full, rest = divmod(n, batch_size)
    sizes = [batch_size] * full
    if rest and not (drop_last and full >= 1):
        sizes.append(rest)
    if len(sizes) > 1 and sizes[-1] < min_batch_size:
        tail = sizes.pop()
        sizes[-1] += tail
    return sizes


class TrainBatchSampler(Sampler[list]):
    """Shuffled index batches following :func:`tail_rule`; with `keyed`, batches of
    ``(epoch, index)`` keys for the augmentation stream, the epoch set by :meth:`set_epoch`."""

    def __init__(self, data: Sized, batch_size: int, *, drop_last: bool = False, min_batch_size: int = 1,
                 keyed: bool = False):
        self.sampler = RandomSampler(data)
        self.sizes = tail_rule(len(data), batch_size, drop_last, min_batch_size)
        self.keyed = keyed
        self.epoch = 0
        self._issued: Optional[deque] = None

    def record(self) -> deque:
        """From now on, every index batch that :meth:`__iter__` hands out is also appended to the
        returned queue, in order: a DataLoader (its workers prefetching or not) yields its batches in
        the order it requested them, so popping one entry per loaded batch names that batch's samples."""
        self._issued = deque()
        return self._issued

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sizes)

    def index_batches(self) -> Iterator[list[int]]:
        """One epoch's shuffled sample indices, batch by batch."""
        order = iter(self.sampler)
        for size in self.sizes:
            yield [next(order) for _ in range(size)]

    def __iter__(self) -> Iterator[list]:
        for batch in self.index_batches():
            if self._issued is not None:
                self._issued.append(batch)
            yield [(self.epoch, i) for i in batch] if self.keyed else batch
