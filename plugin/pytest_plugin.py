"""pytest plugin of sd-vram: `pytest --gpu` proves the equation on a real GPU.

With --gpu every case of cases/catalogue.toml runs the real FP16 img2img call on CUDA; the
peaks measured (allocator, per stage, NVML) must lie within each quantity's band of the
equation's prediction, and the run is archived under results/<gpu-model>/. Without --gpu
those tests are skipped and the current equation is checked against every archived
measurement instead (one test per archived case, id like `H200/balloon-640x427`).

The tests themselves are in sd_vram/plugin/suite.py, collected through tests/test_plugin_suite.py.
Registered by the pytest11 entry point "sd_vram.plugin.pytest_plugin" (or by the repository's
conftest.py when the package is not installed). See docs/gpu-suite.md. This module holds the
options and the hooks only: the run's state is session.py's (SuiteState), the verdicts
checks.py's, the summary table table.py's.
"""

from __future__ import annotations

import argparse
import os

import pytest

from .environment import pin_xdist_worker, visible_gpus
from .session import SuiteState
from .table import format_table, rows

STATE = pytest.StashKey[SuiteState]()
GPU_SKIP_REASON = "real-GPU validation: run `pytest --gpu` on a machine with a CUDA GPU"
MARKERS = (
    "gpu: needs a real CUDA GPU; runs only with `pytest --gpu` (skipped otherwise)",
    "sd_vram_case: a case of the sd-vram catalogue, measured on the GPU",
    "sd_vram_full_call: a seed case run with the full default call (strength 0.8, 50 steps)",
    "sd_vram_archived: the current equation against one archived GPU measurement",
)


# --- options -----------------------------------------------------------------------------------

def pytest_addoption(parser):
    g = parser.getgroup("sd-vram", "sd-vram: peak GPU memory of SD1.5 img2img")
    g.addoption("--gpu", action="store_true", default=False,
                help="run the real-GPU validation of the equation (needs CUDA); without it those tests are skipped")
    g.addoption("--sd-model", default=None, metavar="PATH_OR_ID",
                help="diffusers model folder or hub id (default: the bundled SD1.5 config with random fp16 weights)")
    g.addoption("--band-allocated", type=float, default=0.03, metavar="FRACTION",
                help="tolerance of peak_allocated, |pred-meas|/meas (default 0.03)")
    g.addoption("--band-reserved", type=float, default=0.05, metavar="FRACTION",
                help="tolerance of peak_reserved (default 0.05)")
    g.addoption("--band-device", type=float, default=0.05, metavar="FRACTION",
                help="tolerance of peak_device, NVML (default 0.05)")
    g.addoption("--cases", default=None, metavar="NAME_GLOB[,...]",
                help="run only catalogue cases whose name matches one of these globs (also filters archived results)")
    g.addoption("--case-tags", default=None, metavar="TAG[,...]",
                help="run only catalogue cases carrying one of these tags (seed, square, math, ...)")
    g.addoption("--full-call", default="cheapest", metavar="CASES",
                help="seed cases also run with the full default call (strength 0.8, 50 steps) and must reach the "
                     "short run's peak: names/globs, 'all' (every seed case), 'none', or 'cheapest' (default: "
                     "the cheapest selected seed case, balloon-396x380 in the catalogue)")
    g.addoption("--catalogue", default=None, metavar="PATH", help="case catalogue (default <rootdir>/cases/catalogue.toml)")
    g.addoption("--results-dir", default=None, metavar="DIR", help="archive folder (default <rootdir>/results)")
    g.addoption("--no-archive", action="store_true", default=False, help="do not write the run's archive")
    g.addoption("--gpu-profile", default=None, metavar="NAME|FILE",
                help="GPU profile for the predictions: a name (probed profiles first, then bundled) or a file "
                     "(default: a probed profile of this GPU and stack, else the profile matching the GPU's name)")
    g.addoption("--time-budget", type=float, default=None, metavar="SECONDS",
                help="skip GPU cases not started within this many seconds (also env SD_VRAM_DEADLINE, epoch seconds)")
    # Hidden: the measurement backend. "fake" runs everything but the GPU (the plugin's own tests, dry runs).
    g.addoption("--sd-backend", default="cuda", choices=("cuda", "fake"), help=argparse.SUPPRESS)
    g.addoption("--sd-fake-measurements", default=None, help=argparse.SUPPRESS)


# --- configuration -----------------------------------------------------------------------------

def _xdist_workers(config) -> int:
    """The workers xdist starts from this process (0 in a worker, or when it does not distribute):
    its gateway specs (-n N becomes min(N, --maxprocesses) x "popen"; "N*popen" counts N)."""
    if os.environ.get("PYTEST_XDIST_WORKER") or getattr(config.option, "dist", "no") == "no":
        return 0
    return sum(int(spec.split("*", 1)[0]) if "*" in spec else 1 for spec in getattr(config.option, "tx", None) or [])


def _is_xdist_controller(config) -> bool:
    return _xdist_workers(config) > 0


def _one_worker_per_gpu(config) -> None:
    """`pytest --gpu -n N` pins worker gwN to GPU N mod count: more workers than GPUs would
    put two processes on one GPU, each distorting the other's NVML readings and peaks."""
    workers = _xdist_workers(config)
    gpus = len(visible_gpus()) if workers > 1 else 0
    if gpus and workers > gpus:
        raise pytest.UsageError(f"--gpu with {workers} xdist workers: {gpus} GPU(s) visible, and two workers on one "
                                f"GPU distort each other's measurements; use -n {gpus} or run without -n")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    for m in MARKERS:
        config.addinivalue_line("markers", m)
    state = SuiteState(config)
    config.stash[STATE] = state
    if state.catalogue is not None:
        for tag in state.catalogue.tags():
            config.addinivalue_line("markers", f"{tag}: sd-vram catalogue cases tagged {tag!r}")
    if config.getoption("gpu") and state.backend_name == "cuda":
        _one_worker_per_gpu(config)
        pin_xdist_worker()
        if not _is_xdist_controller(config):
            from . import gpu

            try:
                state.monitor = gpu.preflight()       # NVML baseline before the first CUDA call
            except RuntimeError as e:
                raise pytest.UsageError(
                    f"--gpu runs the real-GPU validation and needs a CUDA GPU, but {e}. "
                    "Run `pytest` without --gpu for the checks that need no GPU.") from None


def pytest_unconfigure(config):
    state = config.stash.get(STATE, None)
    if state is not None:
        state.close()


# --- collection --------------------------------------------------------------------------------

def pytest_generate_tests(metafunc):
    state = metafunc.config.stash.get(STATE, None)
    if state is None:
        return
    if "sd_case" in metafunc.fixturenames:
        params = [pytest.param(c, id=c.id, marks=state.tag_marks(c)) for c in state.selected_cases()]
        metafunc.parametrize("sd_case", params or [pytest.param(None, id="no-cases", marks=pytest.mark.skip(
            reason=state.no_cases_reason()))])
    if "sd_full_case" in metafunc.fixturenames:
        params = [pytest.param(c, id=c.id, marks=state.tag_marks(c)) for c in state.full_call_cases()]
        metafunc.parametrize("sd_full_case", params or [pytest.param(None, id="none", marks=pytest.mark.skip(
            reason="no seed case selected for the full default call (--full-call)"))])
    if "sd_archived" in metafunc.fixturenames:
        params = [pytest.param(p, id=p["test_id"]) for p in state.archived()]
        metafunc.parametrize("sd_archived", params or [pytest.param(None, id="no-archives", marks=pytest.mark.skip(
            reason=f"no archived GPU results under {state.results_dir} (run `pytest --gpu` on a GPU to make some)"))])


def pytest_collection_modifyitems(config, items):
    gpu = config.getoption("gpu")
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    drop = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "sd_full_case" in params and params["sd_full_case"] is None:
            drop.append(item)                 # no seed case selected for the full call
        elif gpu and "sd_archived" in params:
            drop.append(item)                 # the archived regression is the run without --gpu
        elif item.get_closest_marker("gpu") and not gpu:
            item.add_marker(skip)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [i for i in items if i not in drop]
    if gpu:
        # Cheap first: a time budget or an out-of-memory crash costs the least. Each dtype's
        # and memory format's cases together, fp16 NCHW first: a change of either rebuilds the
        # pipeline (gpu.py use_build).
        def key(item):
            cs = getattr(item, "callspec", None)
            case = cs and (cs.params.get("sd_case") or cs.params.get("sd_full_case"))
            if case is None:
                return (0, False, "", False, 0)
            dtype = case.options.get("dtype", "fp16")
            return (1, dtype != "fp16", dtype, bool(case.options.get("channels_last", False)), case.cost)
        items.sort(key=key)


@pytest.fixture(scope="session")
def sd_vram_suite(request) -> SuiteState:
    """The run's state: backend, archive, bands (see SuiteState)."""
    return request.config.stash[STATE]


# --- reporting ---------------------------------------------------------------------------------

def pytest_sessionfinish(session, exitstatus):
    state = session.config.stash.get(STATE, None)
    if state is not None:
        state.interrupted = exitstatus in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = config.stash.get(STATE, None)
    found = rows(terminalreporter)
    if state is None or not found:
        return
    tr = terminalreporter
    for kind, title in (("gpu", "sd-vram: predicted vs measured on the GPU (MiB)"),
                        ("archived", "sd-vram: current equation vs archived GPU results (MiB)")):
        part = [r for r in found if r["kind"] == kind]
        if not part:
            continue
        tr.write_sep("=", title)
        for line in format_table(part, state.bands):
            tr.write_line(line)
        passed = sum(r["outcome"] in ("pass", "oom-expected") for r in part)
        tr.write_line(f"{passed} of {len(part)} cases within their bands "
                      f"(allocated ±{state.bands['peak_allocated']:.0%}, reserved ±{state.bands['peak_reserved']:.0%}, "
                      f"device ±{state.bands['peak_device']:.0%})")
        if kind == "gpu":
            for a in sorted({r["archive"] for r in part if r.get("archive")}):
                tr.write_line(f"archived: {a}")

