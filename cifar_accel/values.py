"""What a value read from JSON is: ``true`` is a Python ``int`` and ``NaN``/``Infinity`` are floats, so the plain
``isinstance`` checks take them. Shared by the readers of saved files and the model registry."""

import math
from typing import Any


def is_whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
