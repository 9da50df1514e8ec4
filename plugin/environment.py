"""The process's environment: what a measurement's archive records of the software around it (the
package versions, the environment variables that change the allocator, cuBLAS, cuDNN or the device
order), and the GPU an xdist worker is pinned to.

One home for these facts, shared by the backends (backends.py, gpu.py), the suite (pytest_plugin.py)
and the device tasks (conv_probe.py: cuda_environment, fake_environment). torch only inside
cuda_environment.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

from .archive import gpu_slug

DISTRIBUTIONS = ("torch", "diffusers", "transformers", "accelerate", "nvidia-ml-py", "sd-vram")

ENV_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "CUDA_MODULE_LOADING", "CUBLAS_WORKSPACE_CONFIG",
            "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT",
            "CUBLASLT_WORKSPACE_SIZE", "TORCH_CUBLASLT_UNIFIED_WORKSPACE", "TORCH_CUDNN_SDPA_DEPRIORITIZED",
            "PYTEST_XDIST_WORKER")


def versions() -> dict:
    """{"python": ..., distribution: version or None} for DISTRIBUTIONS."""
    out = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    if out["sd-vram"] is None:     # run from a checkout without install (scripts/gpu_validate.sh)
        from sd_vram import __version__

        out["sd-vram"] = __version__
    return out


def env_vars() -> dict:
    """{name: value or None} for ENV_VARS."""
    return {k: os.environ.get(k) for k in ENV_VARS}


def cuda_environment() -> dict:
    """The conv probe's record of the CUDA stack and device (results/README.md, conv_probe)."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    env = {"backend": "cuda", **versions(), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "cudnn_enabled": torch.backends.cudnn.enabled, "cudnn_benchmark": torch.backends.cudnn.benchmark,
           "cudnn_deterministic": torch.backends.cudnn.deterministic,
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "env": env_vars(),
           "gpu": {"name": props.name, "slug": gpu_slug(props.name), "compute_capability": f"{props.major}.{props.minor}",
                   "total_memory_bytes": props.total_memory, "multi_processor_count": props.multi_processor_count}}
    try:                                     # the driver version is NVML's; optional here
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        env["driver"] = v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        env["driver"] = None
    return env


def fake_environment() -> dict:
    """cuda_environment's stand-in for the CPU rehearsal."""
    name = "FAKE GPU 80GB"
    return {"backend": "fake", **versions(), "cuda": None, "cudnn": None, "driver": None, "env": env_vars(),
            "gpu": {"name": name, "slug": gpu_slug(name), "compute_capability": "0.0", "total_memory_bytes": 80 << 30,
                    "multi_processor_count": 0}}


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries if it is set (set and empty:
    none, as CUDA reads it), otherwise NVML's device UUIDs (CUDA's device order need not be
    NVML's); [] where neither answers."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    try:
        import pynvml

        pynvml.nvmlInit()
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            u = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
            devices.append(u.decode() if isinstance(u, bytes) else u)
        return devices
    except Exception:
        return []


def pin_xdist_worker() -> str | None:
    """Under pytest-xdist, pin worker gwN to GPU N (mod the GPU count) before CUDA starts in it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or os.environ.get("SD_VRAM_PINNED_GPU"):
        return os.environ.get("SD_VRAM_PINNED_GPU")
    try:
        idx = int(worker.lstrip("gw"))
    except ValueError:
        return None
    devices = visible_gpus()
    if not devices:
        return None
    dev = devices[idx % len(devices)]
    os.environ["CUDA_VISIBLE_DEVICES"] = dev
    os.environ["SD_VRAM_PINNED_GPU"] = dev
    return dev

