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
            process_conf: str = "") -> dict:
    """Estimate.to_dict() of the current equation (looked up at call time, so tests can patch it).
    process_conf: the allocator settings the measuring process ran under (alloc_conf(env)); a
    case's own alloc_conf option is what that process was started with (plugin/gpu.py checks)."""
    import sd_vram.formula as formula

    opts = {k: v for k, v in options.items() if k != "gpu"}
    if gpu_profile:
        opts["gpu"] = gpu_profile
    if process_conf:
        opts["alloc_conf"] = process_conf
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


def alloc_conf(env_vars: dict) -> str:
    """The allocator settings a process read from its environment (allocconf.from_environment)."""
    from sd_vram.formula import allocconf

    return allocconf.from_environment(env_vars)


def allocator_variant(env_vars: dict) -> str:
    """The run's allocator as a label: 'default', 'expandable_segments', or the settings' text."""
    from sd_vram.formula import allocconf

    text = alloc_conf(env_vars)
    try:
        conf = allocconf.parse(text)
    except allocconf.AllocConfError:
        return text
    if conf == allocconf.NATIVE:
        return "default"
    return "expandable_segments" if conf == allocconf.AllocConf(expandable_segments=True) else text


@dataclass
class Check:
    quantity: str
    predicted: int | None
    measured: int | None
    error: float | None          # (predicted - measured) / measured
    band: float
    ok: bool
    asserted: bool
    # [lo, hi] held instead of the band where the figure depends on run-time state (cudnn.benchmark)
    range: tuple | None = None

    def line(self) -> str:
        if self.predicted is None or self.measured is None:
            what = "not predicted" if self.predicted is None else "not measured"
            return f"{self.quantity}: {what} (predicted {mib(self.predicted)} MiB, measured {mib(self.measured)} MiB)"
        verdict = "ok" if self.ok else ("FAIL" if self.asserted else "outside band (not asserted)")
        held = (f"range [{mib(self.range[0])}, {mib(self.range[1])}] MiB (run-time state)" if self.range
                else f"band ±{self.band:.1%}")
        return (f"{self.quantity}: predicted {mib(self.predicted)} MiB, measured {mib(self.measured)} MiB, "
                f"error {self.error:+.2%}, {held}  {verdict}")


def compare(prediction: dict, measurement: dict, bands: dict) -> tuple[list[Check], dict]:
    """Each quantity's relative error against its band, and the stage comparison. Every measured
    quantity is asserted (the equation models both allocator settings); one not measured is shown only.
    Where the prediction depends on run-time state (cudnn.benchmark), the measurement must lie in
    its bounds instead."""
    checks = []
    ranged = prediction.get("bounds") if prediction.get("depends_on_runtime_state") else None
    for q in QUANTITIES:
        p, m = prediction.get(q + "_bytes"), measurement.get(q + "_bytes")
        if m is None or m <= 0:   # not measurable here (e.g. NVML unavailable): shown, not asserted
            checks.append(Check(q, p, m, None, bands[q], ok=True, asserted=False))
            continue
        if p is None:
            checks.append(Check(q, p, m, None, bands[q], ok=False, asserted=True))
            continue
        err = (p - m) / m
        if ranged:
            lo, hi = ranged[q + "_bytes"]
            checks.append(Check(q, p, m, err, bands[q], ok=lo <= m <= hi, asserted=True, range=(lo, hi)))
            continue
        checks.append(Check(q, p, m, err, bands[q], ok=abs(err) <= bands[q], asserted=True))
    stage = {"predicted": prediction.get("peak_stage"), "measured": measurement.get("peak_stage")}
    # cudnn.benchmark: the convolution whose search takes the most free memory holds the peak,
    # which only the run decides (kernels.BENCHMARK_NOTE): the stage is shown, not asserted
    stage["ok"] = stage["predicted"] == stage["measured"] or bool(ranged)
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

