"""The call under a memory budget (estimate(..., vram=...), DERIVATION.md section 11): the
verdict, PyTorch's OOM path (release cached segments, retry, cuDNN workspace fallback), the
OOM's numbers; held to the simulation, whose event stream is the real pipeline's."""

from __future__ import annotations

from functools import lru_cache

import pytest

from sd_vram.formula import InputError, estimate
from sd_vram.formula.equation import suggestions

MiB, GiB = 1 << 20, 1 << 30
BALLOON = dict(height=376, width=392, prompt_length=20, gpu="h200")   # balloon, 396x380 rounded


def test_a_budget_at_the_peak_fits_without_the_oom_path():
    full = estimate(**BALLOON)
    b = estimate(**BALLOON, vram=full.peak_device).boundary
    assert (b.verdict, b.retries, b.fallbacks, b.oom) == ("fits", 0, [], None)
    assert b.capacity == full.peak_device - full.breakdown["cuda_context"] == full.peak_reserved


def test_below_the_peak_the_oom_path_runs():
    full = estimate(**BALLOON)
    b = estimate(**BALLOON, vram=full.peak_device - 64 * MiB).boundary
    assert b.retries >= 1                            # cached segments released to make room
    assert b.verdict in ("fits", "fits-with-fallback") and b.peak_reserved <= b.capacity


def test_fallbacks_give_a_range_below_the_capacity():
    full = estimate(**BALLOON)
    b = estimate(**BALLOON, vram=full.peak_device - 160 * MiB).boundary
    assert b.verdict == "fits-with-fallback"
    assert {stage for stage, _ in b.fallbacks} == {"vae_decode"}
    lo, hi = b.allocated_range
    assert lo < hi <= min(full.peak_allocated, b.capacity)


def test_out_of_memory_is_what_pytorch_would_raise():
    full = estimate(**BALLOON)
    b = estimate(**BALLOON, vram=full.peak_device - 320 * MiB).boundary
    o = b.oom
    assert b.verdict == "oom" and o.stage in ("vae_encode", "vae_decode")
    assert o.reserved_bytes + o.requested_bytes > b.capacity >= o.reserved_bytes >= o.allocated_bytes
    assert o.message.startswith("CUDA out of memory. Tried to allocate ")


def test_the_weights_alone_can_be_too_much():
    o = estimate(**BALLOON, vram=2 * GiB).boundary.oom
    assert o.stage == "setup" and o.operation.startswith("pipe.to('cuda'): ")


def test_suggestions_fit_and_name_their_change():
    full = estimate(**BALLOON)
    vram = full.peak_device - 160 * MiB
    fixes = suggestions(BALLOON["height"], BALLOON["width"], vram, prompt_length=20, gpu="h200")
    assert fixes and all(e.boundary.verdict == "fits" for _, e in fixes)
    assert "safety_checker=None" in [how for how, _ in fixes]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8GiB"])
def test_bad_budgets(bad):
    with pytest.raises(InputError):
        estimate(**BALLOON, vram=bad)


def test_a_budget_above_the_profiles_card_is_refused():
    with pytest.raises(InputError, match="more than the NVIDIA H200's"):
        estimate(**BALLOON, vram=200 * GiB)


# ------------------------------------------------------------------------------------------
# against the simulation: the real pipeline's allocation stream under the same capacities
# ------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _recorded():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from sd_vram.formula.options import Options
    from sd_vram.simulation import get_profile
    from sd_vram.simulation.call import simulate_events

    prof, o = get_profile("h200"), Options(gpu="h200")
    return prof, o, simulate_events(BALLOON["height"], BALLOON["width"], None, 20, options=o, profile=prof)


@pytest.mark.parametrize("below", [64, 160, 256, 320, 448])
def test_the_verdict_matches_the_simulation(below):
    """Budgets from just under the full-speed peak down past the no-workspace floor: the same
    verdict and, for an OOM, the same stage and the same failed request to the MiB."""
    from sd_vram.simulation.result import build_result

    prof, o, (rec, start, end, info) = _recorded()
    vram = estimate(**BALLOON).peak_device - below * MiB
    sim = build_result(rec, start, end, info, height=BALLOON["height"], width=BALLOON["width"], options=o,
                       profile=prof, capacity=vram - prof.cuda_context)
    eq = estimate(**BALLOON, vram=vram).boundary
    sim_verdict = "oom" if sim.oom else ("fits-with-fallback" if sim.fallbacks else "fits")
    assert eq.verdict == sim_verdict, (eq, sim.oom, sim.fallbacks)
    if sim.oom:
        assert eq.oom.stage == sim.oom["stage"]
        assert eq.oom.requested_bytes // MiB == sim.oom["requested_bytes"] // MiB


# ------------------------------------------------------------------------------------------
# archived GPU budget runs (results/<gpu>/*_budgets.json; scripts/gpu_validate.sh step M)
# ------------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from sd_vram.plugin import budgets  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results"


@pytest.mark.parametrize("label, run, profile", budgets.archived_runs(RESULTS),
                         ids=[label for label, _, _ in budgets.archived_runs(RESULTS)])
def test_archived_budget_runs(label, run, profile):
    assert budgets.check(run, profile) == []


def test_the_budget_check_reads_pytorch_and_catches_a_wrong_verdict():
    msg = ("CUDA out of memory. Tried to allocate 72.00 MiB. GPU 0 has a total capacity of 3.61 GiB of which "
           "7.19 MiB is free.")
    assert budgets.tried_to_allocate(msg) == "72.00 MiB"
    assert budgets.measured_verdict({"status": "ok", "num_ooms": 2}) == "fits-with-fallback"
    full = estimate(**BALLOON)
    run = {"height": BALLOON["height"], "width": BALLOON["width"], "prompt": None, "options": {},
           "capacity_bytes": full.peak_reserved + 64 * MiB,
           "measurement": {"status": "oom", "error": msg, "num_ooms": 1}}
    assert budgets.check(run, "h200") == ["verdict: predicted fits, measured oom"]
    run["measurement"] = {"status": "ok", "num_ooms": 0, "peak_allocated_bytes": full.peak_allocated}
    assert budgets.check(run, "h200") == []
    run["measurement"]["peak_allocated_bytes"] = int(full.peak_allocated * 1.05)   # the GPU needed 5 % more
    assert budgets.check(run, "h200") == ["allocated -4.76%"]


def test_suggestions_keep_the_users_alloc_conf():
    """`--alloc-conf expandable_segments:False` used to crash the expandable remedy."""
    full = estimate(**BALLOON)
    fixes = suggestions(BALLOON["height"], BALLOON["width"], full.peak_device - 160 * MiB, prompt_length=20,
                        gpu="h200", alloc_conf="expandable_segments:False,max_split_size_mb:512")
    changed = [e.options["alloc_conf"] for how, e in fixes if how.startswith("PYTORCH_CUDA_ALLOC_CONF")]
    assert changed in ([], ["expandable_segments:False,max_split_size_mb:512,expandable_segments:True"])


def test_a_budget_needs_more_than_the_cuda_context():
    with pytest.raises(InputError, match="leaves nothing beside the CUDA context"):
        estimate(**BALLOON, vram=GiB // 2)


def test_the_needed_figure_never_exceeds_the_budget():
    full = estimate(**BALLOON)
    for below in (0, 64, 128):
        b = estimate(**BALLOON, vram=full.peak_device - below * MiB).boundary
        if b.verdict == "fits":
            assert b.peak_device <= b.vram


def test_the_term_that_falls_back_is_the_convolution_workspace():
    """_Replay lets only this term fall back: an OOM at any other scratch (the image upload's
    staging copy, attention's fp32 accumulator) is an OOM, as nothing in PyTorch catches it."""
    from sd_vram.formula import equation

    assert equation.CONV_WORKSPACE == "cuDNN conv workspace"
    from sd_vram.formula import activations as act

    names = {t for p in act.vae_decode(act.Shape(H=512, W=512, n=1, B=2, cfg=True), "efficient", False, False,
                                       "nchw_transpose") for c, t, _ in p.terms if c == "workspace"}
    assert equation.CONV_WORKSPACE in names
