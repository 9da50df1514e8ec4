"""The largest image whose predicted peak fits a memory budget.

For an aspect W:H the candidates are heights in steps of 8 with width = floor8(height * W / H);
the predicted peak grows with the height, so a binary search over that one-dimensional ladder
finds the exact largest step that fits.
"""

from __future__ import annotations

from .options import InputError

QUANTITIES = ("allocated", "reserved", "device")
_MAX_SIDE = 1 << 20  # 1 Mi px a side: far beyond any GPU; stops the search on absurd budgets


def _floor8(x: int) -> int:
    return x - x % 8


def width_for(height: int, aspect: tuple[int, int]) -> int:
    """The width paired with ``height`` on the aspect's ladder: floor8(height * W / H), exact."""
    aw, ah = aspect
    return _floor8(height * aw // ah)


def _peak(height: int, width: int, quantity: str, options: dict) -> int:
    from .equation import estimate  # looked up at call time so tests can substitute it

    est = estimate(height, width, **options)
    return {"allocated": est.peak_allocated, "reserved": est.peak_reserved, "device": est.peak_device}[quantity]


def _check(budget_bytes, aspect, quantity):
    if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes <= 0:
        raise InputError(f"the budget must be a positive number of bytes, got {budget_bytes!r}")
    if (not isinstance(aspect, tuple) or len(aspect) != 2
            or not all(isinstance(a, int) and not isinstance(a, bool) and a > 0 for a in aspect)):
        raise InputError(f"the aspect must be two positive integers W:H, got {aspect!r}")
    if quantity not in QUANTITIES:
        raise InputError(f"quantity must be one of {', '.join(QUANTITIES)}, got {quantity!r}")


def smallest_height(aspect: tuple[int, int]) -> int:
    """The lowest rung of the ladder: the first height (multiple of 8) whose width is >= 8."""
    aw, ah = aspect
    h = max(8, _floor8(-(-8 * ah // aw)))  # ceil(8 * H / W), then back to a multiple of 8 ...
    while width_for(h, aspect) < 8:        # ... and up until the floored width reaches 8
        h += 8
    return h


def max_size(budget_bytes: int, aspect: tuple[int, int] = (1, 1), quantity: str = "device", **options) -> tuple[int, int]:
    """(width, height) of the largest image on the aspect's ladder whose predicted peak
    ``quantity`` (allocated, reserved or device bytes) is at most ``budget_bytes``.

    Options are those of ``estimate``. Raises InputError when not even the smallest image
    fits (the budget is below what the weights and context alone need).
    """
    _check(budget_bytes, aspect, quantity)

    def fits(h: int) -> bool:
        return _peak(h, width_for(h, aspect), quantity, options) <= budget_bytes

    lo = smallest_height(aspect)
    if not fits(lo):
        need = _peak(lo, width_for(lo, aspect), quantity, options)
        raise InputError(
            f"a budget of {_human(budget_bytes)} cannot hold even the smallest image, {width_for(lo, aspect)}x{lo}, "
            f"which needs {_human(need)} ({quantity}): the weights and fixed overheads alone exceed the budget"
        )
    # Grow the upper bound geometrically until it no longer fits, then bisect [lo, hi).
    hi = lo * 2
    while fits(hi):
        lo = hi
        if hi >= _MAX_SIDE:
            raise InputError(f"a budget of {_human(budget_bytes)} fits images beyond {_MAX_SIDE} px a side")
        hi *= 2
    lo_step, hi_step = lo // 8, hi // 8        # fits(lo) is True, fits(hi) is False
    while hi_step - lo_step > 1:
        mid = (lo_step + hi_step) // 2
        if fits(mid * 8):
            lo_step = mid
        else:
            hi_step = mid
    height = lo_step * 8
    return width_for(height, aspect), height


def _human(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"
