"""Predictions (the current equation) against measurements: bands, OOM expectation, messages."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

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
