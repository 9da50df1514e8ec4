"""GPU profiles: the facts only hardware gives, measured on real GPUs and archived.

A profile holds what changes memory on a given GPU + software stack:
- compute capability and library versions, which decide PyTorch's SDPA backend ("auto");
- the cuBLAS workspace allocated through the caching allocator at the first matmul;
- the CUDA context and library handles that nvidia-smi shows beside the allocator's memory;
- conv_workspace_rule: how big cuDNN's convolution workspace is (allocated through the
  caching allocator inside each convolution), measured with
  torch.cuda.memory._record_memory_history (results/<gpu>/*memhistory*); see
  activations.conv_workspace.
Profiles live in formula/profiles/*.json; each names the archive it was measured from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from .options import InputError

MiB = 1 << 20


@dataclass(frozen=True)
class GPUProfile:
    name: str
    gpu: str                                   # as torch.cuda.get_device_name() reports it
    compute_capability: tuple[int, int]
    torch_version: tuple[int, int]
    cudnn_version: int                         # torch.backends.cudnn.version()
    cuda_version: tuple[int, int]
    cublas_workspace: int                      # bytes, through the caching allocator
    cuda_context: int                          # bytes NVML shows beyond torch's reserved memory
    total_memory: int
    multiprocessor_count: int = 132
    cublaslt_workspace: int = 0                # cuBLASLt's own workspace, also kept from the first matmul
    conv_workspace_rule: str = "nchw_transpose"  # activations.conv_workspace
    # Per-convolution rules for the simulation, first match wins: {"module": regex on the
    # module path, "kernel": 3 or [kh, kw] (optional), "formula": expression in input, output,
    # weight (bytes)}. Empty: the simulation expands conv_workspace_rule (simulation/profile.py).
    conv_workspace_rules: tuple = ()
    measured: dict = field(default_factory=dict)         # where the numbers come from

    @property
    def sdpa_order(self) -> tuple[str, ...]:
        """sdp_utils.cpp priority_order: cuDNN first on sm90/sm100 with cuDNN > 9.15.0
        (CUDA < 13 builds: minor 0 or 3 only); flash, efficient, math, cudnn otherwise."""
        major, minor = self.compute_capability
        prefer_cudnn = (self.cudnn_version > 91500 and major in (9, 10)
                        and (self.cuda_version >= (13, 0) or minor in (0, 3)))
        return ("cudnn", "flash", "efficient", "math") if prefer_cudnn else ("flash", "efficient", "math", "cudnn")

    def sdpa_backend(self, requested: str, head_dim: int) -> str:
        """The kernel PyTorch runs for fp16 attention without a mask at this head dim."""
        if requested != "auto":
            return requested
        sm = self.compute_capability
        for backend in self.sdpa_order:
            if backend == "cudnn" and (8, 0) <= sm and head_dim <= (256 if sm[0] in (9, 10) else 128) and head_dim % 8 == 0:
                return backend
            if backend == "flash" and (8, 0) <= sm and head_dim <= 256:
                return backend
            if backend == "efficient" and (5, 0) <= sm and head_dim % 8 == 0:
                return backend
            if backend == "math":
                return backend
        return "math"


def _from_json(data: dict) -> GPUProfile:
    return GPUProfile(
        name=data["name"], gpu=data["gpu"],
        compute_capability=tuple(data["compute_capability"]),
        torch_version=tuple(data["torch_version"]), cudnn_version=int(data["cudnn_version"]),
        cuda_version=tuple(data["cuda_version"]), cublas_workspace=int(data["cublas_workspace"]),
        cuda_context=int(data["cuda_context"]), total_memory=int(data["total_memory"]),
        multiprocessor_count=int(data.get("multiprocessor_count", 132)),
        cublaslt_workspace=int(data.get("cublaslt_workspace", 0)),
        conv_workspace_rule=data.get("conv_workspace_rule", "nchw_transpose"),
        conv_workspace_rules=tuple(dict(r) for r in data.get("conv_workspace_rules", ())),
        measured=dict(data.get("measured", {})),
    )


@lru_cache(maxsize=None)
def profiles() -> dict[str, GPUProfile]:
    out = {}
    folder = resources.files(__package__).joinpath("profiles")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            p = _from_json(json.loads(entry.read_text()))
            out[p.name] = p
    return out


def get(name: str) -> GPUProfile:
    known = profiles()
    if name not in known:
        raise InputError(f"unknown GPU profile {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def for_device(device_name: str) -> str:
    """The profile measured on a GPU of this name, else "default"."""
    for p in profiles().values():
        if p.name != "default" and p.gpu == device_name:
            return p.name
    return "default"
