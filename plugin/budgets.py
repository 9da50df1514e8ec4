"""Budget runs (results/<gpu>/*_budgets.json, written by device_tasks budgets) against the
current equation: the verdict, the allocated peak, and the allocation an OOM failed on.

What the GPU says: status "oom" is an OutOfMemoryError out of the call; a call that ended
"ok" with num_ooms > 0 caught one inside: cuDNN's workspace fallback (Conv_v8.cpp
try_configs), the only place this pipeline catches it; "ok" with num_ooms == 0 ran at full
speed (num_alloc_retries then says whether cached segments were released)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ALLOCATED_BAND = 0.01
_TRIED = re.compile(r"Tried to allocate ([\d.]+ (?:bytes|KiB|MiB|GiB))")


def measured_verdict(m: dict) -> str:
    if m.get("status") == "oom":
        return "oom"
    return "fits-with-fallback" if (m.get("num_ooms") or 0) > 0 else "fits"


def tried_to_allocate(message: str) -> str | None:
    """What an OOM message says it tried to allocate, as c10's format_size printed it."""
    m = _TRIED.search(message or "")
    return m.group(1) if m else None


def check(run: dict, profile: str) -> list[str]:
    """What the current equation gets wrong about one archived budget run (empty: all right)."""
    from sd_vram.formula import gpu_profiles
    from sd_vram.formula.allocator import format_size
    from sd_vram.formula.equation import estimate

    m = run["measurement"]
    options = dict(run["options"])
    prof = gpu_profiles.get(profile)
    est = estimate(run["height"], run["width"], prompt=run.get("prompt"), vram=run["capacity_bytes"] + prof.cuda_context,
                   limit="fraction", **{**options, "gpu": profile})
    b, got = est.boundary, measured_verdict(m)
    problems = []
    if b.verdict != got:
        problems.append(f"verdict: predicted {b.verdict}, measured {got}")
    elif got == "fits" and m.get("peak_allocated_bytes"):
        err = (est.peak_allocated - m["peak_allocated_bytes"]) / m["peak_allocated_bytes"]
        if abs(err) > ALLOCATED_BAND:
            problems.append(f"allocated {err:+.2%}")
    elif got == "fits-with-fallback" and m.get("peak_allocated_bytes"):
        lo, hi = b.allocated_range
        if not lo * (1 - ALLOCATED_BAND) <= m["peak_allocated_bytes"] <= hi * (1 + ALLOCATED_BAND):
            problems.append(f"allocated {m['peak_allocated_bytes']:,} B outside [{lo:,}, {hi:,}]")
    elif got == "oom":
        tried, predicted = tried_to_allocate(m.get("error", "")), format_size(b.oom.requested_bytes)
        if tried != predicted:   # compared as printed: two decimals of the unit
            problems.append(f"OOM tried to allocate {tried}, predicted {predicted} ({b.oom.stage}: {b.oom.operation})")
    return problems


def archived_runs(results: Path) -> list[tuple[str, dict, str]]:
    """(label, run, prediction profile) of every archived budget run under results/."""
    out = []
    for path in sorted(Path(results).glob("*/*_budgets.json")):
        doc = json.loads(path.read_text())
        for run in doc["runs"]:
            out.append((f"{path.parent.name}/{path.stem}/{run['case']}/{run['budget']}", run, doc["prediction_profile"]))
    return out
