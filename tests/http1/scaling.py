"""Complexity checks by ratio: how much longer twice the input takes.

No absolute time bound (those fail on a slow or busy machine): the best of several runs
at size n and at size 2n are compared.  Linear work gives a ratio near 2 and quadratic
work near 4, so a generous bound of 3 tells them apart on any machine.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

LINEAR = 3.0


def best_time(run: Callable[[], object], number: int = 5, repeat: int = 7) -> float:
    """The fastest of ``repeat`` timings of ``number`` calls of ``run``."""
    return min(timeit.repeat(run, number=number, repeat=repeat))


def doubling_ratio(make: Callable[[int], Callable[[], object]], n: int) -> float:
    """Time of ``make(2 * n)()`` over time of ``make(n)()``."""
    small, large = make(n), make(2 * n)
    small()  # warm caches (regex compilation, allocator) before timing
    large()
    return best_time(large) / best_time(small)
