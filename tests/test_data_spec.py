"""--data SPEC parsing, the long-tail profile, and the list-file parser."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltcli.data import longtail_counts, parse_spec, resolve_spec
from ltcli.data.listfile import ListEntry, parse_list_text, resolve_entry
from ltcli.errors import LtcliError


def test_parse_kinds():
    assert parse_spec("synthetic").kind == "synthetic"
    assert parse_spec("cifar10").root is None
    assert parse_spec("cifar100:/d").root == "/d"
    assert parse_spec("imagefolder:data/c").root == "data/c"
    assert parse_spec("inat:/x").kind == "inat"
    s = parse_spec("list:/r:a.txt,b.txt,c.txt")
    assert (s.root, s.lists) == ("/r", ("a.txt", "b.txt", "c.txt"))
    assert parse_spec("list:/r:a.txt,,c.txt").lists == ("a.txt", None, "c.txt")
    assert parse_spec("list:C:/r:a.txt").root == "C:/r"  # ROOT may hold ':'


@pytest.mark.parametrize(
    "spec, words",
    [
        ("foo:/x", ["unknown data kind 'foo'", "imagefolder:ROOT"]),
        ("imagefolder", ["expected imagefolder:ROOT"]),
        ("inat:", ["expected inat:ROOT"]),
        ("list:/r", ["expected list:ROOT:TRAIN.txt"]),
        ("list:/r:,b.txt", ["train list file is required"]),
        ("list:/r:a,b,c,d", ["at most three"]),
        ("synthetic:3", ["takes no argument"]),
    ],
)
def test_parse_errors_name_the_option(spec, words):
    with pytest.raises(LtcliError) as err:
        parse_spec(spec)
    msg = str(err.value)
    assert msg.startswith(f"--data {spec}")
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_resolve_spec_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_spec("synthetic") == "synthetic"
    assert resolve_spec("cifar10") == "cifar10"
    assert resolve_spec("imagefolder:d") == f"imagefolder:{tmp_path / 'd'}"
    assert resolve_spec("list:r:a.txt,,c.txt") == f"list:{tmp_path / 'r'}:{tmp_path / 'a.txt'},,{tmp_path / 'c.txt'}"


def test_longtail_counts_cifar10_if100():
    counts = longtail_counts(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406


def test_longtail_counts_edges():
    assert longtail_counts(500, 10, 1) == [500] * 10
    assert longtail_counts(7, 1, 50) == [7]
    c = longtail_counts(500, 100, 10)
    assert c[0] == 500 and c[-1] == 50 and all(a >= b for a, b in zip(c, c[1:]))
    with pytest.raises(LtcliError, match="--imbalance-factor"):
        longtail_counts(500, 10, 0.5)


# ---- list-file parser: property tests -------------------------------------------------

_path_chars = st.characters(whitelist_categories=("L", "N"), whitelist_characters="/_-.")
paths = st.text(_path_chars, min_size=1, max_size=30).filter(lambda p: p.strip() and not p.startswith("\ufeff"))
labels = st.integers(min_value=0, max_value=10**6)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(paths, labels, st.sampled_from([" ", "\t", "  "])), min_size=1, max_size=20),
       st.sampled_from(["\n", "\r\n"]))
def test_valid_lines_parse(rows, newline):
    text = newline.join(f"{p}{sep}{lab}" for p, lab, sep in rows) + newline
    entries = parse_list_text(text, "x.txt")
    assert [(e.path, e.label) for e in entries] == [(p, lab) for p, lab, _ in rows]
    assert [e.lineno for e in entries] == list(range(1, len(rows) + 1))


bad_line = st.one_of(
    paths,                                                        # no label
    st.tuples(paths, st.text("abcxyz.", min_size=1, max_size=4)).map(" ".join),   # label not an int
    st.tuples(paths, st.floats(0.5, 99.5).map(lambda f: f"{f:.2f}")).map(" ".join),
    st.tuples(paths, st.integers(-1000, -1).map(str)).map(" ".join),  # negative label
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(paths, labels), max_size=8), bad_line, st.integers(0, 3))
def test_malformed_line_names_file_and_line(good, bad, blanks):
    lines = [f"{p} {lab}" for p, lab in good] + [""] * blanks + [bad]
    lineno = len(lines)
    with pytest.raises(LtcliError) as err:
        parse_list_text("\n".join(lines), "lists/train.txt")
    msg = str(err.value)
    assert msg.startswith(f"lists/train.txt:{lineno}: ")
    assert "\n" not in msg
    assert ("expected 'path label'" in msg) or ("negative" in msg)


def test_paths_with_spaces_and_blank_lines():
    entries = parse_list_text("\n a dir/img 1.jpg  3 \n\n b.jpg\t0\n", "f")
    assert entries == [ListEntry("a dir/img 1.jpg", 3, 2), ListEntry("b.jpg", 0, 4)]


def test_resolve_entry_refuses_escape(tmp_path):
    root = str(tmp_path / "root")
    key, full = resolve_entry(ListEntry("a/../b/c.jpg", 0, 1), root, "l.txt", False)
    assert key == "b/c.jpg" and full == os.path.join(root, "b", "c.jpg")
    inside = os.path.join(root, "x", "y.jpg")
    assert resolve_entry(ListEntry(inside, 0, 1), root, "l.txt", False)[0] == "x/y.jpg"
    for bad in ("../c.jpg", "a/../../c.jpg", str(tmp_path / "other.jpg")):
        with pytest.raises(LtcliError, match=r"^l\.txt:7: .*outside the data root"):
            resolve_entry(ListEntry(bad, 0, 7), root, "l.txt", False)
    key, full = resolve_entry(ListEntry("../c.jpg", 0, 1), root, "l.txt", True)
    assert key == "../c.jpg" and full == str(tmp_path / "c.jpg")
