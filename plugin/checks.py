"""The verdict on one case: the prediction (the current equation) against the measurement, each
quantity within its band, the OOM expectation, the message, and the known gaps (results/known_gaps.toml)."""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .cases import tomllib

MiB = 1 << 20
QUANTITIES = ("peak_allocated", "peak_reserved", "peak_device")
DEFAULT_BANDS = {"peak_allocated": 0.03, "peak_reserved": 0.05, "peak_device": 0.05}


def mib(x) -> str:
    return "-" if x is None else f"{x / MiB:,.1f}"


def predict(height: int, width: int, prompt: str, options: dict, gpu_profile: str | None,
            allocator: str = "default") -> dict:
    """Estimate.to_dict() of the current equation (looked up at call time, so tests can patch it)."""
    import sd_vram.formula as formula

    opts = {k: v for k, v in options.items() if k != "gpu"}
    if gpu_profile:
        opts["gpu"] = gpu_profile
    if allocator == "expandable_segments":
        opts["expandable_segments"] = True
    return formula.estimate(height, width, prompt=prompt, **opts).to_dict()


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def profile_names() -> list[str]:
    """The bundled GPU profiles the equation knows (formula/profiles/*.json), less "default"."""
    from sd_vram.formula import gpu_profiles

    return sorted(n for n in gpu_profiles.profiles() if n != "default")


def match_profile(gpu_name: str | None) -> str | None:
    """The equation's GPU profile for this GPU: gpu_profiles.for_device (exact name), else the
    profile whose name appears in the GPU's name (longest), else None (the default profile)."""
    if not gpu_name:
        return None
    from sd_vram.formula import gpu_profiles

    exact = gpu_profiles.for_device(gpu_name)
    if exact != "default":
        return exact
    g = _norm(gpu_name)
    hits = [n for n in profile_names() if _norm(n) and _norm(n) in g]
    return max(hits, key=lambda n: len(_norm(n))) if hits else None


def allocator_variant(env_vars: dict) -> str:
    """'default' or 'expandable_segments': the equation models the default caching allocator."""
    conf = ",".join(str(env_vars.get(k) or "") for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    return "expandable_segments" if re.search(r"expandable_segments\s*:\s*true", conf, re.I) else "default"


@dataclass
class Check:
    quantity: str
    predicted: int | None
    measured: int | None
    error: float | None          # (predicted - measured) / measured
    band: float
    ok: bool
    asserted: bool

    def line(self) -> str:
        if self.predicted is None or self.measured is None:
            what = "not predicted" if self.predicted is None else "not measured"
            return f"{self.quantity}: {what} (predicted {mib(self.predicted)} MiB, measured {mib(self.measured)} MiB)"
        verdict = "ok" if self.ok else ("FAIL" if self.asserted else "outside band (not asserted)")
        return (f"{self.quantity}: predicted {mib(self.predicted)} MiB, measured {mib(self.measured)} MiB, "
                f"error {self.error:+.2%}, band ±{self.band:.1%}  {verdict}")


def compare(prediction: dict, measurement: dict, bands: dict) -> tuple[list[Check], dict]:
    """Each quantity's relative error against its band, and the stage comparison. Every measured
    quantity is asserted (the equation models both allocator settings); one not measured is shown only."""
    checks = []
    for q in QUANTITIES:
        p, m = prediction.get(q + "_bytes"), measurement.get(q + "_bytes")
        if m is None or m <= 0:   # not measurable here (e.g. NVML unavailable): shown, not asserted
            checks.append(Check(q, p, m, None, bands[q], ok=True, asserted=False))
            continue
        if p is None:
            checks.append(Check(q, p, m, None, bands[q], ok=False, asserted=True))
            continue
        err = (p - m) / m
        checks.append(Check(q, p, m, err, bands[q], ok=abs(err) <= bands[q], asserted=True))
    stage = {"predicted": prediction.get("peak_stage"), "measured": measurement.get("peak_stage")}
    stage["ok"] = stage["predicted"] == stage["measured"]
    return checks, stage


def report(title: str, checks: list[Check], stage: dict) -> str:
    bad = sum(1 for c in checks if c.asserted and not c.ok) + (0 if stage["ok"] else 1)
    lines = [f"{title}: {bad} of {len(checks) + 1} checks failed" if bad else f"{title}: all checks passed"]
    lines += ["  " + c.line() for c in checks]
    lines.append(f"  peak stage: predicted {stage['predicted']}, measured {stage['measured']}  "
                 + ("ok" if stage["ok"] else "FAIL"))
    return "\n".join(lines)


def expectation(prediction: dict | None, capacity: int | None, band: float) -> str:
    """'fit', 'oom' or 'either' (the prediction lies within the band of what the device can hold)."""
    if prediction is None or not capacity:
        return "fit"
    need = prediction["peak_reserved_bytes"]
    if need > capacity * (1 + band):
        return "oom"
    if need < capacity * (1 - band):
        return "fit"
    return "either"


def checks_to_dict(checks: list[Check]) -> dict:
    return {c.quantity: {k: v for k, v in asdict(c).items() if k != "quantity"} for c in checks}


def evaluate(rec: dict, bands: dict, gpu_name: str | None, title: str | None = None) -> None:
    """Fill rec's errors, stage, outcome ('pass', 'fail', 'oom-expected', 'skipped') and message."""
    pred, meas, expect = rec.get("prediction"), rec["measurement"], rec.get("expectation", "fit")
    title = title or f"{rec['id']} on {gpu_name}"
    rec["errors"], rec["stage"] = {}, None
    cap = rec.get("capacity_bytes") or meas.get("capacity_bytes")
    if pred is None:
        rec["outcome"], rec["message"] = "fail", f"{title}: the equation failed: {rec.get('prediction_error')}"
        return
    need = pred.get("peak_reserved_bytes")
    if meas.get("status") == "skipped":
        rec["outcome"], rec["message"] = "skipped", f"{title}: skipped: {meas.get('error')}"
    elif meas.get("status") == "error":
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

