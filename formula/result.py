"""What the equation (and the simulation) report: bytes, the peak stage, and a breakdown."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class StagePeak:
    """One stage's peak: allocated and reserved bytes, and the components alive at it."""

    allocated: int
    reserved: int
    components: dict[str, int] = field(default_factory=dict)  # sums to `allocated`
    operation: str = ""          # the operation at the stage's peak (equation: by derivation)


@dataclass
class OOM:
    """Where a call runs out of memory: the allocation PyTorch fails on and its numbers."""

    stage: str
    operation: str
    requested_bytes: int         # "Tried to allocate": the segment the allocator asked for
    allocated_bytes: int         # allocated by PyTorch when it failed
    reserved_bytes: int          # reserved by PyTorch then (after releasing cached segments)
    message: str                 # PyTorch's message, as it would print it

    def to_dict(self) -> dict:
        return {"stage": self.stage, "operation": self.operation, "requested_bytes": self.requested_bytes,
                "allocated_bytes": self.allocated_bytes, "reserved_bytes": self.reserved_bytes,
                "message": self.message}


VERDICTS = ("fits", "fits-with-fallback", "oom")        # mildest first


@dataclass
class Boundary:
    """The call under a memory budget, as PyTorch's OOM path runs it (DERIVATION.md section 11)."""

    vram: int                    # the card's memory, bytes
    capacity: int                # what the caching allocator may reserve: vram less the CUDA context
    verdict: str                 # "fits", "fits-with-fallback" or "oom"
    limit: str = "card"          # "card" or "fraction" (set_per_process_memory_fraction): allocator.py
    retries: int = 0             # num_alloc_retries: cached segments released to make room
    fallbacks: list = field(default_factory=list)    # (stage, convolution) run without workspace
    oom: OOM | None = None
    peak_reserved: int | None = None                 # under the capacity, when it differs
    peak_device: int | None = None                   # what nvidia-smi would show at the peak, if it fits
    allocated_range: tuple[int, int] | None = None   # with fallbacks: [no workspace, full]

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "vram_bytes": self.vram, "capacity_bytes": self.capacity, "limit": self.limit,
                "peak_device_bytes": self.peak_device,
                "num_alloc_retries": self.retries,
                "fallbacks": [{"stage": st, "operation": op} for st, op in self.fallbacks],
                "oom": self.oom.to_dict() if self.oom else None,
                "peak_reserved_bytes": self.peak_reserved,
                "peak_allocated_range_bytes": list(self.allocated_range) if self.allocated_range else None}


@dataclass
class Estimate:
    height: int                  # after rounding down to a multiple of 8
    width: int
    prompt_tokens: int | None    # CLIP BPE tokens of the prompt (None when not given)
    truncated: bool              # prompt longer than 75 tokens: the pipeline cuts it
    peak_allocated: int          # torch.cuda.max_memory_allocated() over the call
    peak_reserved: int           # torch.cuda.max_memory_reserved() over the call
    peak_device: int             # what nvidia-smi / NVML shows the process using
    peak_stage: str
    stages: dict[str, StagePeak]
    breakdown: dict[str, int]    # components alive at the peak, plus reserve, context
    options: dict
    gpu_profile: str
    boundary: Boundary | None = None   # with a budget (estimate(..., vram=...))
    # where the convolution workspaces came from: "measured" (a probe, this exact shape),
    # "rule <set>" (a rule fitted elsewhere), "measured+rule", "none" (the call has none)
    conv_workspace: str = "none"
    # [lo, hi] per quantity, lo == hi where every term is measured (equation._bounds): computed
    # on first use, as the unmeasured ends cost two more replays of the call
    bounds_of: Callable[[], dict] | None = field(default=None, repr=False, compare=False)
    _bounds: dict | None = field(default=None, repr=False, compare=False)
    # why the peak depends on run-time state (cudnn.benchmark), "" where it does not
    runtime_note: str = ""
    # the settings in effect that are derived, not yet measured on a GPU (Options.derived_settings)
    derived_settings: tuple = ()

    @property
    def bounds(self) -> dict:
        if self._bounds is None:
            self._bounds = self.bounds_of() if self.bounds_of is not None else {}
        return self._bounds

    def to_dict(self) -> dict:
        out = {
            "height": self.height,
            "width": self.width,
            "prompt_tokens": self.prompt_tokens,
            "truncated": self.truncated,
            "peak_allocated_bytes": self.peak_allocated,
            "peak_reserved_bytes": self.peak_reserved,
            "peak_device_bytes": self.peak_device,
            "peak_stage": self.peak_stage,
            "breakdown": dict(self.breakdown),
            "stages": {
                name: {"allocated_bytes": s.allocated, "reserved_bytes": s.reserved,
                       "operation": s.operation, "components": dict(s.components)}
                for name, s in self.stages.items()
            },
            "options": dict(self.options),
            "gpu_profile": self.gpu_profile,
            "conv_workspace": self.conv_workspace,
            "bounds": {k: list(v) for k, v in self.bounds.items()},
        }
        if self.runtime_note:
            out["depends_on_runtime_state"] = self.runtime_note
        if self.derived_settings:
            out["derived_not_measured"] = list(self.derived_settings)
        if self.boundary is not None:
            out["verdict"] = self.boundary.verdict
            out["boundary"] = self.boundary.to_dict()
            out["oom"] = self.boundary.oom.to_dict() if self.boundary.oom else None
        return out
