"""Parse a τ grid given on the command line (`--grid`).

Two forms:
  START:STOP:STEP   inclusive of STOP (within a small tolerance), e.g. 0:2:0.05 -> 41 values
  A,B,C             an explicit list, e.g. 0,0.5,1 (a single number is a list of one)

Values are returned sorted and de-duplicated, so the τ table and plot read left to right.
Arithmetic is done in Decimal, so 0:1:0.1 gives 0.3 and not 0.30000000000000004.
"""

from __future__ import annotations

import math
from decimal import ROUND_FLOOR, Decimal, InvalidOperation

from .errors import LtcliError

MAX_VALUES = 10_000
# STOP counts as reached when it is within this fraction of a STEP (float-typed inputs such
# as 0:1:0.1 written by other tools, or 0:1:0.333333 meaning thirds).
_STOP_TOLERANCE = Decimal("1e-6")


def _number(token: str, option: str, what: str) -> Decimal:
    token = token.strip()
    if not token:
        raise LtcliError(f"{option}: {what} is empty")
    try:
        value = Decimal(token)
    except InvalidOperation:
        raise LtcliError(f"{option}: {what} {token!r} is not a number") from None
    # Decimal takes '1e400', which is inf as a float: refuse it here as well.
    if not value.is_finite() or not math.isfinite(float(value)):
        raise LtcliError(f"{option}: {what} {token!r} is not finite")
    return value


def _check_tau(value: Decimal, option: str) -> None:
    if value < 0:
        raise LtcliError(f"{option}: τ must be >= 0, got {value}")


def parse_grid(text: str, option: str = "--grid") -> list[float]:
    """Parse 'START:STOP:STEP' or 'A,B,C' into a sorted list of distinct τ values.

    Every malformed input raises LtcliError naming `option`."""
    if text is None or not str(text).strip():
        raise LtcliError(f"{option}: empty grid (expected START:STOP:STEP, e.g. 0:2:0.05, or a list 0,0.5,1)")
    text = str(text).strip()

    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise LtcliError(f"{option}: {text!r} is malformed (expected START:STOP:STEP, e.g. 0:2:0.05)")
        start = _number(parts[0], option, "START")
        stop = _number(parts[1], option, "STOP")
        step = _number(parts[2], option, "STEP")
        if step <= 0:
            raise LtcliError(f"{option}: STEP must be > 0, got {parts[2].strip()}")
        if start > stop:
            raise LtcliError(f"{option}: START ({parts[0].strip()}) is greater than STOP ({parts[1].strip()})")
        _check_tau(start, option)
        # Count before building anything, so '0:1e9:1e-9' fails fast instead of eating memory.
        too_many = LtcliError(f"{option}: {text!r} gives more than {MAX_VALUES:,} values")
        try:
            steps = (stop - start) / step + _STOP_TOLERANCE
        except ArithmeticError:  # beyond Decimal's exponent range, e.g. a STEP of 1e-999999
            raise too_many from None
        if steps >= MAX_VALUES:
            raise too_many
        n_steps = int(steps.to_integral_value(rounding=ROUND_FLOOR))
        values = [start + i * step for i in range(n_steps + 1)]
        # A STOP hit only within tolerance lands a hair past it; report STOP itself.
        values[-1] = min(values[-1], stop)
        floats = [float(v) for v in values]
    else:
        floats = []
        for i, token in enumerate(text.split(",")):
            value = _number(token, option, f"value {i + 1}")
            _check_tau(value, option)
            floats.append(float(value))
        if len(floats) > MAX_VALUES:
            raise LtcliError(f"{option}: {len(floats):,} values given (at most {MAX_VALUES:,})")

    return sorted({v + 0.0 for v in floats})  # + 0.0 turns '-0' into 0.0
