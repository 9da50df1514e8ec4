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
_TRIED = re.compile(r"Tried to allocate ([\d.]+) (bytes|KiB|MiB|GiB)")
_UNIT = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def measured_verdict(m: dict) -> str:
    if m.get("status") == "oom":
        return "oom"
    return "fits-with-fallback" if (m.get("num_ooms") or 0) > 0 else "fits"


def tried_to_allocate(message: str) -> int | None:
    """The bytes an OOM message says it tried to allocate (c10 format_size, two decimals)."""
    m = _TRIED.search(message or "")
    return round(float(m.group(1)) * _UNIT[m.group(2)]) if m else None


def check(run: dict, profile: str) -> list[str]:
    """What the current equation gets wrong about one archived budget run (empty: all right)."""
    from sd_vram.formula import gpu_profiles
    from sd_vram.formula.equation import estimate

    m = run["measurement"]
    options = dict(run["options"])
    prof = gpu_profiles.get(profile)
    est = estimate(run["height"], run["width"], prompt=run.get("prompt"), vram=run["capacity_bytes"] + prof.cuda_context,
                   **{**options, "gpu": profile})
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
        tried = tried_to_allocate(m.get("error", ""))
        if tried is None or tried >> 20 != b.oom.requested_bytes >> 20:
            problems.append(f"OOM at {tried} B, predicted {b.oom.requested_bytes:,} B ({b.oom.stage}: {b.oom.operation})")
    return problems


def archived_runs(results: Path) -> list[tuple[str, dict, str]]:
    """(label, run, prediction profile) of every archived budget run under results/."""
    out = []
    for path in sorted(Path(results).glob("*/*_budgets.json")):
        doc = json.loads(path.read_text())
        for run in doc["runs"]:
            out.append((f"{path.parent.name}/{path.stem}/{run['case']}/{run['budget']}", run, doc["prediction_profile"]))
    return out
