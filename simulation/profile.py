"""The simulation's GPU profile argument: ``simulate(..., profile=...)`` and ``gpu=...``.

The profiles themselves are the equation's (sd_vram.formula.gpu_profiles.GPUProfile,
formula/profiles/*.json, probed profiles), so that ``simulate(..., gpu="h200")`` and
``estimate(..., gpu="h200")`` read the same numbers, and so are the kernel facts read
from them (sd_vram.formula.kernels). This module remains because the simulation resolves
its argument more leniently than gpu_profiles.get does: None is the default profile and a
name may be in any case. It imports no torch, so that ``import sd_vram.simulation`` stays
light, and DEFAULT_PROFILE is read on first use.

What the simulation takes from a profile: the SDPA backend choice (sdpa.py), the SM count
(flash attention's split-KV heuristic), the cuBLAS and cuBLASLt workspaces (resident.py),
the cuDNN convolution workspaces (profile.conv_workspace(), kernel_hooks.py), the total
memory (the address space of an expandable segment).
"""

from __future__ import annotations

from functools import lru_cache

from sd_vram.formula import gpu_profiles
from sd_vram.formula.gpu_profiles import GPUProfile
from sd_vram.formula.options import InputError


@lru_cache(maxsize=None)
def _named(name: str) -> GPUProfile:
    return gpu_profiles.get(name)


def get_profile(gpu) -> GPUProfile:
    """A GPUProfile from a profile name or path ("default", "h200", ...), a GPUProfile
    (returned as is) or None (the default)."""
    if isinstance(gpu, GPUProfile):
        return gpu
    if gpu is None:
        return _named("default")
    if isinstance(gpu, str):
        return gpu_profiles.get(gpu if gpu.endswith(".json") or "/" in gpu else gpu.lower())
    raise InputError(f"a GPU profile is a name or a profile object, got {gpu!r}")


def __getattr__(name):
    if name == "DEFAULT_PROFILE":
        return _named("default")
    raise AttributeError(name)
