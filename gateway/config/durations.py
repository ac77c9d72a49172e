"""The one parser for every duration key: ``"250ms"``, ``"1s"``, ``"5m"``, ``"1h"``, ``3``."""

from __future__ import annotations

import math
import re
from typing import Final

__all__ = ["parse_duration"]

_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")


def parse_duration(value: object) -> float:
    """Return ``value`` in seconds.

    Accepts a non-negative int/float (seconds) or a string with a unit.
    Raises ``ValueError`` with a message fit for a config problem.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '250ms' or '1s', got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"duration must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value!r}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ValueError(
                f"expected a duration like '250ms', '1s', '5m' or '1h', got {value!r}"
            )
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError(f"expected a duration like '250ms' or '1s', got {value!r}")
