from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltcli.errors import LtcliError
from ltcli.grid import MAX_VALUES, parse_grid


def test_default_grid_has_41_clean_values():
    grid = parse_grid("0:2:0.05")
    assert len(grid) == 41
    assert grid[0] == 0.0 and grid[-1] == 2.0
    assert grid[6] == 0.3  # not 0.30000000000000004
    assert all(repr(v) == repr(float(Decimal("0.05") * i)) for i, v in enumerate(grid))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0:1:0.1", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
        ("0:1:0.3", [0.0, 0.3, 0.6, 0.9]),  # STOP not on the grid: not added
        ("0.5:0.5:0.1", [0.5]),
        (" 0 : 2 : 1 ", [0.0, 1.0, 2.0]),
        ("0,0.5,1", [0.0, 0.5, 1.0]),
        ("1, 0.5,0,0.5", [0.0, 0.5, 1.0]),  # sorted, duplicates dropped
        ("0.7", [0.7]),
        ("1e-1:3e-1:1e-1", [0.1, 0.2, 0.3]),
        ("0:1:0.3333333", [0.0, 0.3333333, 0.6666666, 0.9999999]),
    ],
)
def test_cases(text, expected):
    assert parse_grid(text) == expected


def test_stop_reached_within_tolerance_is_clamped_to_stop():
    # 1 / 0.33333333334 is 2.99999999994: STOP counts as reached and is reported exactly.
    assert parse_grid("0:1:0.33333333334")[-1] == 1.0


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("0:1", "malformed"),
        ("0:1:0.1:2", "malformed"),
        ("a:1:0.1", "not a number"),
        ("0::0.1", "STOP is empty"),
        ("0:1:0", "STEP must be > 0"),
        ("0:1:-0.1", "STEP must be > 0"),
        ("1:0:0.1", "greater than STOP"),
        ("nan:1:0.1", "not finite"),
        ("0:inf:1", "not finite"),
        ("0:1:1e400", "not finite"),
        ("0,,1", "value 2 is empty"),
        ("0,1,", "value 3 is empty"),
        ("0,x", "not a number"),
        ("nan", "not finite"),
        ("-0.5", "τ must be >= 0"),
        ("-1:1:0.5", "τ must be >= 0"),
        ("0:1e9:1e-9", "more than 10,000"),
        ("0:10000:1", "more than 10,000"),
        ("0:1:1e-999999", "more than 10,000"),
    ],
)
def test_errors_name_the_option(text, fragment):
    with pytest.raises(LtcliError) as exc:
        parse_grid(text)
    msg = str(exc.value)
    assert msg.startswith("--grid: ")
    assert fragment in msg
    assert "\n" not in msg


def test_option_name_is_configurable():
    with pytest.raises(LtcliError, match=r"^--taus: "):
        parse_grid("", option="--taus")


def test_exactly_max_values_is_allowed():
    assert len(parse_grid(f"0:{MAX_VALUES - 1}:1")) == MAX_VALUES


decimals = st.decimals(min_value=0, max_value=100, places=3, allow_nan=False, allow_infinity=False)
steps = st.decimals(min_value=Decimal("0.001"), max_value=10, places=3, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(start=decimals, step=steps, n=st.integers(0, 300))
def test_range_property(start, step, n):
    stop = start + n * step
    grid = parse_grid(f"{start}:{stop}:{step}")
    assert len(grid) == n + 1
    assert grid[0] == float(start) and grid[-1] == float(stop)
    # every value is the correctly rounded decimal, so no 0.30000000000000004 drift
    assert grid == [float(start + i * step) for i in range(n + 1)]
    assert all(a < b for a, b in zip(grid, grid[1:]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=30))
def test_list_property(values):
    grid = parse_grid(",".join(repr(v) for v in values))
    assert grid == sorted(set(values))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789.:,-eEinfa +", max_size=20))
def test_any_text_gives_values_or_ltclierror(text):
    try:
        grid = parse_grid(text)
    except LtcliError as exc:
        assert str(exc).startswith("--grid: ")
        return
    assert 1 <= len(grid) <= MAX_VALUES
    assert all(v >= 0 and v == v and v != float("inf") for v in grid)
    assert grid == sorted(set(grid))
