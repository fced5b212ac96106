"""The one way a configuration reports a bad field: `ConfigError(owner, field, expected, got)`.

It is a `ValueError` whose message reads `Owner.field: expected ..., got ...`, and it keeps the owner and the
field apart so that a command line can name its own flag instead (`vespo_megatron.cli`). The `check_*`
helpers cover the checks that every config repeats.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["ConfigError", "check_int", "check_float", "check_choice", "check_number"]


class ConfigError(ValueError):
    """A field of `owner` (a config class name) has a value outside what it accepts."""

    def __init__(self, owner: str, field: str, expected: str, got: object):
        self.owner, self.field, self.expected, self.got = owner, field, expected, got
        super().__init__(f"{owner}.{field}: expected {expected}, got {got!r}")


def check_int(owner: str, field: str, value: object, *, low: int | None = None, high: int | None = None) -> None:
    """An int (not a bool) within [low, high] (either bound may be None)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        if high is None:
            expected = "an int" if low is None else f"an int >= {low}"
        else:
            expected = f"an int <= {high}" if low is None else f"an int in [{low}, {high}]"
        raise ConfigError(owner, field, expected, value)


def check_float(owner: str, field: str, value: object, *, positive: bool = False, nonnegative: bool = False) -> None:
    """A finite real number, > 0 with `positive`, >= 0 with `nonnegative`."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not positive or value > 0) and (not nonnegative or value >= 0)
    if not ok:
        kind = "a finite float > 0" if positive else "a finite float >= 0" if nonnegative else "a finite float"
        raise ConfigError(owner, field, kind, value)


def check_choice(owner: str, field: str, value: object, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(owner, field, " or ".join(repr(c) for c in choices), value)


def check_number(owner: str, field: str, value: object, *, low: float, integer: bool,
                 allow_equal: bool = True) -> None:
    """An int (`integer`) or a finite real number, >= low (> low without `allow_equal`)."""
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok_type or isinstance(value, bool) or (not integer and not math.isfinite(value)):
        kind = "an int" if integer else "a finite number"
        raise ConfigError(owner, field, f"{kind} {'>=' if allow_equal else '>'} {low}", value)
    if value < low or (value == low and not allow_equal):
        raise ConfigError(owner, field, f"{'>=' if allow_equal else '>'} {low}", value)
