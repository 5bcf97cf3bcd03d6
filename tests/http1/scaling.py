"""Complexity checks by ratio: how much longer twice the input takes.

No absolute time bound (those fail on a slow or busy machine): the best of several runs
at size n and at size 2n are compared.  Linear work gives a ratio near 2 and quadratic
work near 4, so a generous bound of 3 tells them apart on any machine.  Runs of the two
sizes alternate, so a slow spell of the machine slows both, and a ratio above the bound
is measured again (twice at most) before it counts: noise does not repeat, quadratic
work does.
"""

from __future__ import annotations

import time
from collections.abc import Callable

LINEAR = 3.0


def _timed(run: Callable[[], object], number: int) -> float:
    started = time.perf_counter()
    for _ in range(number):
        run()
    return time.perf_counter() - started


def doubling_ratio(
    make: Callable[[int], Callable[[], object]], n: int, number: int = 5, repeat: int = 7
) -> float:
    """Time of ``make(2 * n)()`` over time of ``make(n)()``, each the best of ``repeat``
    interleaved timings of ``number`` calls."""
    small, large = make(n), make(2 * n)
    small()  # warm caches (regex compilation, allocator) before timing
    large()
    ratio = float("inf")
    for _ in range(3):
        best_small = best_large = float("inf")
        for _ in range(repeat):
            best_small = min(best_small, _timed(small, number))
            best_large = min(best_large, _timed(large, number))
        ratio = min(ratio, best_large / best_small)
        if ratio < LINEAR:
            break
    return ratio
