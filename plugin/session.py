"""The run's session state (SuiteState): what one `pytest` run selects, measures, archives and
checks. pytest_plugin.py creates it in pytest_configure and hands it to the tests (suite.py) as
the sd_vram_suite fixture; the verdict of a case is checks.py's, the table table.py's.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from . import archive as arch
from .backends import Backend, make_backend
from .cases import Catalogue, CatalogueError, load_catalogue, matches, split_list
from .checks import alloc_conf, allocator_variant, evaluate, expectation, known_gap, match_profile, mib, predict
from .table import PROPERTY


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


class SuiteState:
    """The run's state, one per pytest session (config.stash): the options, the catalogue and the
    selection, the time budget, the backend and the archive, and the bodies of suite.py's tests."""

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
        self.interrupted = False               # set by pytest_sessionfinish
        self._backend: Backend | None = None
        self._backend_error: str | None = None
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
    def backend(self) -> Backend:
        if self._backend is None and self._backend_error is None:
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
                                 complete=not self.interrupted)
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
                                 alloc_conf(b.environment.get("env", {})))
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
        reason = getattr(self.backend(), "cannot_run", lambda c: None)(case)
        if reason:
            pytest.skip(f"{case.id}: {reason}")
        rec = self.measure_case(case)
        node.user_properties.append((PROPERTY, self.row(rec, self.backend().gpu["slug"])))
        if rec["outcome"] == "fail":
            pytest.fail(rec["message"], pytrace=False)
        if rec["outcome"] == "skipped":
            pytest.skip(rec["message"])

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
                                        alloc_conf(data.get("environment", {}).get("env", {})))
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

