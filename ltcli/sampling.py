"""Class-aware sampling for long-tailed training (Kang et al., ICLR 2020, section 3.1).

A class j is drawn with probability p_j ∝ n_j^q: q = 1 instance-balanced, q = 0
class-balanced, q = 1/2 square-root. Progressive sampling moves linearly from
instance-balanced to class-balanced over the epochs.

Every epoch is one GLOBAL stream of indices computed from (seed, epoch) alone, so it is
the same on every DDP rank, after a resume and on every run; rank r takes stream[r::W].
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ltcli.errors import LtcliError

STRATEGIES = ("instance", "class", "sqrt", "progressive")
# For progressive, q is the END point of the schedule (class-balanced by default).
_STRATEGY_Q = {"instance": 1.0, "class": 0.0, "sqrt": 0.5, "progressive": 0.0}
# Mixed into the seed so the sampler's stream is independent of other (seed, epoch) streams.
_SALT = 0x5A3B1E


def _check_q(q: float) -> float:
    q = float(q)
    if not (math.isfinite(q) and 0.0 <= q <= 1.0):
        raise LtcliError(f"--sampling-q {q:g}: must be between 0 and 1")
    return q


def _counts_array(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or len(c) == 0 or not np.all(np.isfinite(c)) or (c < 0).any():
        raise ValueError(f"class counts must be a non-empty 1-D list of counts >= 0, got {counts!r}")
    if not (c > 0).any():
        raise LtcliError("sampling: the train split has no images")
    return c


def class_probabilities(counts: Sequence[int] | np.ndarray, q: float) -> np.ndarray:
    """p_j ∝ n_j^q over classes; classes with n_j = 0 get 0 (even for q = 0). Sums to 1."""
    q = _check_q(q)
    c = _counts_array(counts)
    w = np.zeros_like(c)
    present = c > 0
    w[present] = c[present] ** q  # q in [0, 1]: no overflow, and > 0 for every present class
    return w / w.sum()


def strategy_q(strategy: str, q: float | None) -> float:
    """The q of a --sampling strategy; an explicit --sampling-q overrides it.

    For "progressive" the q is the end point of the schedule (0 = class-balanced)."""
    s = strategy.strip().lower()
    if s not in _STRATEGY_Q:
        raise LtcliError(f"--sampling {strategy}: unknown (choose {', '.join(STRATEGIES)})")
    return _STRATEGY_Q[s] if q is None else _check_q(q)


def progressive_weight(epoch: int, total_epochs: int) -> float:
    """t/T of the progressive schedule, with t = epoch (0-based) and T = total_epochs − 1.

    A one-epoch run (T = 0) stays instance-balanced: the schedule starts at t = 0 and has
    nowhere to go. Epochs past T (a resume with more epochs) stay at the end point."""
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    if total_epochs == 1:
        return 0.0
    return min(max(epoch / (total_epochs - 1), 0.0), 1.0)


def progressive_probabilities(
    counts: Sequence[int] | np.ndarray, epoch: int, total_epochs: int, q_end: float = 0.0
) -> np.ndarray:
    """p(t) = (1 − t/T)·p^IB + (t/T)·p^CB (p^CB generalised to p ∝ n^q_end)."""
    a = progressive_weight(epoch, total_epochs)
    return (1.0 - a) * class_probabilities(counts, 1.0) + a * class_probabilities(counts, q_end)


class LongTailSampler(Sampler[int]):
    """Instance / class / sqrt / q / progressive sampling, deterministic and DDP-aware.

    Epoch length is len(labels) whatever the strategy (as in the official code) unless
    `num_samples` is given. An effective q of 1 (instance, not progressive) is a seeded
    permutation, i.e. the usual shuffle. Otherwise each draw picks a class from p_j and
    takes the next image from that class's shuffled cycle (reshuffled when exhausted), so
    an image repeats only once its whole class has been seen; the cycles restart every
    epoch so that an epoch depends on (seed, epoch) only. `samples_per_draw` k takes k
    consecutive images per class draw (the official class-aware sampler uses 4).

    With world_size W, rank r yields stream[r::W] of the global stream, padded by wrapping
    round to ceil(num_samples / W) per rank (like DistributedSampler): the ranks' shares are
    disjoint positions of one stream.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        strategy: str = "instance",
        q: float | None = None,
        num_samples: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        total_epochs: int = 1,
        samples_per_draw: int = 1,
        num_classes: int | None = None,
    ) -> None:
        if isinstance(labels, torch.Tensor):
            labels = labels.cpu().numpy()
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise LtcliError("sampling: the train split has no images")
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise ValueError("labels must be integers >= 0")
        self.labels = labels.astype(np.int64)
        self.strategy = strategy.strip().lower()
        self.q = strategy_q(strategy, q)
        self.counts = np.bincount(self.labels, minlength=num_classes or 0)
        if num_classes is not None and len(self.counts) > num_classes:
            raise ValueError(f"a label is >= num_classes ({num_classes})")
        self.num_samples = len(self.labels) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if total_epochs < 1 or samples_per_draw < 1:
            raise ValueError("total_epochs and samples_per_draw must be >= 1")
        # SeedSequence wants non-negative entropy.
        self.seed = int(seed) % 2**63
        self.rank, self.world_size = int(rank), int(world_size)
        self.total_epochs = int(total_epochs)
        self.samples_per_draw = int(samples_per_draw)
        self.epoch = 0
        # Indices grouped by class (stable, so class c is order[start[c]:start[c] + n_c]).
        self._order = np.argsort(self.labels, kind="stable")
        self._start = np.cumsum(self.counts) - self.counts
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def is_permutation(self) -> bool:
        """True when an epoch is a plain shuffle (instance-balanced, without replacement)."""
        return self.strategy != "progressive" and self.q == 1.0

    def class_probabilities_at(self, epoch: int) -> np.ndarray:
        """The p_j used in `epoch` (for logging)."""
        if self.strategy == "progressive":
            return progressive_probabilities(self.counts, epoch, self.total_epochs, self.q)
        return class_probabilities(self.counts, self.q)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The global stream of `epoch` (all ranks together), num_samples long, read-only."""
        epoch = int(epoch)
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([_SALT, self.seed, epoch % 2**63])
        if self.is_permutation:
            n = len(self.labels)
            reps = -(-self.num_samples // n)
            stream = np.concatenate([rng.permutation(n) for _ in range(reps)])[: self.num_samples]
        else:
            stream = self._class_stream(self.class_probabilities_at(epoch), rng)
        stream = stream.astype(np.int64, copy=False)
        stream.flags.writeable = False
        self._cached = (epoch, stream)
        return stream

    def rank_indices(self, epoch: int) -> np.ndarray:
        """This rank's share of `epoch`: stream[rank::world_size], padded to len(self)."""
        stream = self.epoch_indices(epoch)
        if self.world_size == 1:
            return stream
        return np.resize(stream, len(self) * self.world_size)[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices(self.epoch).tolist())

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)

    def _class_stream(self, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draw classes from p, then map the r-th draw of class c to its cycle's r-th image."""
        n_total, k = self.num_samples, self.samples_per_draw
        num_classes = len(p)
        # Inverse-CDF draws; the CDF is pinned to 1 from the last possible class on so that
        # rounding can never select a trailing class with p = 0.
        cdf = np.cumsum(p)
        cdf[np.flatnonzero(p)[-1] :] = 1.0
        cls = np.searchsorted(cdf, rng.random(-(-n_total // k)), side="right")
        cls = np.repeat(cls, k)[:n_total]

        occ = np.bincount(cls, minlength=num_classes)  # draws per class
        n = self.counts
        # Class c needs ceil(occ_c / n_c) shuffled copies ("blocks") of its images.
        blocks = np.zeros(num_classes, dtype=np.int64)
        drawn = occ > 0  # implies n_c > 0
        blocks[drawn] = -(-occ[drawn] // n[drawn])
        block_class = np.repeat(np.arange(num_classes), blocks)
        block_len = n[block_class]
        block_first = np.cumsum(block_len) - block_len
        pos_in_block = np.arange(block_len.sum()) - np.repeat(block_first, block_len)
        elems = self._order[np.repeat(self._start[block_class], block_len) + pos_in_block]
        # Shuffle inside each block: sort by (block id, random 32-bit key), packed in one int64.
        keys = np.repeat(np.arange(len(block_class), dtype=np.int64) << 32, block_len)
        keys |= rng.integers(0, 2**32, size=len(keys), dtype=np.int64)
        cycle = elems[np.argsort(keys)]

        # Stream positions grouped by class, in stream order; class c's r-th draw gets
        # cycle[cycle_first[c] + r].
        cycle_first = np.cumsum(n * blocks) - n * blocks
        group_first = np.cumsum(occ) - occ
        positions = np.argsort(cls, kind="stable")
        take = np.arange(n_total) + np.repeat(cycle_first - group_first, occ)
        stream = np.empty(n_total, dtype=np.int64)
        stream[positions] = cycle[take]
        return stream
