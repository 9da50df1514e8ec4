"""Measurement backends: "cuda" (plugin/gpu.py, real GPU) and "fake" (CPU; tests and dry runs).

A backend (the Backend protocol below) measures one case at a time and returns a Measurement,
the dict archived as a case's "measurement" (results/README.md). The fake backend lets the plugin's own tests and `DRY=1
scripts/gpu_validate.sh` exercise everything but the GPU: its numbers come from a JSON spec
(--sd-fake-measurements) or from a crude size model that has nothing to do with the equation.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Literal, Protocol, TypedDict

from .archive import gpu_slug
from .checks import QUANTITIES
from .environment import env_vars, versions

GiB = 1 << 30


class StagePeak(TypedDict):
    allocated_bytes: int
    reserved_bytes: int


class Measurement(TypedDict, total=False):
    """One call as measured: the archive's "measurement" (results/README.md). A call that failed
    ("oom", "error") may lack the peaks; the fake backend leaves out what only a GPU knows."""

    status: Literal["ok", "oom", "error"]
    error: str | None
    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None
    peak_stage: str | None
    stages: dict[str, StagePeak]
    stage_order: list[str]
    stage_seconds: dict[str, float]
    peak_device_bytes: int | None
    peak_device_v1_bytes: int | None
    peak_device_v2_bytes: int | None
    peak_process_bytes: int | None
    nvml_samples: int
    resident_allocated_bytes: int
    resident_reserved_bytes: int
    capacity_bytes: int | None
    context_bytes_before: int | None
    sdpa: list[dict]
    num_alloc_retries: int
    num_ooms: int
    num_device_alloc: int
    num_device_free: int
    unet_evals: int
    allocated_after_bytes: int
    wall_s: float


class Backend(Protocol):
    """What the suite (session.py) and the device tasks need of a measurement backend."""

    name: str                  # "cuda" | "fake"
    wants_image: bool          # measure() needs the case's image (else only its size)
    gpu: dict                  # the archive's "gpu": name, slug, uuid, total_memory_bytes, ...
    environment: dict          # the archive's "environment" (environment.py's versions and env vars, ...)
    hardware: dict             # the archive's "hardware": per-process constants measured once
    warmup: list[dict]         # the archive's "warmup": the calls run before the first case

    def capacity(self) -> int | None:
        """Bytes the caching allocator could reserve now (free device memory + reserved)."""

    def limit(self, capacity: int | None) -> None:
        """Let the allocator reserve at most `capacity` bytes (None: the whole device)."""

    def measure(self, case, image=None, around_call=None, size=None) -> Measurement:
        """Run one case's call; around_call wraps the call itself, size is (height, width)."""

    def close(self) -> None:
        """Release the pipeline and the device memory."""


class FakeBackend:
    """Deterministic stand-in for a GPU (see module docstring)."""

    name = "fake"
    wants_image = False

    def __init__(self, spec_path: str | None = None):
        self.spec = {}
        if spec_path:
            self.spec = json.loads(Path(spec_path).read_text())
        g = self.spec.get("gpu", {})
        name = g.get("name", "FAKE GPU 80GB")
        total = g.get("total_memory_bytes", 80 * GiB)
        self.gpu = {"name": name, "slug": gpu_slug(name), "uuid": g.get("uuid", "GPU-00000000-fake"),
                    "total_memory_bytes": total, "compute_capability": g.get("compute_capability", "0.0")}
        self._capacity = self._full_capacity = self.spec.get("capacity_bytes", total - 2 * GiB)
        self.environment = {"backend": "fake", **versions(), "env": env_vars(),
                            "driver": None, "cuda": None, "cudnn": None, "gpu": dict(self.gpu)}
        self.hardware = self.spec.get("hardware", {
            "nvml_baseline_used_v1_bytes": 500 << 20, "nvml_baseline_used_v2_bytes": 300 << 20,
            "cuda_context_bytes": 480 << 20, "context_and_handles_bytes": 530 << 20,
            "cublas_workspace_allocated_bytes": 32 << 20, "cublas_workspace_reserved_bytes": 34 << 20,
            "cublaslt_extra_allocated_bytes": 0, "weights_allocated_bytes": 2_200_000_000,
            "context_after_warmup_bytes": 610 << 20,
        })
        self.warmup: list[dict] = []     # nothing to warm up
        self.calls: list[str] = []       # case ids measured, in order (tests read it)
        self.recoveries = 0

    def capacity(self) -> int | None:
        return self._capacity

    def limit(self, capacity: int | None) -> None:
        """What set_per_process_memory_fraction does on a GPU: at most `capacity` bytes reserved."""
        self._capacity = self._full_capacity if capacity is None else min(capacity, self._full_capacity)

    def _model(self, case, height, width) -> dict:
        """A crude size model: weights, plus per-pixel VAE and UNet costs, plus math attention's N^2."""
        o = case.opts
        px = (height - height % 8) * (width - width % 8)
        tokens = px // 64
        weights = 2_200_000_000 - (0 if o.safety_checker else 608_000_000)
        unet = o.unet_batch * tokens * 40_000 + 180_000_000
        if o.attention == "math":
            unet += o.unet_batch * 8 * tokens * tokens * 2 * 2
        vae_decode = 0 if not o.decodes else px * o.num_images_per_prompt * (700 if o.vae_tiling else 1400)
        stages = {"setup": weights + 10_000_000, "text_encoder": weights + 60_000_000,
                  "vae_encode": weights + px * 900, "unet": weights + unet}
        if o.decodes:
            stages["vae_decode"] = weights + vae_decode
            if o.safety_checker:
                stages["safety_checker"] = weights + 120_000_000 + px * 6
        return stages

    def measure(self, case, image=None, around_call=None, size=None) -> Measurement:
        t0 = time.perf_counter()
        self.calls.append(case.id)
        height, width = size or (case.height, case.width)
        spec = dict(self.spec.get("cases", {}).get(case.id, {}))
        stages = {k: {"allocated_bytes": v, "reserved_bytes": int(v * 1.04) // (2 << 20) * (2 << 20) + (2 << 20)}
                  for k, v in self._model(case, height, width).items()}
        with around_call() if around_call else contextlib.nullcontext():
            pass
        m: Measurement = {"status": "ok", "error": None, "stages": stages, "stage_order": list(stages),
             "resident_allocated_bytes": stages["setup"]["allocated_bytes"] - 10_000_000,
             "resident_reserved_bytes": stages["setup"]["reserved_bytes"] - 10_000_000,
             "capacity_bytes": self._capacity, "context_bytes_before": 600 << 20,
             "sdpa": [{"stage": "unet", "query": [2, 8, 64, 40], "key": [2, 8, 64, 40], "dtype": "torch.float16",
                       "mask": None, "backend": "MATH" if case.opts.attention == "math" else "CUDNN_ATTENTION",
                       "calls": 16 * case.unet_evals}],
             "num_alloc_retries": 0, "num_ooms": 0, "unet_evals": case.unet_evals,
             "nvml_samples": 0, "peak_process_bytes": None}
        peak = max(stages, key=lambda s: stages[s]["allocated_bytes"])
        m["peak_stage"] = peak
        m["peak_allocated_bytes"] = stages[peak]["allocated_bytes"]
        m["peak_reserved_bytes"] = max(s["reserved_bytes"] for s in stages.values())
        m["peak_device_bytes"] = m["peak_reserved_bytes"] + (610 << 20)
        m["peak_device_v1_bytes"] = m["peak_device_bytes"]
        m["peak_device_v2_bytes"] = m["peak_device_bytes"]
        m["wall_s"] = round(time.perf_counter() - t0, 4)
        m.update({k: v for k, v in spec.items() if k != "oom"})   # a spec may set wall_s, stage_seconds
        if spec.get("oom") or (not spec and m["peak_reserved_bytes"] > self._capacity):
            m.update(status="oom", error="CUDA out of memory (fake backend)", num_ooms=1,
                     peak_stage=m.get("peak_stage"))
            for q in QUANTITIES:
                m.setdefault(q + "_bytes", None)
            self.recoveries += 1
        return m

    def close(self):
        pass


def make_backend(name: str, **kwargs) -> Backend:
    if name == "fake":
        return FakeBackend(kwargs.get("fake_spec"))
    if name == "cuda":
        from . import gpu

        return gpu.CudaBackend(monitor=kwargs.get("monitor"), model=kwargs.get("model"))
    raise ValueError(f"unknown backend {name!r} (cuda, fake)")
