"""Samplers: class frequencies match p_j, permutations, DDP shares, progressive, determinism."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltcli.errors import LtcliError
from ltcli.sampling import (
    LongTailSampler,
    class_probabilities,
    progressive_probabilities,
    strategy_q,
)

COUNTS = [400, 150, 60, 20, 8, 3]


def _labels(counts, seed=0):
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(len(counts)), counts))


def _assert_freqs_match(labels, stream, p):
    """Each class frequency within 5 standard errors of p_j (seeded, so never flaky)."""
    n = len(stream)
    freq = np.bincount(labels[stream], minlength=len(p)) / n
    tol = 5 * np.sqrt(p * (1 - p) / n) + 1e-12
    assert np.all(np.abs(freq - p) <= tol), (freq, p)


# ------------------------------------------------------------------ probabilities
def test_class_probabilities_values():
    np.testing.assert_allclose(class_probabilities([100, 25, 0, 1], 0.5), [10 / 16, 5 / 16, 0, 1 / 16])
    np.testing.assert_allclose(class_probabilities([100, 25, 0, 1], 0), [1 / 3, 1 / 3, 0, 1 / 3])
    np.testing.assert_allclose(class_probabilities([100, 25, 0, 1], 1), [100 / 126, 25 / 126, 0, 1 / 126])


def test_class_probabilities_bad_inputs():
    with pytest.raises(LtcliError, match="no images"):
        class_probabilities([0, 0], 0.5)
    with pytest.raises(LtcliError, match="--sampling-q"):
        class_probabilities([1, 2], 1.5)


def test_strategy_q():
    assert strategy_q("instance", None) == 1.0
    assert strategy_q("class", None) == 0.0
    assert strategy_q("sqrt", None) == 0.5
    assert strategy_q("progressive", None) == 0.0
    assert strategy_q("class", 0.25) == 0.25
    with pytest.raises(LtcliError, match=r"^--sampling bogus: unknown \(choose instance, class, sqrt, progressive\)$"):
        strategy_q("bogus", None)
    for bad in (-0.1, 1.1, float("nan"), float("inf")):
        with pytest.raises(LtcliError, match="^--sampling-q .*: must be between 0 and 1$"):
            strategy_q("instance", bad)


def test_progressive_schedule():
    ib, cb = class_probabilities(COUNTS, 1), class_probabilities(COUNTS, 0)
    np.testing.assert_allclose(progressive_probabilities(COUNTS, 0, 5), ib)
    np.testing.assert_allclose(progressive_probabilities(COUNTS, 4, 5), cb)
    np.testing.assert_allclose(progressive_probabilities(COUNTS, 2, 5), (ib + cb) / 2)
    np.testing.assert_allclose(progressive_probabilities(COUNTS, 9, 5), cb)  # past the end: stays
    np.testing.assert_allclose(progressive_probabilities(COUNTS, 0, 1), ib)  # one epoch: instance


# ------------------------------------------------------------------ sampler streams
@pytest.mark.parametrize("strategy,q", [("class", 0.0), ("sqrt", 0.5), ("instance", 0.3), ("class", 0.8)])
def test_empirical_frequencies_match_p(strategy, q):
    labels = _labels(COUNTS)
    s = LongTailSampler(labels, strategy, q=q, num_samples=200_000, seed=3)
    _assert_freqs_match(labels, s.epoch_indices(0), class_probabilities(COUNTS, q))


@pytest.mark.parametrize("strategy", ["class", "sqrt"])
def test_empirical_frequencies_default_epoch_length(strategy):
    labels = _labels(COUNTS)
    s = LongTailSampler(labels, strategy, seed=1)
    assert len(s) == len(labels)  # epoch length is len(labels) whatever the strategy
    stream = np.concatenate([s.epoch_indices(e) for e in range(100)])
    _assert_freqs_match(labels, stream, class_probabilities(COUNTS, strategy_q(strategy, None)))


def test_instance_is_a_permutation():
    labels = _labels(COUNTS)
    s = LongTailSampler(labels, "instance", seed=5)
    stream = s.epoch_indices(0)
    assert s.is_permutation
    assert sorted(stream.tolist()) == list(range(len(labels)))
    assert not np.array_equal(stream, np.arange(len(labels)))
    # longer epochs are whole permutations back to back
    s2 = LongTailSampler(labels, "instance", num_samples=2 * len(labels) + 7)
    st2 = s2.epoch_indices(0)
    assert sorted(st2[: len(labels)].tolist()) == list(range(len(labels)))
    assert np.bincount(st2, minlength=len(labels)).min() == 2


def test_q_override_one_is_a_permutation():
    labels = _labels(COUNTS)
    assert LongTailSampler(labels, "class", q=1.0).is_permutation
    assert not LongTailSampler(labels, "progressive").is_permutation


def test_class_draws_cycle_through_each_class_without_repeats():
    labels = _labels(COUNTS)
    s = LongTailSampler(labels, "class", num_samples=5000, seed=2)
    stream = s.epoch_indices(0)
    for c, n_c in enumerate(COUNTS):
        seq = stream[labels[stream] == c]
        members = np.flatnonzero(labels == c)
        for start in range(0, len(seq) - n_c + 1, n_c):  # each full cycle is a permutation
            assert sorted(seq[start : start + n_c].tolist()) == members.tolist()
        tail = seq[len(seq) // n_c * n_c :]
        assert len(set(tail.tolist())) == len(tail)


def test_zero_count_classes_never_drawn():
    counts = [0, 50, 0, 5, 0]
    labels = _labels(counts)
    for strategy in ("class", "sqrt", "progressive"):
        s = LongTailSampler(labels, strategy, num_samples=10_000, num_classes=5, total_epochs=3)
        assert len(s.class_probabilities_at(1)) == 5
        drawn = np.unique(labels[s.epoch_indices(1)])
        assert drawn.tolist() == [1, 3]


def test_samples_per_draw_gives_runs_of_one_class():
    labels = _labels(COUNTS)
    s = LongTailSampler(labels, "class", num_samples=4001, samples_per_draw=4)
    cls = labels[s.epoch_indices(0)]
    runs = cls[:4000].reshape(-1, 4)
    assert (runs == runs[:, :1]).all()
    assert len(cls) == 4001


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("strategy", ["instance", "sqrt"])
def test_ranks_share_one_stream(world_size, strategy):
    labels = _labels([30, 10, 3])  # 43 samples: not divisible by most world sizes
    ranks = [LongTailSampler(labels, strategy, seed=9, rank=r, world_size=world_size) for r in range(world_size)]
    for s in ranks:
        s.set_epoch(4)
    shares = [list(s) for s in ranks]
    per_rank = -(-len(labels) // world_size)
    assert all(len(sh) == per_rank == len(s) for sh, s in zip(shares, ranks))
    stream = ranks[0].epoch_indices(4)
    # interleaving the shares restores the stream (then the wrap-round padding)
    merged = np.empty(per_rank * world_size, dtype=np.int64)
    for r, sh in enumerate(shares):
        merged[r::world_size] = sh
    np.testing.assert_array_equal(merged[: len(stream)], stream)
    np.testing.assert_array_equal(merged[len(stream) :], stream[: len(merged) - len(stream)])
    # every rank computed the same global stream
    for s in ranks[1:]:
        np.testing.assert_array_equal(s.epoch_indices(4), stream)


def test_progressive_endpoints_empirical():
    labels = _labels(COUNTS)
    s = LongTailSampler(labels, "progressive", num_samples=200_000, total_epochs=6, seed=4)
    np.testing.assert_allclose(s.class_probabilities_at(0), class_probabilities(COUNTS, 1))
    np.testing.assert_allclose(s.class_probabilities_at(5), class_probabilities(COUNTS, 0))
    _assert_freqs_match(labels, s.epoch_indices(0), class_probabilities(COUNTS, 1))
    _assert_freqs_match(labels, s.epoch_indices(5), class_probabilities(COUNTS, 0))
    _assert_freqs_match(labels, s.epoch_indices(2), progressive_probabilities(COUNTS, 2, 6))


def test_progressive_with_q_ends_at_q():
    s = LongTailSampler(_labels(COUNTS), "progressive", q=0.5, total_epochs=3)
    np.testing.assert_allclose(s.class_probabilities_at(2), class_probabilities(COUNTS, 0.5))


@pytest.mark.parametrize("strategy", ["instance", "class", "progressive"])
def test_deterministic_per_seed_and_epoch(strategy):
    labels = _labels(COUNTS)
    a = LongTailSampler(labels, strategy, seed=11, total_epochs=4)
    b = LongTailSampler(labels, strategy, seed=11, total_epochs=4)
    np.testing.assert_array_equal(a.epoch_indices(2), b.epoch_indices(2))
    assert not np.array_equal(a.epoch_indices(1), a.epoch_indices(2))
    assert not np.array_equal(a.epoch_indices(2), LongTailSampler(labels, strategy, seed=12, total_epochs=4).epoch_indices(2))
    a.set_epoch(3)
    assert list(a) == a.epoch_indices(3).tolist()
    assert list(a) == list(a)


def test_bad_sampler_arguments():
    with pytest.raises(LtcliError, match="^--sampling nope"):
        LongTailSampler([0, 1], "nope")
    with pytest.raises(LtcliError, match="no images"):
        LongTailSampler([], "class")
    with pytest.raises(ValueError):
        LongTailSampler([0, 1], rank=2, world_size=2)


def test_one_million_labels_is_fast():
    counts = [int(1000 * 100 ** (-i / 999)) + 1 for i in range(1000)]
    labels = np.resize(_labels(counts), 1_000_000)
    for strategy in ("instance", "class"):
        s = LongTailSampler(labels, strategy, world_size=4, rank=3)
        t = time.perf_counter()
        share = s.rank_indices(0)
        assert time.perf_counter() - t < 1.5
        assert len(share) == 250_000


# ------------------------------------------------------------------ properties (hypothesis)
counts_st = st.lists(st.integers(0, 10**6), min_size=1, max_size=50).filter(lambda c: any(c))
q_st = st.floats(0.0, 1.0, allow_nan=False)


@given(counts_st, q_st)
def test_prop_probabilities_sum_to_one(counts, q):
    p = class_probabilities(counts, q)
    assert p.shape == (len(counts),)
    assert np.all(p >= 0)
    assert abs(p.sum() - 1.0) < 1e-9
    assert np.all(p[np.asarray(counts) == 0] == 0)


@given(counts_st, st.floats(0.0, 1.0, exclude_max=True, allow_nan=False))
def test_prop_every_class_reachable_when_q_below_one(counts, q):
    p = class_probabilities(counts, q)
    assert np.all(p[np.asarray(counts) > 0] > 0)
    # and more images never means a lower probability
    order = np.argsort(counts, kind="stable")
    assert np.all(np.diff(p[order]) >= -1e-15)


@given(counts_st, st.integers(1, 300), st.integers(0, 400))
def test_prop_progressive(counts, total, epoch):
    p = progressive_probabilities(counts, epoch, total)
    assert abs(p.sum() - 1.0) < 1e-9
    np.testing.assert_allclose(progressive_probabilities(counts, 0, total), class_probabilities(counts, 1.0))
    if total > 1:
        np.testing.assert_allclose(progressive_probabilities(counts, total - 1, total), class_probabilities(counts, 0.0))
    lo = np.minimum(class_probabilities(counts, 1.0), class_probabilities(counts, 0.0))
    hi = np.maximum(class_probabilities(counts, 1.0), class_probabilities(counts, 0.0))
    assert np.all(p >= lo - 1e-12) and np.all(p <= hi + 1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 30), min_size=1, max_size=8).filter(lambda c: any(c)),
    st.sampled_from(["instance", "class", "sqrt", "progressive"]),
    st.integers(1, 5),
    st.integers(0, 2**31),
    st.integers(0, 5),
)
def test_prop_sampler_stream_valid_and_ranks_cover_it(counts, strategy, world, seed, epoch):
    labels = _labels(counts, seed=seed % 7)
    samplers = [LongTailSampler(labels, strategy, seed=seed, rank=r, world_size=world, total_epochs=4) for r in range(world)]
    stream = samplers[0].epoch_indices(epoch)
    assert len(stream) == len(labels)
    assert stream.min() >= 0 and stream.max() < len(labels)
    p = samplers[0].class_probabilities_at(epoch)
    assert np.all(p[labels[stream]] > 0)  # only classes with p > 0 appear
    shares = [s.rank_indices(epoch) for s in samplers]
    assert len({len(sh) for sh in shares}) == 1
    merged = np.empty(len(shares[0]) * world, dtype=np.int64)
    for r, sh in enumerate(shares):
        merged[r::world] = sh
    np.testing.assert_array_equal(merged[: len(stream)], stream)
