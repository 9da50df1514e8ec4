"""pytest plugin of sd-vram: `pytest --gpu` proves the equation on a real GPU.

With --gpu every case of cases/catalogue.toml runs the real FP16 img2img call on CUDA; the
peaks measured (allocator, per stage, NVML) must lie within each quantity's band of the
equation's prediction, and the run is archived under results/<gpu-model>/. Without --gpu
those tests are skipped and the current equation is checked against every archived
measurement instead (one test per archived case, id like `H200/balloon-640x427`).

The tests themselves are in sd_vram/plugin/suite.py, collected through tests/test_plugin_suite.py.
Registered by the pytest11 entry point "sd_vram.plugin.pytest_plugin" (or by the repository's
conftest.py when the package is not installed). See docs/gpu-suite.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from . import archive as arch
from .cases import Catalogue, CatalogueError, load_catalogue, matches, split_list, tomllib
from .checks import (QUANTITIES, allocator_variant, checks_to_dict, compare, expectation,
                     match_profile, mib, predict, report)

STATE = pytest.StashKey["SuiteState"]()
PROPERTY = "sd_vram"
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


def probed_profile(backend) -> str | None:
    """The path of a probed profile (user folder) of this GPU and stack, if there is one."""
    from sd_vram.formula import gpu_profiles

    from .probe import stack_of

    p = gpu_profiles.for_stack(backend.gpu["name"], stack_of(backend.environment))
    return p.path if p is not None else None


def prediction_profile(name) -> dict:
    """What the archive records of the profile the predictions came from."""
    from sd_vram.formula import InputError, gpu_profiles

    try:
        p = gpu_profiles.get(name or "default")
    except InputError as e:
        return {"name": name, "source": None, "error": str(e)}
    return {"name": p.name, "source": p.source, "path": p.path, "gpu": p.gpu, "stack": dict(p.stack)}


# --- configuration -----------------------------------------------------------------------------

def _is_xdist_controller(config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not os.environ.get("PYTEST_XDIST_WORKER")


def pin_xdist_worker() -> str | None:
    """Under pytest-xdist, pin worker gwN to GPU N (mod the GPU count) before CUDA starts in it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or os.environ.get("SD_VRAM_PINNED_GPU"):
        return os.environ.get("SD_VRAM_PINNED_GPU")
    try:
        idx = int(worker.lstrip("gw"))
    except ValueError:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        try:                       # UUIDs: CUDA's device order need not be NVML's
            import pynvml

            pynvml.nvmlInit()
            devices = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                u = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
                devices.append(u.decode() if isinstance(u, bytes) else u)
        except Exception:
            return None
    if not devices:
        return None
    dev = devices[idx % len(devices)]
    os.environ["CUDA_VISIBLE_DEVICES"] = dev
    os.environ["SD_VRAM_PINNED_GPU"] = dev
    return dev


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
        # Cheap first: a time budget or an out-of-memory crash costs the least.
        def key(item):
            cs = getattr(item, "callspec", None)
            case = cs and (cs.params.get("sd_case") or cs.params.get("sd_full_case"))
            return (1, case.cost) if case is not None else (0, 0)
        items.sort(key=key)


@pytest.fixture(scope="session")
def sd_vram_suite(request) -> "SuiteState":
    """The run's state: backend, archive, bands (see SuiteState)."""
    return request.config.stash[STATE]


# --- the run -----------------------------------------------------------------------------------

class SuiteState:
    def __init__(self, config):
        self.config = config
        opt = config.getoption
        root = Path(config.rootpath)
        self.bands = {"peak_allocated": opt("band_allocated"), "peak_reserved": opt("band_reserved"),
                      "peak_device": opt("band_device")}
        for q, b in self.bands.items():
            if not 0 < b < 1:
                raise pytest.UsageError(f"--band-{q.split('_')[1]} must be a fraction between 0 and 1, got {b}")
        self.results_dir = Path(opt("results_dir") or root / "results")
        self.archive_enabled = not opt("no_archive")
        self.names, self.tags = opt("cases"), opt("case_tags")
        self.backend_name = opt("sd_backend")
        self.model = opt("sd_model")
        self.started = time.time()
        self.deadline = None
        budget = opt("time_budget")
        if budget is not None:
            self.deadline = self.started + budget
        if os.environ.get("SD_VRAM_DEADLINE"):
            try:
                d = float(os.environ["SD_VRAM_DEADLINE"])
            except ValueError:
                raise pytest.UsageError(f"SD_VRAM_DEADLINE must be epoch seconds, got {os.environ['SD_VRAM_DEADLINE']!r}")
            self.deadline = d if self.deadline is None else min(self.deadline, d)
        cat_path = Path(opt("catalogue")) if opt("catalogue") else root / "cases" / "catalogue.toml"
        self.catalogue: Catalogue | None = None
        self.catalogue_error = None
        if cat_path.is_file() or opt("catalogue"):
            try:
                self.catalogue = load_catalogue(cat_path)
            except CatalogueError as e:
                raise pytest.UsageError(str(e)) from None
        else:
            self.catalogue_error = f"no case catalogue at {cat_path} (--catalogue PATH)"
        self.monitor = None
        self._backend = None
        self._backend_error = None
        self._archive = None
        self.short: dict[str, dict] = {}       # case name -> record of its short run
        self.timings: list[tuple[float, float]] = []   # (case cost, wall seconds) of the calls that ran
        self.gpu_profile = opt("gpu_profile")
        if self.gpu_profile is not None:
            from sd_vram.formula import InputError, gpu_profiles

            try:
                p = gpu_profiles.get(self.gpu_profile)
            except InputError as e:
                raise pytest.UsageError(f"--gpu-profile: {e}") from None
            self.gpu_profile = p.path if p.source == "probe" else p.name   # a path: the same file later

    # -- selection
    def no_cases_reason(self) -> str:
        return self.catalogue_error or "no catalogue case matches --cases/--case-tags"

    def selected_cases(self):
        return self.catalogue.select(self.names, self.tags) if self.catalogue else []

    def full_call_cases(self):
        spec = (self.config.getoption("full_call") or "none").strip()
        if spec.lower() == "none" or not self.catalogue:
            return []
        seeds = [c for c in self.selected_cases() if "seed" in c.tags]
        if spec.lower() == "all":
            return [c.full_call() for c in seeds]
        if spec.lower() == "cheapest":
            return [min(seeds, key=lambda c: c.cost).full_call()] if seeds else []
        return [c.full_call() for c in seeds if matches(c, spec, None)]

    def tag_marks(self, case):
        marks = [pytest.mark.gpu, pytest.mark.sd_vram_case]
        if case.variant == "full":
            marks.append(pytest.mark.sd_vram_full_call)
        return marks + [getattr(pytest.mark, t) for t in case.tags if t.isidentifier()]

    def archived(self) -> list[dict]:
        """One entry per archived case record (filtered by --cases/--case-tags)."""
        found = arch.load_all(self.results_dir) if self.results_dir.is_dir() else []
        per_slug: dict[str, int] = {}
        for _path, data in found:
            slug = data.get("gpu", {}).get("slug", "unknown")
            per_slug[slug] = per_slug.get(slug, 0) + 1
        out = []
        for path, data in found:
            slug = data.get("gpu", {}).get("slug", "unknown")
            prefix = slug if per_slug[slug] == 1 else f"{slug}/{path.stem}"
            for rec in data.get("cases", []):
                tags = ",".join(rec.get("tags", []))
                if not matches(_Named(rec.get("case", "")), self.names, None):
                    continue
                if self.tags and not set(split_list(self.tags)) & set(split_list(tags)):
                    continue
                out.append({"test_id": f"{prefix}/{rec['id']}", "path": path, "archive": data, "record": rec})
        return out

    # -- time
    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()

    def seconds_for(self, cost: float) -> float | None:
        """Seconds a call of this cost would take at the rate of the costliest call so far (None: none ran)."""
        if not self.timings:
            return None
        c, s = max(self.timings)
        return s / c * cost if c else None

    def check_time(self, need: float = 0.0, what: str = ""):
        left = self.remaining()
        if left is not None and left <= need:
            pytest.skip(f"time budget exhausted ({left:.0f} s left{', ' + what if what else ''})")

    # -- backend and archive
    def backend(self):
        if self._backend is None and self._backend_error is None:
            from .backends import make_backend

            try:
                self._backend = make_backend(self.backend_name, monitor=self.monitor, model=self.model,
                                             fake_spec=self.config.getoption("sd_fake_measurements"))
            except Exception as e:
                self._backend_error = f"{type(e).__name__}: {e}"
        if self._backend is None:
            pytest.fail(f"could not set up the {self.backend_name} backend: {self._backend_error}", pytrace=False)
        if self.gpu_profile is None:
            self.gpu_profile = probed_profile(self._backend) or match_profile(self._backend.gpu["name"])
        return self._backend

    def archive(self) -> arch.RunArchive:
        if self._archive is None:
            b = self.backend()
            root = Path(self.config.rootpath)
            commit, dirty = arch.git_commit(root)
            worker = os.environ.get("PYTEST_XDIST_WORKER")
            path = arch.new_archive_path(self.results_dir, b.gpu["slug"], commit, worker) if self.archive_enabled else None
            env = b.environment
            header = {
                "run": {
                    "id": path.stem if path else None,
                    "started_utc": datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds"),
                    "finished_utc": None, "complete": False,
                    "git_commit": commit, "git_dirty": dirty, "backend": b.name,
                    "model": self.model or "bundled", "argv": list(self.config.invocation_params.args),
                    "bands": dict(self.bands), "allocator": allocator_variant(env.get("env", {})),
                    "catalogue": str(self.catalogue.path) if self.catalogue else None,
                    "worker": worker, "time_budget_s": None if self.deadline is None else round(self.deadline - self.started),
                },
                "gpu": {**b.gpu, "profile": self.gpu_profile},
                "prediction_profile": prediction_profile(self.gpu_profile),
                "environment": env,
                "hardware": b.hardware,
                "warmup": b.warmup,
            }
            self._archive = arch.RunArchive(path, header)
        return self._archive

    def close(self):
        if self._archive is not None:
            self._archive.finish(finished_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 complete=not getattr(self, "interrupted", False))
        if self._backend is not None:
            try:
                self._backend.close()
            except Exception:
                pass
            self._backend = None

    # -- one case on the GPU
    def measure_case(self, case) -> dict:
        b = self.backend()
        images = self.catalogue.images_dir if self.catalogue else None
        height, width = case.size(images)
        if b.wants_image:
            image, image_info = case.load_image(images)
        else:
            image = None
            image_info = {"source": "file" if case.image_path(images) else "generated",
                          "file": case.image if case.image_path(images) else None}
        prediction, prediction_error = None, None
        try:
            prediction = predict(height, width, case.prompt, case.options, self.gpu_profile,
                                 allocator_variant(b.environment.get("env", {})))
        except Exception as e:
            prediction_error = f"{type(e).__name__}: {e}"
        capacity = b.capacity()
        expect = expectation(prediction, capacity, self.bands["peak_reserved"])
        meas = b.measure(case, image, size=(height, width))
        del image
        record = {
            "id": case.id, "case": case.name, "variant": case.variant, "tags": list(case.tags),
            "inputs": {"height": height, "width": width, "prompt": case.prompt, "image": image_info,
                       "options": dict(case.options), "gpu_profile": self.gpu_profile,
                       "unet_evals": case.unet_evals},
            "prediction": prediction, "prediction_error": prediction_error,
            "expectation": expect, "capacity_bytes": capacity, "measurement": meas,
        }
        evaluate(record, self.bands, b.gpu["name"])
        self.archive().add(record)
        if meas.get("status") == "ok" and meas.get("wall_s"):
            self.timings.append((case.cost, meas["wall_s"]))
        if case.variant == "short":
            self.short[case.name] = record
        return record

    def run_case(self, case, node):
        self.check_time()
        rec = self.measure_case(case)
        node.user_properties.append((PROPERTY, self.row(rec, self.backend().gpu["slug"])))
        if rec["outcome"] == "fail":
            pytest.fail(rec["message"], pytrace=False)

    def run_full_call(self, case, node):
        self.check_time()
        short_case = self.catalogue.get(case.name)
        short = self.short.get(case.name)
        if short is None:
            # Measuring the short run costs time too: skip both if this session's largest call
            # so far says they cannot both finish.
            guess = self.seconds_for(short_case.cost + case.cost)
            if guess is not None:
                self.check_time(guess, f"the short run and the full call need about {guess:.0f} s")
            short = self.measure_case(short_case)
        sm = short["measurement"]
        if sm.get("status") != "ok":
            pytest.skip(f"{short_case.id}: the short run did not complete ({sm.get('status')}), nothing to compare")
        need = full_call_seconds(sm, short_case.unet_evals, case.unet_evals)
        self.check_time(need, f"the full call needs about {need:.0f} s")
        rec = self.measure_case(case)
        fm = rec["measurement"]
        same = (fm.get("status") == "ok" and fm.get("peak_allocated_bytes") == sm.get("peak_allocated_bytes")
                and fm.get("peak_stage") == sm.get("peak_stage"))
        rec["reference_short"] = {"id": short["id"], "peak_allocated_bytes": sm.get("peak_allocated_bytes"),
                                  "peak_reserved_bytes": sm.get("peak_reserved_bytes"),
                                  "peak_stage": sm.get("peak_stage"), "unet_evals": sm.get("unet_evals")}
        rec["same_as_short"] = same
        lines = [rec["message"]]
        if not same:
            rec["outcome"] = "fail"
            lines.append(
                f"  full call vs short run ({fm.get('unet_evals')} vs {sm.get('unet_evals')} UNet evaluations): "
                f"peak_allocated {mib(fm.get('peak_allocated_bytes'))} vs {mib(sm.get('peak_allocated_bytes'))} MiB "
                f"(difference {_diff(fm.get('peak_allocated_bytes'), sm.get('peak_allocated_bytes'))} bytes), "
                f"peak stage {fm.get('peak_stage')} vs {sm.get('peak_stage')}  FAIL")
        else:
            lines.append(f"  full call reaches the short run's peak exactly: "
                         f"{mib(fm.get('peak_allocated_bytes'))} MiB in {fm.get('peak_stage')}")
        rec["message"] = "\n".join(lines)
        self.archive().write()
        node.user_properties.append((PROPERTY, self.row(rec, self.backend().gpu["slug"])))
        if rec["outcome"] == "fail":
            pytest.fail(rec["message"], pytrace=False)

    # -- one archived case, no GPU
    def check_archived(self, entry, node):
        data, rec = entry["archive"], dict(entry["record"])
        meas = rec.get("measurement") or {}
        if meas.get("status") not in ("ok", "oom"):
            pytest.skip(f"{entry['test_id']}: the archived call did not complete ({meas.get('status')}: {meas.get('error')})")
        gpu = data.get("gpu", {})
        inp = rec["inputs"]
        profile = self.config.getoption("gpu_profile") or match_profile(gpu.get("name"))
        try:
            rec["prediction"] = predict(inp["height"], inp["width"], inp["prompt"], inp["options"], profile,
                                        allocator_variant(data.get("environment", {}).get("env", {})))
            rec["prediction_error"] = None
        except Exception as e:
            rec["prediction"], rec["prediction_error"] = None, f"{type(e).__name__}: {e}"
        rec["expectation"] = expectation(rec["prediction"], rec.get("capacity_bytes") or meas.get("capacity_bytes"),
                                         self.bands["peak_reserved"])
        variant = allocator_variant(data.get("environment", {}).get("env", {}))
        evaluate(rec, self.bands, gpu.get("name"), title=entry["test_id"])
        node.user_properties.append((PROPERTY, self.row(rec, gpu.get("slug", "?"), test_id=entry["test_id"],
                                                        archive=str(entry["path"]))))
        gap = known_gap(self.config.rootpath, rec["id"], variant)
        if gap is not None:
            off = sorted(q for q, e in rec.get("errors", {}).items() if e.get("asserted") and not e.get("ok"))
            stage_ok = (rec.get("stage") or {}).get("ok", True)
            if off == sorted(gap["quantities"]) and stage_ok:
                pytest.xfail(f"known gap (results/known_gaps.toml): {gap['reason']}")
            if not off and stage_ok:
                pytest.fail(f"{entry['test_id']} is listed in results/known_gaps.toml but now meets its bands: "
                            "delete the entry", pytrace=False)
        if rec["outcome"] == "fail":
            pytest.fail(rec["message"], pytrace=False)

    def row(self, rec, slug, test_id=None, archive=None) -> dict:
        return {"id": test_id or f"{slug}/{rec['id']}", "outcome": rec["outcome"], "status": rec["measurement"].get("status"),
                "errors": rec.get("errors", {}), "stage": rec.get("stage"),
                "archive": archive or (str(self._archive.path) if self._archive and self._archive.path else None),
                "kind": "archived" if archive else "gpu", "message": rec.get("message", "").splitlines()[0]}


@functools.lru_cache(maxsize=None)
def _known_gaps(path: Path) -> tuple:
    """The entries of results/known_gaps.toml (read once per run, not once per archived case)."""
    if not path.exists():
        return ()
    return tuple(tomllib.loads(path.read_text(encoding="utf-8")).get("gap", []))


def known_gap(root, case_id: str, variant: str) -> dict | None:
    """The entry of results/known_gaps.toml for this archived case and allocator, if any."""
    for gap in _known_gaps(Path(root) / "results" / "known_gaps.toml"):
        if gap.get("case") == case_id and gap.get("allocator", "default") == variant:
            return gap
    return None


FULL_CALL_MARGIN = 1.1


def full_call_seconds(short: dict, short_evals: int, full_evals: int) -> float:
    """Expected wall time of a full call from its short run's measurement.

    Only the UNet stage grows with the steps; its time per evaluation (stage_seconds, the
    stage synchronized at its ends) times the extra evaluations, plus a margin. Measurements
    without stage times (older archives, the fake backend) scale the whole call.
    """
    wall = short.get("wall_s") or 0.0
    unet = (short.get("stage_seconds") or {}).get("unet")
    if unet is None:
        return wall * full_evals / max(short_evals, 1) * 1.3 + 5
    return wall + unet / max(short_evals, 1) * max(full_evals - short_evals, 0) * FULL_CALL_MARGIN + 3


class _Named:
    def __init__(self, name):
        self.name, self.tags = name, ()


def _diff(a, b):
    return "?" if a is None or b is None else f"{a - b:+,}"


def evaluate(rec: dict, bands: dict, gpu_name: str | None, title: str | None = None) -> None:
    """Fill rec's errors, stage, outcome ('pass', 'fail', 'oom-expected') and message."""
    pred, meas, expect = rec.get("prediction"), rec["measurement"], rec.get("expectation", "fit")
    title = title or f"{rec['id']} on {gpu_name}"
    rec["errors"], rec["stage"] = {}, None
    cap = rec.get("capacity_bytes") or meas.get("capacity_bytes")
    if pred is None:
        rec["outcome"], rec["message"] = "fail", f"{title}: the equation failed: {rec.get('prediction_error')}"
        return
    need = pred.get("peak_reserved_bytes")
    if meas.get("status") == "error":
        rec["outcome"], rec["message"] = "fail", f"{title}: the call failed: {meas.get('error')}"
    elif meas.get("status") == "oom":
        if expect in ("oom", "either"):
            rec["outcome"] = "oom-expected"
            rec["message"] = (f"{title}: out of memory, as predicted (peak_reserved {mib(need)} MiB, "
                              f"the device could hold {mib(cap)} MiB)")
        else:
            rec["outcome"] = "fail"
            rec["message"] = (f"{title}: ran out of memory, but the equation says it fits: predicted peak_reserved "
                              f"{mib(need)} MiB, the device could hold {mib(cap)} MiB\n  "
                              + str(meas.get("error") or "").splitlines()[0][:300])
    else:
        checks, stage = compare(pred, meas, bands)
        rec["errors"], rec["stage"] = checks_to_dict(checks), stage
        if expect == "oom":
            rec["outcome"] = "fail"
            rec["message"] = (f"{title}: the equation says it cannot fit (peak_reserved {mib(need)} MiB > "
                              f"{mib(cap)} MiB the device could hold) but it ran\n" + report(title, checks, stage))
        else:
            bad = any(c.asserted and not c.ok for c in checks) or not stage["ok"]
            rec["outcome"] = "fail" if bad else "pass"
            rec["message"] = report(title, checks, stage)


# --- reporting ---------------------------------------------------------------------------------

def pytest_sessionfinish(session, exitstatus):
    state = session.config.stash.get(STATE, None)
    if state is not None:
        state.interrupted = exitstatus in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR)


def _rows(terminalreporter) -> list[dict]:
    rows, seen = [], set()
    for reports in terminalreporter.stats.values():
        for rep in reports:
            for name, value in getattr(rep, "user_properties", ()) or ():
                if name == PROPERTY and isinstance(value, dict) and (rep.nodeid, value["id"]) not in seen:
                    seen.add((rep.nodeid, value["id"]))
                    rows.append(value)
    return rows


def format_table(rows: list[dict], bands: dict) -> list[str]:
    head = f"{'case':<40} {'quantity':<15} {'predicted':>11} {'measured':>11} {'error':>8} {'band':>6}  {'stage (pred/meas)':<28} result"
    out = [head, "-" * len(head)]
    for r in rows:
        stage = r.get("stage") or {}
        stage_txt = f"{stage.get('predicted')}/{stage.get('measured')}" if stage else "-"
        if not r.get("errors"):
            out.append(f"{r['id']:<40} {'-':<15} {'':>11} {'':>11} {'':>8} {'':>6}  {stage_txt:<28} "
                       f"{r['outcome']} ({r.get('status')})")
            continue
        for i, q in enumerate(QUANTITIES):
            c = r["errors"].get(q, {})
            err = "-" if c.get("error") is None else f"{c['error']:+.2%}"
            verdict = "ok" if c.get("ok") else ("FAIL" if c.get("asserted") else "info")
            out.append(f"{r['id'] if i == 0 else '':<40} {q:<15} {mib(c.get('predicted')):>11} "
                       f"{mib(c.get('measured')):>11} {err:>8} {c.get('band', bands[q]):>6.1%}  "
                       f"{stage_txt if i == 0 else '':<28} {verdict}"
                       + (f"  => {r['outcome']}" if i == len(QUANTITIES) - 1 else ""))
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = config.stash.get(STATE, None)
    rows = _rows(terminalreporter)
    if state is None or not rows:
        return
    tr = terminalreporter
    for kind, title in (("gpu", "sd-vram: predicted vs measured on the GPU (MiB)"),
                        ("archived", "sd-vram: current equation vs archived GPU results (MiB)")):
        part = [r for r in rows if r["kind"] == kind]
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
