"""What the equation (and the simulation) report: bytes, the peak stage, and a breakdown."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StagePeak:
    """One stage's peak: allocated and reserved bytes, and the components alive at it."""

    allocated: int
    reserved: int
    components: dict[str, int] = field(default_factory=dict)  # sums to `allocated`
    operation: str = ""          # the operation at the stage's peak (equation: by derivation)


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
    # where the convolution workspaces came from: "measured" (a probe, this exact shape),
    # "rule <set>" (a rule fitted elsewhere), "measured+rule", "none" (the call has none)
    conv_workspace: str = "none"
    # [lo, hi] per quantity, lo == hi where every term is measured (equation._bounds)
    bounds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
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
