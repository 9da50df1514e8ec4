"""max-size: the truly largest image under a budget, though the peak is not monotone in the
image size (DERIVATION.md section 11), and how fast the equation answers.

`pytest -o addopts="" --benchmark-only tests/test_maxsize.py` times estimate and max-size;
in the default run (--benchmark-disable) each timed function runs once and is checked."""

from __future__ import annotations

import pytest

from sd_vram.formula import estimate
from sd_vram.formula.maxsize import search, width_for

GiB, MiB = 1 << 30, 1 << 20

CASES = [
    (6 * GiB, (1, 1), {"vae_tiling": True}),          # answered 1840x1840 while 1880x1880 fits
    (8 * GiB, (1, 1), {}),
    (8 * GiB, (1, 1), {"attention_slicing": "max"}),
    (12 * GiB, (3, 2), {"gpu": "h200"}),
]


def _device(h, aspect, **options):
    return estimate(h, width_for(h, aspect), **options).peak_device


def _verdict(h, aspect, budget, **options):
    return estimate(h, width_for(h, aspect), vram=budget, **options).boundary.verdict


@pytest.mark.parametrize("budget, aspect, options", CASES, ids=["6GiB-tiling", "8GiB", "8GiB-slicing-max", "12GiB-3:2"])
def test_no_larger_step_fits_up_to_twice_the_answer(budget, aspect, options):
    """On a card of the budget's size, as estimate --vram decides (cached segments released)."""
    found = search(budget, aspect, **options)
    assert _verdict(found.height, aspect, budget, **options) == "fits" and found.peak <= budget
    for h in range(found.height + 8, 2 * found.height + 1, 8):
        assert _verdict(h, aspect, budget, **options) != "fits", f"{width_for(h, aspect)}x{h} fits too"


@pytest.mark.parametrize("budget, aspect, options", CASES[:2], ids=["6GiB-tiling", "8GiB"])
def test_allocated_and_reserved_quantities_compare_the_peak(budget, aspect, options):
    for quantity, attr in (("allocated", "peak_allocated"), ("reserved", "peak_reserved")):
        found = search(budget, aspect, quantity, **options)
        peak = lambda h: getattr(estimate(h, width_for(h, aspect), **options), attr)  # noqa: E731
        assert peak(found.height) == found.peak <= budget
        assert all(peak(h) > budget for h in range(found.height + 8, 2 * found.height + 1, 8))


def test_the_tiled_answer_is_past_a_step_that_does_not_fit():
    """With VAE tiling the peak falls and rises again: a bisection of the peak stops early."""
    found = search(6 * GiB, (1, 1), "reserved", vae_tiling=True)
    below = [h for h in range(found.height - 200, found.height, 8)
             if estimate(h, h, vae_tiling=True).peak_reserved > 6 * GiB]
    assert below, "no smaller step above the budget: the case no longer shows what it is for"


def test_the_largest_with_fallbacks_fits_only_with_them():
    found = search(8 * GiB, (1, 1))
    assert found.fallback_height > found.height
    assert _verdict(found.fallback_height, (1, 1), 8 * GiB) == "fits-with-fallback"
    for h in range(found.fallback_height + 8, found.fallback_height + 81, 8):
        assert _verdict(h, (1, 1), 8 * GiB) == "oom"


def test_sliced_attention_scores_make_room_for_the_decoder():
    """The reserved peak falls by 1.9 GiB from 1448 to 1456 px with attention slicing "max":
    the UNet's cached score segment holds the decoder upsampler's workspace from 1456 on."""
    a, b = (estimate(s, s, prompt_length=20, gpu="h200", attention_slicing="max") for s in (1448, 1456))
    assert a.peak_allocated < b.peak_allocated
    assert a.peak_reserved - b.peak_reserved > 1800 * MiB


@pytest.mark.parametrize("name, height, width", [("balloon", 380, 396), ("groceries", 534, 800),
                                                  ("bench", 2048, 2048), ("truck", 1200, 1800)])
def test_estimate_speed(benchmark, name, height, width):
    est = benchmark(estimate, height, width, gpu="h200")
    assert est.peak_stage == "vae_decode"


def test_max_size_speed(benchmark):
    found = benchmark(search, 8 * GiB, (3, 2))
    assert found.height > 0
