"""Length-grouped batches: cells of similar length share a batch, so padding stays small.

Each epoch: shuffle all rows, cut the permutation into megabatches of
``batch_size * num_replicas * megabatch_mult`` rows, sort each by length (longest first) and
cut it into global batches of ``batch_size * num_replicas`` rows; rank ``r`` takes every
``num_replicas``-th row of a global batch, so all ranks get equally long work at each step.
Global batches are then shuffled, except that the one holding the longest row goes first
(an out-of-memory error shows up at step 0, not hours later). Every rank computes the same
permutation from ``(seed, epoch)``, and every rank yields the same number of batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

__all__ = ["LengthGroupedBatches", "padding_fraction"]


class LengthGroupedBatches:
    """Iterable of batches (lists of row indices into ``lengths``) for one rank.

    ``batch_size`` is per rank. Without ``drop_last`` the row list is padded by repeating
    rows (as ``DistributedSampler`` does) to a multiple of ``num_replicas`` and the last
    batch may be short; with it, rows beyond the last full global batch are skipped (a
    different random subset each epoch). Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        megabatch_mult: int = 50,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if megabatch_mult < 1:
            raise ValueError(f"megabatch_mult must be positive, got {megabatch_mult}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank {rank} of {num_replicas}")
        if self.lengths.size and self.lengths.min() < 0:
            raise ValueError("lengths must be non-negative")
        self.batch_size, self.seed, self.megabatch_mult = batch_size, seed, megabatch_mult
        self.drop_last, self.num_replicas, self.rank = drop_last, num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` (the same on every rank)."""
        self.epoch = int(epoch)

    @property
    def _global_batch(self) -> int:
        return self.batch_size * self.num_replicas

    def _num_rows(self) -> int:
        """Rows used per epoch, all ranks together."""
        n, g, r = len(self.lengths), self._global_batch, self.num_replicas
        if self.drop_last:
            return n // g * g
        return -(-n // r) * r

    def __len__(self) -> int:
        return -(-self._num_rows() // self._global_batch)

    def __iter__(self) -> Iterator[list[int]]:
        n_rows = self._num_rows()
        if n_rows == 0:
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(len(self.lengths))
        # without drop_last, repeat rows so that every rank gets as many
        perm = perm[:n_rows] if n_rows <= len(perm) else np.resize(perm, n_rows)
        g = self._global_batch
        mega = g * self.megabatch_mult
        steps: list[np.ndarray] = []
        for start in range(0, n_rows, mega):
            block = perm[start : start + mega]
            block = block[np.argsort(-self.lengths[block], kind="stable")]  # longest first
            steps.extend(block[i : i + g] for i in range(0, len(block), g))
        longest = int(np.argmax([self.lengths[s].max() for s in steps]))
        order = rng.permutation(len(steps))
        order = np.concatenate([[longest], order[order != longest]])
        for i in order:
            yield steps[i][self.rank :: self.num_replicas].tolist()


def padding_fraction(
    batches: Iterable[Sequence[int]],
    lengths: Sequence[int],
    *,
    pad_to_multiple_of: int | None = None,
) -> float:
    """Fraction of the token positions of ``batches`` that are padding, when each batch is
    padded to its longest row (rounded up to ``pad_to_multiple_of``, as the collator does)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = padded = 0
    for batch in batches:
        lens = lengths[np.asarray(batch, dtype=np.int64)]
        if lens.size == 0:
            continue
        width = int(lens.max())
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        real += int(lens.sum())
        padded += width * lens.size
    return 1.0 - real / padded if padded else 0.0
