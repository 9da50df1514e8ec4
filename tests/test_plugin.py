"""The pytest plugin itself, on the CPU: pytester sessions with the fake measurement backend.

The equation is replaced by a table (PRED) and the fake backend's measurements come from a
spec file (MEAS), so every expected number below is written here, not taken from the code.
"""

from __future__ import annotations

import json
import os
import re

import pytest

import sd_vram.formula
from sd_vram.formula.result import Estimate

pytest_plugins = ["pytester"]

MiB = 1 << 20
GiB = 1 << 30

CATALOGUE = """
schema = "sd-vram/cases/1"
[defaults]
prompt = "a cat"
options = { guidance_scale = 5.0, num_inference_steps = 5, strength = 0.8 }

[[case]]
name = "seed-64x64"
width = 64
height = 64
tags = ["seed"]

[[case]]
name = "small-128x128"
width = 128
height = 128
tags = ["square"]

[[case]]
name = "big-192x192"
width = 192
height = 192
options = { attention = "math" }
tags = ["oom"]

[[case]]
name = "last-256x256"
width = 256
height = 256
"""

# (height, width) -> predicted (allocated, reserved, device, stage)
PRED = {
    (64, 64): (1020 * MiB, 1100 * MiB, 1600 * MiB, "unet"),        # +2.0% allocated: inside 3%
    (128, 128): (2080 * MiB, 2200 * MiB, 2700 * MiB, "unet"),      # +4.0% allocated: outside 3%
    (192, 192): (30 * GiB, 30 * GiB, 31 * GiB, "unet"),             # beyond the fake 20 GiB capacity
    (256, 256): (3000 * MiB, 3150 * MiB, 3650 * MiB, "vae_decode"),
}
MEAS = {
    "seed-64x64": (1000 * MiB, 1100 * MiB, 1600 * MiB, "unet"),
    "seed-64x64/full-call": (1000 * MiB, 1100 * MiB, 1600 * MiB, "unet"),
    "small-128x128": (2000 * MiB, 2200 * MiB, 2700 * MiB, "unet"),
    "last-256x256": (3000 * MiB, 3150 * MiB, 3650 * MiB, "vae_decode"),
}


def spec(meas=MEAS, name="NVIDIA Test GPU 24GB", oom=("big-192x192",)):
    cases = {k: {"peak_allocated_bytes": a, "peak_reserved_bytes": r, "peak_device_bytes": d, "peak_stage": s}
             for k, (a, r, d, s) in meas.items()}
    for k in oom:
        cases[k] = {"oom": True}
    return {"gpu": {"name": name, "total_memory_bytes": 24 * GiB}, "capacity_bytes": 20 * GiB, "cases": cases}


@pytest.fixture
def calls(monkeypatch):
    """Replace the equation by PRED; record what it was asked."""
    seen = []

    def fake_estimate(height, width, prompt=None, prompt_length=None, **options):
        seen.append({"height": height, "width": width, "prompt": prompt, **options})
        a, r, d, stage = PRED[(height, width)]
        return Estimate(height=height, width=width, prompt_tokens=2, truncated=False, peak_allocated=a,
                        peak_reserved=r, peak_device=d, peak_stage=stage, stages={}, breakdown={"weights": 1},
                        options=dict(options), gpu_profile=options.get("gpu", "default"))

    monkeypatch.setattr(sd_vram.formula, "estimate", fake_estimate)
    return seen


@pytest.fixture
def suite(pytester, monkeypatch):
    # Other plugins re-import heavy modules in every inner session (pytester restores sys.modules).
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:hypothesispytest -p no:benchmark -p no:anyio")
    # under `pytest -n` this process is an xdist worker; the inner session is none
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytester.makepyfile(test_suite="from sd_vram.plugin.suite import *\n")
    pytester.path.joinpath("catalogue.toml").write_text(CATALOGUE)
    return pytester


def write_spec(pytester, data=None, name="spec.json"):
    path = pytester.path / name
    path.write_text(json.dumps(data or spec()))
    return str(path)


def run_fake(pytester, *args, spec_data=None):
    return pytester.runpytest("--gpu", "--sd-backend", "fake", "--sd-fake-measurements",
                              write_spec(pytester, spec_data), "--catalogue", "catalogue.toml", "-rA", *args)


def archives(pytester):
    return sorted(p for p in (pytester.path / "results").rglob("*.json"))


# --- options and skipping ------------------------------------------------------------------------

def test_help_lists_the_options_but_not_the_hidden_backend(pytester):
    out = pytester.runpytest("--help").stdout.str()
    for opt in ("--gpu", "--sd-model=PATH_OR_ID", "--band-allocated=FRACTION", "--band-reserved=FRACTION",
                "--band-device=FRACTION", "--cases=NAME_GLOB", "--case-tags=TAG", "--results-dir=DIR",
                "--no-archive", "--full-call=CASES", "--time-budget=SECONDS"):
        assert opt in out, opt
    assert "--sd-backend" not in out


def test_markers_registered(suite):
    out = suite.runpytest("--markers", "--catalogue", "catalogue.toml").stdout.str()
    assert "@pytest.mark.gpu:" in out and "@pytest.mark.seed:" in out and "@pytest.mark.sd_vram_archived:" in out


def test_without_gpu_the_gpu_tests_are_skipped_with_a_reason(suite, calls):
    r = suite.runpytest("--catalogue", "catalogue.toml", "-rs")
    r.assert_outcomes(skipped=6)   # 4 cases, 1 full call, 1 "no archives"
    r.stdout.fnmatch_lines(["*SKIPPED [[]4[]]*suite.py:*: real-GPU validation: run `pytest --gpu` on a machine "
                            "with a CUDA GPU",
                            "*SKIPPED [[]1[]]*suite.py:*: real-GPU validation: run `pytest --gpu`*",
                            "*no archived GPU results under*"])
    assert calls == [] and not archives(suite)


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("torch") is not None
                    and __import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_without_cuda_is_a_usage_error(suite):
    r = suite.runpytest("--gpu", "--catalogue", "catalogue.toml")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "--gpu runs the real-GPU validation and needs a CUDA GPU" in r.stderr.str()


def test_gpu_usage_error_names_the_cause(suite, monkeypatch):
    from sd_vram.plugin import gpu

    def no_cuda():
        raise RuntimeError("torch 2.13.0+cpu (CUDA build: None) sees no CUDA device")

    monkeypatch.setattr(gpu, "preflight", no_cuda)
    r = suite.runpytest("--gpu", "--catalogue", "catalogue.toml")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "sees no CUDA device" in r.stderr.str() and "without --gpu" in r.stderr.str()


@pytest.mark.parametrize("args, text", [
    (["--band-allocated", "1.5"], "--band-allocated must be a fraction between 0 and 1"),
    (["--band-device", "0"], "--band-device must be a fraction"),
])
def test_bad_band_is_a_usage_error(suite, args, text):
    r = suite.runpytest("--catalogue", "catalogue.toml", *args)
    assert r.ret == pytest.ExitCode.USAGE_ERROR and text in r.stderr.str()


def test_bad_catalogue_is_a_usage_error(suite):
    suite.path.joinpath("bad.toml").write_text(CATALOGUE.replace('tags = ["seed"]', 'tags = ["seed"]\ncolour = 1'))
    r = suite.runpytest("--catalogue", "bad.toml")
    assert r.ret == pytest.ExitCode.USAGE_ERROR and "unknown keys ['colour']" in r.stderr.str()


# --- a run: bands, archive, summary ----------------------------------------------------------------

def test_bands_pass_and_fail_with_a_message_naming_everything(suite, calls):
    r = run_fake(suite)
    r.assert_outcomes(passed=4, failed=1)    # small-128x128 is 4% over; big OOMs as predicted
    out = r.stdout.str()
    assert "small-128x128 on NVIDIA Test GPU 24GB: 1 of 4 checks failed" in out
    assert ("peak_allocated: predicted 2,080.0 MiB, measured 2,000.0 MiB, error +4.00%, band ±3.0%  FAIL") in out
    assert "peak_reserved: predicted 2,200.0 MiB, measured 2,200.0 MiB, error +0.00%, band ±5.0%  ok" in out
    # The same run passes with a wider allocated band.
    run_fake(suite, "--band-allocated", "0.05").assert_outcomes(passed=5)


def test_stage_mismatch_fails(suite, calls):
    meas = dict(MEAS, **{"last-256x256": (3000 * MiB, 3150 * MiB, 3650 * MiB, "unet")})
    r = run_fake(suite, "--cases", "last-*", spec_data=spec(meas))
    r.assert_outcomes(failed=1)
    assert "peak stage: predicted vae_decode, measured unet  FAIL" in r.stdout.str()


def test_predictions_get_the_case_inputs(suite, calls):
    run_fake(suite, "--cases", "seed-*", "--full-call", "none")
    from sd_vram.formula import Options

    defaults = {k: v for k, v in Options().to_dict().items() if k != "gpu"}   # every other field: its default
    assert calls == [{**defaults, "height": 64, "width": 64, "prompt": "a cat", "guidance_scale": 5.0,
                      "num_images_per_prompt": 1, "strength": 0.8, "num_inference_steps": 5, "attention": "auto",
                      "attention_slicing": None, "vae_slicing": False, "vae_tiling": False,
                      "safety_checker": True, "output_type": "pil", "expandable_segments": False, "alloc_conf": "",
                      "scheduler": "pndm", "dtype": "fp16",
                      "pipeline": "img2img", "pipe_height": None, "pipe_width": None, "mask_size": None,
                      "inpaint_unet": "standard", "padding_mask_crop": None, "lora": None, "lora_fused": False}]


def test_archive_is_written_with_its_schema(suite, calls):
    run_fake(suite)
    files = archives(suite)
    assert len(files) == 1
    f = files[0]
    assert f.parent.name == "Test-GPU-24GB" and f.parent.parent.name == "results"
    assert re.fullmatch(r"\d{8}T\d{6}Z_nogit\.json", f.name), f.name   # pytester's folder is no git checkout
    assert not [p for p in f.parent.iterdir() if p.name.endswith(".tmp")]
    data = json.loads(f.read_text())
    assert data["schema"] == "sd-vram/results/1"
    assert set(data) >= {"run", "gpu", "environment", "hardware", "cases"}
    assert data["run"]["complete"] is True and data["run"]["backend"] == "fake"
    assert data["run"]["bands"] == {"peak_allocated": 0.03, "peak_reserved": 0.05, "peak_device": 0.05}
    assert data["gpu"]["name"] == "NVIDIA Test GPU 24GB"
    assert data["environment"]["env"].keys() >= {"PYTORCH_CUDA_ALLOC_CONF", "CUDA_MODULE_LOADING",
                                                "CUBLAS_WORKSPACE_CONFIG"}
    by_id = {c["id"]: c for c in data["cases"]}
    assert set(by_id) == {"seed-64x64", "seed-64x64/full-call", "small-128x128", "big-192x192", "last-256x256"}
    seed = by_id["seed-64x64"]
    assert seed["inputs"]["height"] == 64 and seed["inputs"]["options"]["num_inference_steps"] == 5
    assert seed["prediction"]["peak_allocated_bytes"] == 1020 * MiB          # Estimate.to_dict(), whole
    assert seed["prediction"]["breakdown"] == {"weights": 1}
    assert seed["measurement"]["peak_allocated_bytes"] == 1000 * MiB
    assert seed["errors"]["peak_allocated"]["error"] == pytest.approx(0.02)
    assert seed["errors"]["peak_allocated"]["band"] == 0.03 and seed["errors"]["peak_allocated"]["ok"] is True
    assert seed["stage"] == {"predicted": "unet", "measured": "unet", "ok": True}
    assert seed["outcome"] == "pass" and by_id["small-128x128"]["outcome"] == "fail"
    full = by_id["seed-64x64/full-call"]
    assert full["inputs"]["options"]["num_inference_steps"] == 50 and full["same_as_short"] is True


def test_no_archive(suite, calls):
    run_fake(suite, "--no-archive").assert_outcomes(passed=4, failed=1)
    assert not archives(suite)


def test_results_dir(suite, calls, tmp_path):
    run_fake(suite, "--results-dir", str(tmp_path / "elsewhere"), "--cases", "seed-*")
    assert len(list((tmp_path / "elsewhere" / "Test-GPU-24GB").glob("*.json"))) == 1
    assert not archives(suite)


def test_summary_table(suite, calls):
    out = run_fake(suite).stdout.str()
    assert "sd-vram: predicted vs measured on the GPU (MiB)" in out
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("case ") and "predicted" in ln)
    assert lines[head].split() == ["case", "quantity", "predicted", "measured", "error", "band", "stage",
                                   "(pred/meas)", "result"]
    row = next(ln for ln in lines if ln.startswith("Test-GPU-24GB/seed-64x64 "))
    assert row.split() == ["Test-GPU-24GB/seed-64x64", "peak_allocated", "1,020.0", "1,000.0", "+2.00%",
                           "3.0%", "unet/unet", "ok"]
    assert any(ln.split()[:2] == ["Test-GPU-24GB/big-192x192", "-"] and "oom-expected" in ln for ln in lines)
    assert "4 of 5 cases within their bands" in out       # 4 cases + the full call; small fails
    assert re.search(r"archived: .*results/Test-GPU-24GB/\d{8}T\d{6}Z_nogit\.json", out)


def test_cases_and_tags_select(suite, calls):
    r = run_fake(suite, "--cases", "small-*,last-*", "--full-call", "none")
    r.assert_outcomes(passed=1, failed=1)
    r = run_fake(suite, "--case-tags", "seed", "--full-call", "none", "--no-archive")
    r.assert_outcomes(passed=1)
    r = run_fake(suite, "-m", "seed and not sd_vram_full_call", "--no-archive")
    r.assert_outcomes(passed=1)


def test_readable_test_ids(suite, calls):
    out = run_fake(suite, "--collect-only", "-q").stdout.str()
    for tid in ("test_case[seed-64x64]", "test_case[big-192x192]", "test_full_default_call[seed-64x64/full-call]"):
        assert tid in out


def test_time_budget_skips_cases_not_started(suite, calls):
    r = run_fake(suite, "--time-budget", "0", "--no-archive")
    r.assert_outcomes(skipped=5)
    assert "time budget exhausted" in r.stdout.str()


# --- out of memory ----------------------------------------------------------------------------------

def test_oom_predicted_and_raised_passes_and_the_suite_goes_on(suite, calls):
    r = run_fake(suite, "--cases", "big-*,last-*")
    r.assert_outcomes(passed=2)
    data = json.loads(archives(suite)[0].read_text())
    ids = [c["id"] for c in data["cases"]]
    assert ids == ["big-192x192", "last-256x256"]            # cheap first; the OOM did not stop the run
    big = data["cases"][0]
    assert big["expectation"] == "oom" and big["measurement"]["status"] == "oom"
    assert big["outcome"] == "oom-expected" and data["cases"][1]["outcome"] == "pass"


def test_oom_where_the_equation_says_it_fits_fails(suite, calls):
    r = run_fake(suite, "--cases", "seed-*", "--full-call", "none", spec_data=spec(oom=("seed-64x64",)))
    r.assert_outcomes(failed=1)
    assert ("seed-64x64 on NVIDIA Test GPU 24GB: ran out of memory, but the equation says it fits: "
            "predicted peak_reserved 1,100.0 MiB, the device could hold 20,480.0 MiB") in r.stdout.str()


def test_predicted_oom_that_runs_fails(suite, calls):
    meas = dict(MEAS, **{"big-192x192": (19 * GiB, 19 * GiB, 20 * GiB, "unet")})
    r = run_fake(suite, "--cases", "big-*", spec_data=spec(meas, oom=()))
    r.assert_outcomes(failed=1)
    assert "big-192x192 on NVIDIA Test GPU 24GB: the equation says it cannot fit" in r.stdout.str()


# --- the full default call ---------------------------------------------------------------------------

def test_full_call_must_reach_the_short_runs_peak(suite, calls):
    meas = dict(MEAS, **{"seed-64x64/full-call": (1000 * MiB + 512, 1100 * MiB, 1600 * MiB, "unet")})
    r = run_fake(suite, "--cases", "seed-*", spec_data=spec(meas))
    r.assert_outcomes(passed=1, failed=1)
    out = r.stdout.str()
    assert "full call vs short run" in out and "(difference +512 bytes)" in out
    asked = sorted((c["num_inference_steps"], c["strength"]) for c in calls)
    assert asked == [(5, 0.8), (50, 0.8)]


def test_full_call_alone_measures_the_short_run_first(suite, calls):
    r = run_fake(suite, "--cases", "seed-*", "-k", "full_default_call")
    r.assert_outcomes(passed=1)
    data = json.loads(archives(suite)[0].read_text())
    assert [c["id"] for c in data["cases"]] == ["seed-64x64", "seed-64x64/full-call"]


def test_full_call_time_is_foreseen_from_the_short_runs_unet_stage():
    from sd_vram.plugin.session import full_call_seconds

    # 10 s short run with 5 UNet evaluations taking 5 s: 36 more at 1 s each, 10% margin, 3 s
    assert full_call_seconds({"wall_s": 10.0, "stage_seconds": {"unet": 5.0}}, 5, 41) == pytest.approx(52.6)
    # without stage times the whole call scales (and more margin)
    assert full_call_seconds({"wall_s": 10.0}, 5, 41) == pytest.approx(10 * 41 / 5 * 1.3 + 5)


@pytest.mark.parametrize("budget, runs", [(40, False), (100, True)])
def test_full_call_skipped_when_its_foreseen_time_does_not_fit(suite, calls, budget, runs):
    meas = {k: dict(zip(("peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes", "peak_stage"), v))
            for k, v in MEAS.items()}
    meas["seed-64x64"].update(wall_s=10.0, stage_seconds={"unet": 5.0})
    data = spec()
    data["cases"].update(meas)
    r = run_fake(suite, "--cases", "seed-*", "-k", "full_default_call", "--time-budget", str(budget),
                 spec_data=data)
    if runs:
        r.assert_outcomes(passed=1)
    else:
        r.assert_outcomes(skipped=1)
        assert "the full call needs about 53 s" in r.stdout.str()


# --- the archived-results regression (no GPU) -----------------------------------------------------------

def test_archived_results_are_rechecked_without_gpu(suite, calls, monkeypatch):
    run_fake(suite, "--full-call", "none")
    r = suite.runpytest("--catalogue", "catalogue.toml", "-v", "-k", "archived")
    r.assert_outcomes(passed=3, failed=1)   # small is still 4% high; big OOMed and still cannot fit
    r.stdout.fnmatch_lines(["*test_archived?Test-GPU-24GB/seed-64x64? PASSED*",
                            "*test_archived?Test-GPU-24GB/big-192x192? PASSED*"])
    # The equation changes: seed is now 10% high against the archived measurement.
    monkeypatch.setitem(PRED, (64, 64), (1100 * MiB, 1100 * MiB, 1600 * MiB, "unet"))
    r = suite.runpytest("--catalogue", "catalogue.toml", "-k", "archived", "--band-allocated", "0.05")
    r.assert_outcomes(passed=3, failed=1)
    out = r.stdout.str()
    assert "Test-GPU-24GB/seed-64x64: 1 of 4 checks failed" in out and "error +10.00%" in out
    assert "sd-vram: current equation vs archived GPU results (MiB)" in out
    # Bands and --cases apply to the regression too.
    suite.runpytest("--catalogue", "catalogue.toml", "-k", "archived", "--band-allocated", "0.2").assert_outcomes(passed=4)
    suite.runpytest("--catalogue", "catalogue.toml", "-k", "archived", "--cases", "small-*").assert_outcomes(failed=1)


def test_archived_ids_name_the_run_when_a_gpu_has_several(suite, calls):
    run_fake(suite, "--cases", "seed-*", "--full-call", "none")
    run_fake(suite, "--cases", "seed-*", "--full-call", "none")
    files = archives(suite)
    if len(files) == 1:        # both in the same second: the second got a "-2" suffix instead
        pytest.fail("expected two archives")
    out = suite.runpytest("--catalogue", "catalogue.toml", "--collect-only", "-q", "-k", "archived").stdout.str()
    for f in files:
        assert f"test_archived[Test-GPU-24GB/{f.stem}/seed-64x64]" in out


def test_expandable_segments_run_is_predicted_for_that_allocator(suite, calls, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    meas = dict(MEAS, **{"seed-64x64": (1000 * MiB, 1500 * MiB, 2000 * MiB, "unet")})
    r = run_fake(suite, "--cases", "seed-*", "--full-call", "none", spec_data=spec(meas))
    # the equation is asked for the expandable-segments allocator, and every quantity is asserted
    assert calls and all(c.get("alloc_conf") == "expandable_segments:True" for c in calls)
    r.assert_outcomes(failed=1)
    data = json.loads(archives(suite)[0].read_text())
    assert data["run"]["allocator"] == "expandable_segments"
    assert data["environment"]["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert data["cases"][0]["errors"]["peak_reserved"]["asserted"] is True
    assert data["cases"][0]["errors"]["peak_reserved"]["ok"] is False


def test_no_archives_is_a_skip(suite, calls):
    r = suite.runpytest("--catalogue", "catalogue.toml", "-k", "archived", "-rs")
    r.assert_outcomes(skipped=1)
    assert "no archived GPU results under" in r.stdout.str()


# --- compare ----------------------------------------------------------------------------------------

def test_compare_runs_side_by_side(suite, calls, tmp_path):
    from sd_vram.plugin import compare

    run_fake(suite, "--full-call", "none")
    h100 = dict(MEAS, **{"seed-64x64": (1010 * MiB, 1100 * MiB, 1650 * MiB, "unet")})
    run_fake(suite, "--full-call", "none", spec_data=spec(h100, name="NVIDIA H100 80GB HBM3"))
    results = suite.path / "results"
    png = tmp_path / "plot.png"
    text = compare.compare_runs([results / "Test-GPU-24GB", results / "H100-80GB-HBM3"], png=png)
    lines = text.splitlines()
    head = next(ln for ln in lines if ln.startswith("case ") and "H100-80GB-HBM3" in ln)
    assert head.index("Test-GPU-24GB") < head.index("H100-80GB-HBM3")
    assert head.split()[-3:] == ["H100-80GB-HBM3", "vs", "Test-GPU-24GB"]
    seed = next(ln for ln in lines if ln.startswith("seed-64x64 "))           # first table: peak_allocated
    # measured on each GPU with the current equation's error, then the second GPU against the first
    assert seed.split() == ["seed-64x64", "1,000.0", "(+2.00%)", "1,010.0", "(+0.99%)", "+1.0%"]
    assert any(ln.split() == ["big-192x192", "OOM", "OOM"] for ln in lines)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the default is the equation of today; --as-recorded shows the prediction stored with the run
    PRED[(64, 64)], old = (1111 * MiB, 1100 * MiB, 1600 * MiB, "unet"), PRED[(64, 64)]
    try:
        cur = compare.compare_runs([results / "Test-GPU-24GB"])
        stored = compare.compare_runs([results / "Test-GPU-24GB"], as_recorded=True)
    finally:
        PRED[(64, 64)] = old
    assert next(ln for ln in cur.splitlines() if ln.startswith("seed-64x64 ")).split()[2] == "(+11.10%)"
    assert next(ln for ln in stored.splitlines() if ln.startswith("seed-64x64 ")).split()[2] == "(+2.00%)"


def test_compare_cli(suite, calls, capsys):
    from sd_vram.plugin import compare

    run_fake(suite, "--cases", "seed-*", "--full-call", "none")
    assert compare.main([str(suite.path / "results")]) == 0
    assert "seed-64x64" in capsys.readouterr().out
    assert compare.main([str(suite.path / "nothing-here")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# --- several GPUs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("worker, visible, expect", [("gw0", "0,1", "0"), ("gw3", "0,1", "1"),
                                                     ("gw1", "GPU-a,GPU-b,GPU-c", "GPU-b")])
def test_xdist_worker_pinned_to_a_gpu(monkeypatch, worker, visible, expect):
    from sd_vram.plugin.environment import pin_xdist_worker

    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.delenv("SD_VRAM_PINNED_GPU", raising=False)
    assert pin_xdist_worker() == expect
    assert os.environ["CUDA_VISIBLE_DEVICES"] == expect
    assert pin_xdist_worker() == expect            # idempotent: pinned once per process


@pytest.mark.parametrize("workers, visible, refused", [(2, "0", True), (2, "0,1", False), (1, "0", False)])
def test_gpu_runs_refuse_two_workers_on_one_gpu(monkeypatch, workers, visible, refused):
    from types import SimpleNamespace

    from sd_vram.plugin.pytest_plugin import _one_worker_per_gpu

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    def config(tx, dist="load"):      # as xdist leaves it: -n N --maxprocesses M gives min(N, M) x popen
        return SimpleNamespace(option=SimpleNamespace(dist=dist, tx=tx))

    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    if refused:
        with pytest.raises(pytest.UsageError, match=r"2 xdist workers: 1 GPU\(s\) visible.*-n 1"):
            _one_worker_per_gpu(config(["popen"] * workers))
        with pytest.raises(pytest.UsageError, match="2 xdist workers"):
            _one_worker_per_gpu(config(["2*popen"]))
    else:
        _one_worker_per_gpu(config(["popen"] * workers))
    _one_worker_per_gpu(config(["popen"] * 8, dist="no"))    # not distributed
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")      # a worker: its controller decided
    _one_worker_per_gpu(config(["popen"] * 8))


def test_an_empty_cuda_visible_devices_hides_every_gpu(monkeypatch):
    from sd_vram.plugin.environment import pin_xdist_worker, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    monkeypatch.delenv("SD_VRAM_PINNED_GPU", raising=False)
    assert pin_xdist_worker() is None and os.environ["CUDA_VISIBLE_DEVICES"] == ""
