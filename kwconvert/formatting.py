"""How numbers and shapes read in tables, messages and reports."""
from __future__ import annotations

from typing import Sequence


def si(number: int | None, unit: str = "") -> str:
    """1234567 -> "1.23 M" (decimal prefixes, three significant digits); None -> "?"."""
    if number is None:
        return "?"
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(number) >= scale:
            return f"{number / scale:.3g} {prefix}{unit}"
    return f"{number} {unit}".rstrip()


def count(number: int, noun: str) -> str:
    """``"1 layer"``, ``"3 layers"``."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def dims(shape: Sequence[int]) -> str:
    """(64, 3, 7, 7) -> "64x3x7x7"."""
    return "x".join(str(int(size)) for size in shape)
