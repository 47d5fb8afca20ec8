"""Property tests (hypothesis) for the parsers and samplers, beyond the ones next to each module
(tests/test_grid.py, test_data_spec.py, test_sampling.py already cover: grid ranges and lists,
valid/malformed list lines on a small alphabet, class_probabilities / progressive_probabilities
sums and bounds, sampler streams across ranks).

Here: the data-spec parser on any text (and through the CLI), list files on any Unicode path,
list paths never leaving their root, τ grids on any text and round-tripped, and the sampler
objects themselves (per-epoch probabilities, progressive end points, every class drawn under
class-balanced sampling, no repeat within a class before its cycle ends, k-image runs)."""

from __future__ import annotations

import os
import posixpath

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from ltcli.data.listfile import ListEntry, parse_list_text, resolve_entry
from ltcli.data.spec import DataSpec, parse_spec, resolve_spec
from ltcli.errors import LtcliError
from ltcli.grid import MAX_VALUES, parse_grid
from ltcli.sampling import LongTailSampler, class_probabilities, strategy_q

# --- data specs ------------------------------------------------------------------------------------

KINDS = ["synthetic", "imagefolder", "list", "inat", "cifar10", "cifar100"]
spec_text = st.one_of(
    st.text(max_size=40),
    st.builds(lambda k, sep, rest: k + sep + rest, st.sampled_from(KINDS + ["LIST", "Inat", "foo", ""]),
              st.sampled_from([":", "", "::"]), st.text(max_size=30)),
)


@settings(max_examples=300, deadline=None)
@given(spec_text)
def test_any_spec_parses_or_names_the_data_option(text):
    try:
        ds = parse_spec(text)
    except LtcliError as exc:
        assert str(exc).startswith("--data "), str(exc)
        return
    assert ds.kind in KINDS
    if ds.kind in ("imagefolder", "inat"):
        assert ds.root
    if ds.kind == "list":
        assert ds.root and 1 <= len(ds.lists) <= 3 and ds.lists[0] is not None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec_text)
def test_rejected_specs_give_one_line_and_exit_2_through_the_cli(tmp_path, text):
    try:
        parse_spec(text)
    except LtcliError:
        pass
    else:
        assume(False)   # a valid spec would start a real job
    r = run_cli(["train-backbone", "--run", tmp_path / "run", "--data", text])
    assert r.code == 2 and r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ltcli: error: --data"), r.err
    assert not (tmp_path / "run").exists()


_name = st.text(st.characters(blacklist_characters=":,", blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp")),
                min_size=1, max_size=12)
_root = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp")), min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(_root, _name, st.one_of(st.none(), _name), st.one_of(st.none(), _name), st.sampled_from(["list", "LIST", "List"]))
def test_list_spec_round_trip(root, train, val, test, kind):
    """ROOT may hold ':' (only the part after the last ':' names list files); empty fields skip a split."""
    assume(not root.endswith(":"))
    names = [train, val, test]
    while names and names[-1] is None:
        names.pop()
    spec = f"{kind}:{root}:" + ",".join(n or "" for n in names)
    assert parse_spec(spec) == DataSpec("list", root=root, lists=tuple(names))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters="._-"),
                        min_size=1, max_size=8), min_size=1, max_size=4),
       st.sampled_from(["imagefolder", "inat", "list", "cifar10"]))
def test_resolve_spec_is_absolute_and_idempotent(parts, kind):
    rel = "/".join(parts)
    spec = f"{kind}:{rel}" if kind != "list" else f"list:{rel}:{rel}/train.txt,,{rel}/test.txt"
    once = resolve_spec(spec)
    assert resolve_spec(once) == once
    ds = parse_spec(once)
    assert ds.kind == kind and os.path.isabs(ds.root)
    assert all(f is None or os.path.isabs(f) for f in ds.lists)


# --- list files ------------------------------------------------------------------------------------

# any character a file name may hold except line breaks and NUL; no whitespace at either end
_path_char = st.characters(blacklist_characters="\n\r\x00", blacklist_categories=("Cs",))
list_paths = st.text(_path_char, min_size=1, max_size=24).filter(
    lambda p: p == p.strip() and not p.startswith("\ufeff"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(list_paths, st.integers(0, 10**9), st.sampled_from([" ", "\t", " \t "]),
                          st.integers(0, 2)), min_size=1, max_size=15),
       st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_any_unicode_path_round_trips_with_its_line_number(rows, newline, bom):
    lines, want = [], []
    for path, label, sep, blanks in rows:
        lines += [""] * blanks
        lines.append(f"{path}{sep}{label}")
        want.append(ListEntry(path, label, len(lines)))
    text = ("\ufeff" if bom else "") + newline.join(lines) + newline
    assert parse_list_text(text, "l.txt") == want


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gives_entries_or_an_error_naming_file_and_line(text):
    n_lines = len(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    try:
        entries = parse_list_text(text, "lists/x.txt")
    except LtcliError as exc:
        msg = str(exc)
        assert msg.startswith("lists/x.txt:"), msg
        lineno = int(msg.split(":")[1])
        assert 1 <= lineno <= n_lines
        return
    for e in entries:
        assert e.label >= 0 and e.path and 1 <= e.lineno <= n_lines
    assert [e.lineno for e in entries] == sorted({e.lineno for e in entries})


segments = st.lists(st.sampled_from(["..", ".", "a", "b", "", "c d"]), min_size=1, max_size=7)


@settings(max_examples=400, deadline=None)
@given(segments, st.booleans(), st.booleans())
def test_list_paths_never_leave_the_root_unless_allowed(parts, absolute, allow):
    root = os.path.join(os.path.sep, "data", "root")
    path = "/".join(parts)
    if absolute:
        path = os.path.join(os.path.sep, "data", path)
    assume(path.strip())
    target = os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))
    inside = os.path.commonpath([root, target]) == root
    entry = ListEntry(path, 0, 3)
    if not inside and not allow:
        with pytest.raises(LtcliError, match=r"^l\.txt:3: path .* lies outside the data root"):
            resolve_entry(entry, root, "l.txt", allow)
        return
    key, full = resolve_entry(entry, root, "l.txt", allow)
    assert full == target
    if inside:   # the key (what selection and fingerprints hash) is the path relative to ROOT
        assert key == posixpath.normpath(os.path.relpath(target, root).replace(os.sep, "/"))


# --- τ grids ---------------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.text(max_size=30), st.sampled_from(["--grid", "--tau-grid"]))
def test_any_grid_text_gives_sorted_taus_or_one_line_error(text, option):
    try:
        grid = parse_grid(text, option=option)
    except LtcliError as exc:
        assert str(exc).startswith(f"{option}: ")
        return
    assert 1 <= len(grid) <= MAX_VALUES
    assert all(np.isfinite(v) and v >= 0 for v in grid)
    assert grid == sorted(set(grid))


@settings(max_examples=200, deadline=None)
@given(st.decimals(0, 50, places=2), st.decimals("0.01", 5, places=2), st.integers(0, 200))
def test_grid_round_trips_as_a_list(start, step, n):
    grid = parse_grid(f"{start}:{start + n * step}:{step}")
    assert parse_grid(",".join(repr(v) for v in grid)) == grid
    assert parse_grid(",".join(repr(v) for v in reversed(grid + grid[:3]))) == grid   # order, duplicates


# --- samplers ----------------------------------------------------------------------------------------

counts_st = st.lists(st.integers(0, 60), min_size=1, max_size=8).filter(lambda c: sum(c) > 0)


def _labels(counts):
    return np.repeat(np.arange(len(counts)), counts)


@settings(max_examples=150, deadline=None)
@given(counts_st, st.sampled_from(["instance", "class", "sqrt", "progressive"]),
       st.one_of(st.none(), st.floats(0, 1)), st.integers(1, 30), st.integers(0, 40))
def test_sampler_probabilities_sum_to_one_every_epoch(counts, strategy, q, total, epoch):
    s = LongTailSampler(_labels(counts), strategy, q=q, total_epochs=total, num_classes=len(counts))
    p = s.class_probabilities_at(epoch)
    assert p.shape == (len(counts),) and abs(p.sum() - 1) < 1e-9 and (p >= 0).all()
    assert (p[np.asarray(counts) == 0] == 0).all()
    if s.q < 1 or strategy == "progressive" and 0 < epoch:
        assert (p[np.asarray(counts) > 0] > 0).all()   # every class with images is reachable


@settings(max_examples=150, deadline=None)
@given(counts_st, st.one_of(st.none(), st.floats(0, 1)), st.integers(2, 50))
def test_progressive_sampler_end_points(counts, q_end, total):
    s = LongTailSampler(_labels(counts), "progressive", q=q_end, total_epochs=total, num_classes=len(counts))
    end_q = strategy_q("progressive", q_end)
    np.testing.assert_allclose(s.class_probabilities_at(0), class_probabilities(counts, 1.0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.class_probabilities_at(total - 1), class_probabilities(counts, end_q),
                               rtol=0, atol=1e-12)
    # past the end (a resume with more epochs) it stays at the end point
    np.testing.assert_allclose(s.class_probabilities_at(total + 5), class_probabilities(counts, end_q),
                               rtol=0, atol=1e-12)
    # one epoch: the schedule has nowhere to go and stays instance-balanced
    one = LongTailSampler(_labels(counts), "progressive", q=q_end, total_epochs=1, num_classes=len(counts))
    np.testing.assert_allclose(one.class_probabilities_at(0), class_probabilities(counts, 1.0), atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(counts_st, st.integers(0, 2**31), st.integers(0, 5), st.sampled_from(["class", "progressive"]))
def test_class_balanced_streams_reach_every_class(counts, seed, epoch, strategy):
    """q = 0 (class, or progressive at its last epoch): 60 draws per class make missing a class
    a 1-in-e^60 event, so every class with an image is drawn. A progressive schedule needs two
    epochs or more to reach q = 0 (a one-epoch run stays instance-balanced, as tested above)."""
    c = len(counts)
    last = epoch + 1 if strategy == "progressive" else epoch
    s = LongTailSampler(_labels(counts), strategy, seed=seed, total_epochs=last + 1, num_samples=60 * c,
                        num_classes=c)
    drawn = set(_labels(counts)[s.epoch_indices(last)].tolist())
    assert drawn == {j for j in range(c) if counts[j] > 0}


@settings(max_examples=100, deadline=None)
@given(counts_st, st.integers(0, 2**31), st.sampled_from(["class", "sqrt", "progressive"]),
       st.integers(1, 4), st.integers(1, 400))
def test_no_repeat_within_a_class_before_its_cycle_ends(counts, seed, strategy, k, num_samples):
    labels = _labels(counts)
    s = LongTailSampler(labels, strategy, seed=seed, total_epochs=3, num_samples=num_samples,
                        samples_per_draw=k, num_classes=len(counts))
    stream = s.epoch_indices(1)
    assert len(stream) == num_samples and stream.min() >= 0 and stream.max() < len(labels)
    for j, n in enumerate(counts):
        seq = stream[labels[stream] == j]
        for start in range(0, len(seq), max(n, 1)):
            block = seq[start:start + n]
            assert len(set(block.tolist())) == len(block)       # each cycle is a permutation
            assert (labels[block] == j).all()
    # k consecutive images of one class per draw
    full = (num_samples // k) * k
    assert (labels[stream[:full]].reshape(-1, k) == labels[stream[:full:k]][:, None]).all()
