"""What a value read from JSON is: ``true`` is a Python ``int`` and ``NaN``/``Infinity`` are floats, so the plain
``isinstance`` checks take them. Shared by the readers of saved files and the model registry."""

import math
from typing import Any


def is_whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: ``0-9``, ``0,3,7`` or both (``0-4,10``) -> distinct seeds in the order given, each in
    [0, 2^32); a ``ValueError`` that says what is wrong otherwise."""
    seeds: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not (first.isascii() and first.isdigit() and (not dash or (last.isascii() and last.isdigit()))):
            raise ValueError(f"{part.strip()!r} is not a seed (N) or a range of seeds (N-M)")
        low, high = int(first), int(last) if dash else int(first)
        if low > high or high >= 2**32:
            raise ValueError(f"{part.strip()!r}: seeds run from low to high, each in [0, 2^32)")
        if high - low >= 10_000 or len(seeds) + high - low >= 10_000:
            raise ValueError(f"{part.strip()!r}: at most 10,000 seeds")
        seeds.extend(range(low, high + 1))
    if len(set(seeds)) != len(seeds):
        raise ValueError("a seed is given twice")
    return seeds
