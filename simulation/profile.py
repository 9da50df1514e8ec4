"""The GPU and software stack the simulation pretends to run on.

Only the facts that change which kernels run (and so which tensors exist) are modelled:
the compute capability and library versions drive PyTorch's SDPA backend choice
(aten/src/ATen/native/transformers/cuda/sdp_utils.cpp), the SM count drives flash
attention's split-KV heuristic, and the cuBLAS workspace is allocated through the caching
allocator at the first matrix multiply.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

MiB = 1 << 20
GiB = 1 << 30


def _torch_version() -> tuple[int, int]:
    try:
        import torch

        m = re.match(r"(\d+)\.(\d+)", torch.__version__)
        return (int(m.group(1)), int(m.group(2))) if m else (2, 13)
    except ImportError:  # pragma: no cover - the simulation needs torch anyway
        return (2, 13)


@dataclass(frozen=True)
class GPUProfile:
    name: str = "H100 (sm90)"
    compute_capability: tuple[int, int] = (9, 0)
    torch_version: tuple[int, int] = field(default_factory=_torch_version)
    # cuDNN runtime version as torch reports it (torch.backends.cudnn.version(), e.g. 91002).
    cudnn_version: int | None = 91900
    cuda_version: tuple[int, int] = (12, 8)
    # cudnn-frontend >= 1.24 compiled in: head dim up to 256 on sm90/sm10x (sdp_utils.cpp).
    cudnn_frontend_d256: bool = True
    total_memory: int = 80 * GiB          # sizes the expandable segment's address space only
    multiprocessor_count: int = 132
    # None: the default of the torch build for this GPU (see cublas_workspace_bytes).
    cublas_workspace: int | None = None
    # TORCH_CUDNN_SDPA_DEPRIORITIZED=1 turns the cuDNN-first order off.
    cudnn_sdpa_deprioritized: bool = False

    def with_(self, **changes) -> "GPUProfile":
        return replace(self, **changes)

    @property
    def cublas_workspace_bytes(self) -> int:
        """cuBLAS(Lt) workspace per handle/stream, allocated once via the caching allocator.

        aten/src/ATen/cuda/CublasHandlePool.cpp: CUBLAS_WORKSPACE_CONFIG=":SIZE_KiB:COUNT..."
        sums SIZE*COUNT; without it the default is 32 MiB on sm90+ (Hopper's larger
        workspace) and 4096 KiB x 2 + 16 KiB x 8 before that.
        """
        if self.cublas_workspace is not None:
            return self.cublas_workspace
        env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        if env:
            total = 0
            for size, count in re.findall(r":(\d+):(\d+)", env):
                total += int(size) * 1024 * int(count)
            if total:
                return total
        if self.compute_capability[0] >= 9:
            return 32 * MiB
        return 4096 * 1024 * 2 + 16 * 1024 * 8


DEFAULT_PROFILE = GPUProfile()

# Named profiles for options.gpu; the lead's formula/profiles may add more later.
PROFILES = {
    "default": DEFAULT_PROFILE,
    "h100": DEFAULT_PROFILE,
    "h200": DEFAULT_PROFILE.with_(name="H200 (sm90)", total_memory=141 * GiB),
    "a100": GPUProfile(name="A100 (sm80)", compute_capability=(8, 0), total_memory=80 * GiB,
                       multiprocessor_count=108),
    "l4": GPUProfile(name="L4 (sm89)", compute_capability=(8, 9), total_memory=24 * GiB,
                     multiprocessor_count=58),
    "t4": GPUProfile(name="T4 (sm75)", compute_capability=(7, 5), total_memory=16 * GiB,
                     multiprocessor_count=40),
}


def get_profile(gpu: "str | GPUProfile | None") -> GPUProfile:
    if isinstance(gpu, GPUProfile):
        return gpu
    if gpu is None:
        return DEFAULT_PROFILE
    key = str(gpu).lower()
    if key in PROFILES:
        return PROFILES[key]
    from sd_vram.formula.options import InputError

    raise InputError(f"unknown GPU profile {gpu!r}; known: {', '.join(sorted(PROFILES))}")
