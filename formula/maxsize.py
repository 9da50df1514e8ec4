"""The largest image whose predicted peak fits a memory budget.

For an aspect W:H the candidates are heights in steps of 8 with width = floor8(height * W / H).
The predicted peak is not monotone in the image size: the caching allocator's segments are
(VAE tiling, attention slicing, the small sizes: reserved memory can fall by gigabytes from one
step to the next, DERIVATION.md section 11), but the allocated peak is, and it bounds the peak
from below (reserved >= allocated). So the search bisects the allocated peak for the last step
that could fit, then walks down from it to the first step that does: that is the largest.
For a card (quantity "device") "fits" is the verdict of the budget replay (estimate(...,
vram=budget)), which lets the allocator release cached segments as PyTorch does. The largest
image that fits at all, with cuDNN's workspace fallbacks, is found the same way from the
allocated peak without any convolution workspace.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .options import InputError

QUANTITIES = ("allocated", "reserved", "device")
_MAX_SIDE = 1 << 20  # 1 Mi px a side: far beyond any GPU; stops the search on absurd budgets


def _floor8(x: int) -> int:
    return x - x % 8


def width_for(height: int, aspect: tuple[int, int]) -> int:
    """The width paired with ``height`` on the aspect's ladder: floor8(height * W / H), exact."""
    aw, ah = aspect
    return _floor8(height * aw // ah)


def call_options(height: int, width: int, options: dict) -> dict:
    """inpaint runs at pipe(height, width), not at its image's size: the search sizes the call,
    with an image and a mask of that size."""
    if options.get("pipeline") == "inpaint":
        return {**options, "pipe_height": height, "pipe_width": width, "mask_size": (height, width)}
    return options


def _estimate(height: int, options: dict, aspect, floor: bool = False, vram=None):
    from . import equation  # looked up at call time so tests can substitute it

    width = width_for(height, aspect)
    return equation.estimate(height, width, vram=vram, _floor=floor, **call_options(height, width, options))


def _allocated(height: int, options: dict, aspect, floor: bool = False) -> int:
    from . import equation

    width = width_for(height, aspect)
    return equation.peak_allocated(height, width, _floor=floor, **call_options(height, width, options))


def _peak(est, quantity: str) -> int:
    return {"allocated": est.peak_allocated, "reserved": est.peak_reserved, "device": est.peak_device}[quantity]


@dataclass
class MaxSize:
    """The answer: the largest image that fits at full speed, the step after it, and (for
    a card's memory, quantity "device") the largest that fits only with cuDNN's fallbacks."""

    width: int
    height: int
    peak: int                # what must fit: for a card, under it (cached segments released)
    next_width: int
    next_height: int
    next_peak: int           # the next step's peak on a card without limit
    fallback_width: int | None = None
    fallback_height: int | None = None


class NothingFits(InputError):
    """Not even the smallest image fits: an answer, not bad input (the CLI prints it, exit 1)."""


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


def search(budget_bytes: int, aspect: tuple[int, int] = (1, 1), quantity: str = "device", **options) -> MaxSize:
    """The largest images on the aspect's ladder whose predicted peak ``quantity``
    (allocated, reserved or device bytes) is at most ``budget_bytes`` (module docstring).

    Options are those of ``estimate`` but the call's size (pipe_height, pipe_width, mask_size),
    which the search sets. Raises NothingFits (an InputError) when not even the smallest image
    fits, saying whether the weights and CUDA context alone are over the budget."""
    _check(budget_bytes, aspect, quantity)
    sized = [name for name in ("pipe_height", "pipe_width", "mask_size") if options.get(name) is not None]
    if sized:      # the search sets the call's size (and an inpaint mask's) itself
        raise InputError(f"max-size searches the size itself: leave out {' and '.join(sized)}")
    from . import gpu_profiles
    from .options import Options

    profile = gpu_profiles.get(Options(**options).gpu)
    fixed = profile.cuda_context if quantity == "device" else 0   # beside the allocated bytes

    @lru_cache(maxsize=None)       # the walks and the answer ask for some heights twice
    def on_the_card(h: int):
        return _estimate(h, options, aspect, vram=budget_bytes).boundary

    def under_budget(h: int):
        """(fits at full speed, the figure that must fit): for a card (quantity "device") as
        PyTorch runs it, releasing cached segments before it fails (estimate(..., vram=...))."""
        if quantity == "device":
            b = on_the_card(h)
            return b.verdict == "fits", b.peak_device
        peak = _peak(_estimate(h, options, aspect), quantity)
        return peak <= budget_bytes, peak

    lo = smallest_height(aspect)
    first = _estimate(lo, options, aspect)
    weights = sum(v for k, v in first.breakdown.items() if k.startswith("weights_") or k == "cublas_workspace")
    if weights + fixed > budget_bytes or not under_budget(lo)[0]:
        what = (("the weights and CUDA context alone need " if fixed else "the weights alone need ") + _human(weights + fixed)
                if weights + fixed > budget_bytes else
                f"the smallest image, {width_for(lo, aspect)}x{lo}, needs {_human(_peak(first, quantity))} ({quantity})")
        raise NothingFits(f"nothing fits a budget of {_human(budget_bytes)}: {what}")

    height = _walk_down(_last_step(lambda h: _allocated(h, options, aspect) + fixed <= budget_bytes, lo),
                        lambda h: under_budget(h)[0], lo)
    nh = height + 8
    out = MaxSize(width_for(height, aspect), height, under_budget(height)[1],
                  width_for(nh, aspect), nh, _peak(_estimate(nh, options, aspect), quantity))
    if quantity == "device" and profile.conv_workspace():     # the call has workspaces to fall back from
        top = _last_step(lambda h: _allocated(h, options, aspect, floor=True) + fixed <= budget_bytes, height)
        h = _walk_down(top, lambda h: on_the_card(h).verdict != "oom", height)
        if h > height:    # above the full-speed answer, only with fallbacks
            out.fallback_width, out.fallback_height = width_for(h, aspect), h
    return out


def max_size(budget_bytes: int, aspect: tuple[int, int] = (1, 1), quantity: str = "device", **options) -> tuple[int, int]:
    """(width, height) of the largest image that fits at full speed (search)."""
    found = search(budget_bytes, aspect, quantity, **options)
    return found.width, found.height


def _last_step(fits, lo: int) -> int:
    """The last height (a multiple of 8, from lo on) where the monotone test `fits` holds:
    grow an upper bound geometrically, then bisect."""
    hi = lo * 2
    while fits(hi):
        lo = hi
        if hi >= _MAX_SIDE:
            raise InputError(f"the budget fits images beyond {_MAX_SIDE} px a side")
        hi *= 2
    lo_step, hi_step = lo // 8, hi // 8        # fits(lo) holds, fits(hi) does not
    while hi_step - lo_step > 1:
        mid = (lo_step + hi_step) // 2
        if fits(mid * 8):
            lo_step = mid
        else:
            hi_step = mid
    return lo_step * 8


def _walk_down(top: int, fits, lo: int) -> int:
    """The first height from `top` down to `lo` where `fits` holds (lo always does)."""
    h = top
    while h > lo and not fits(h):
        h -= 8
    return h


def _human(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
