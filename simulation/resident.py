"""The device state the GPU suite measures a call from, rebuilt on the simulated device.

The pipeline is built once on the meta device (sd_vram.models.build_pipeline, meta_pipeline)
and, for each simulation, resident_setup replays what the suite's process did before the
call: its hardware probes, which leave cuBLAS's and cuBLASLt's workspaces allocated, then
the parameters and buffers as tensors on the simulated device (same shapes and dtypes) in
the order ``build_pipeline("cuda")`` allocates them: safety_checker, text_encoder, unet,
vae, each depth-first with children before a module's own parameters and buffers
(nn.Module._apply), then the suite's earlier model moves (its history). This reproduces the
measured resident memory exactly (results/H200/20261126T052554Z_nogit.json: 2,765,889,536 B
of weights, 2,800,492,544 B with the workspaces; 2,740,518,912 B of weights with expandable
segments).

Imports torch and the recorder (recorder.py); the caller chooses the device and the mode.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from sd_vram.formula.gpu_profiles import GPUProfile

from .recorder import MemoryRecorder


def config_json(architecture: dict | None) -> str | None:
    """The hashable form meta_pipeline takes a config in (None: the bundled sd15.json)."""
    return None if architecture is None else json.dumps(architecture, sort_keys=True)


@lru_cache(maxsize=4)
def meta_pipeline(safety_checker: bool = True, dtype: str = "fp16", config: str | None = None,
                  channels_last: bool = False):
    """The pipeline on the meta device in the case's dtype (Options.dtype) and memory format
    (Options.channels_last), from `config` (config_json of a config of sd15.json's layout; None:
    the bundled one), built once per process and arguments: diffusers' init is slow."""
    from sd_vram.models import build_pipeline, torch_dtype

    pipe = build_pipeline("meta", dtype=torch_dtype(dtype), safety_checker=safety_checker,
                          config=None if config is None else json.loads(config), channels_last=channels_last)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def module_order(pipe):
    """Modules in the order their weights reach the GPU: sd_vram.models.build_pipeline and
    DiffusionPipeline.to() both go by sorted component name (safety_checker, text_encoder,
    unet, vae)."""
    names = ("safety_checker", "text_encoder", "unet", "vae")
    return [(n, getattr(pipe, n)) for n in names if isinstance(getattr(pipe, n, None), torch.nn.Module)]


def _apply_order(module: torch.nn.Module, prefix: str = ""):
    """(module, kind, name, qualified) in nn.Module._apply order: children, params, buffers."""
    for cname, child in module._modules.items():
        if child is not None:
            yield from _apply_order(child, f"{prefix}{cname}.")
    for pname, p in module._parameters.items():
        if p is not None:
            yield module, "param", pname, prefix + pname
    for bname, b in module._buffers.items():
        if b is not None:
            yield module, "buffer", bname, prefix + bname


class WeightSwap:
    """Replace parameters/buffers by tensors on the simulated device; restore afterwards."""

    def __init__(self):
        self.saved = []

    def put(self, module, kind, name, new):
        store = module._parameters if kind == "param" else module._buffers
        self.saved.append((store, name, store[name]))
        if kind == "param":
            store[name] = torch.nn.Parameter(new, requires_grad=False)
        else:
            store[name] = new
        return store[name]

    def restore(self):
        for store, name, old in reversed(self.saved):
            store[name] = old
        self.saved.clear()


def load_weights(pipe, recorder: MemoryRecorder, device: str, swap: WeightSwap,
                 make=None, modules=None):
    """Allocate every parameter and buffer on `device` as sd_vram.models.build_pipeline does.

    Per model, in module_order: ``to_empty`` allocates each tensor in nn.Module._apply order
    (in the pipeline's dtype directly: the models were cast on the meta device), then ``_randomize`` copies
    ``torch.arange(n)`` into the int64 position_ids, a temporary of n x 8 bytes allocated and
    freed on the device. ``from_pretrained(torch_dtype=fp16).to("cuda")`` allocates the same
    tensors in the same order, without the temporaries.
    modules: names to load (default: all of module_order).
    """
    make = make or (lambda like, dtype: torch.empty_strided(like.shape, like.stride(), dtype=dtype, device=device))
    recorder.set_stage("weights")
    for mname, mod in module_order(pipe):
        if modules is not None and mname not in modules:
            continue
        temps = []
        for owner, kind, name, qual in _apply_order(mod):
            old = (owner._parameters if kind == "param" else owner._buffers)[name]
            new = swap.put(owner, kind, name, make(old, old.dtype))
            recorder.track(new, op=f"weights:{mname}.{qual}")
            if name.endswith("position_ids"):
                temps.append((qual, old.shape[-1] * old.element_size()))
            del new
        if recorder.device_type == "cuda":
            for qual, nbytes in temps:
                key = recorder.synthetic_alloc(nbytes, f"weights:{mname}.{qual}:arange", (nbytes // 8,), "int64")
                recorder.synthetic_free(key)


def unload_weights(pipe, recorder: MemoryRecorder, swap: WeightSwap, name: str):
    """``module.to("cpu")``: each device tensor is freed as _apply replaces it, in _apply order."""
    mod = getattr(pipe, name)
    recorder.set_stage("weights")
    for owner, kind, pname, _ in _apply_order(mod):
        store = owner._parameters if kind == "param" else owner._buffers
        for i in range(len(swap.saved) - 1, -1, -1):
            st, n, orig = swap.saved[i]
            if st is store and n == pname:
                store[pname] = orig          # the meta original: the device tensor dies here
                del swap.saved[i]
                break


# plugin/gpu.py CudaBackend._init_cuda, before the pipeline exists: torch.zeros(1); a, w
# (256 x 256 fp16), a @ a (output, then cuBLAS's workspace); F.linear(a, w, bias) (output,
# then cuBLASLt's workspace); a 3x3 conv of (1, 8, 32, 32) (cuDNN keeps nothing: archive
# hardware.cudnn_conv_kept_allocated_bytes = 0). All but the workspaces are freed, then
# empty_cache(). Listed as (name, bytes, kept).
def _probe_events(profile) -> list[tuple[str, int, bool]]:
    mat = 256 * 256 * 2
    return [("probe:zeros", 4, False), ("probe:a", mat, False), ("probe:a@a", mat, False),
            ("cublas_workspace", profile.cublas_workspace_bytes, True),
            ("probe:w", mat, False), ("probe:bias", 256 * 2, False), ("probe:linear", mat, False),
            ("cublaslt_workspace", profile.cublaslt_workspace_bytes, True),
            ("probe:conv_in", 8 * 32 * 32 * 2, False), ("probe:conv_w", 8 * 8 * 9 * 2, False),
            ("probe:conv_out", 8 * 32 * 32 * 2, False)]


def resident_setup(pipe, recorder: MemoryRecorder, swap: WeightSwap, profile: GPUProfile,
                   history=(), make=None):
    """The device state the GPU suite measures a call from (plugin/gpu.py CudaBackend):
    the hardware probes (cuBLAS and cuBLASLt workspaces kept), the weights as build_pipeline
    allocates them, then the suite's earlier model moves: `history` lists "-<model>"
    (``model.to("cpu")`` for a case without it, then empty_cache) and "+<model>" (moved back
    for a later case). Returns the names of the models on the device.
    The archive shows what this reproduces (results/H200/20261126T052554Z_nogit.json,
    hardware): weights 2,765,889,536 B allocated, 2,800,492,544 B with the workspaces.
    """
    recorder.set_stage("probes")
    keys = []
    for name, nbytes, kept in _probe_events(profile):
        if nbytes:
            key = recorder.synthetic_alloc(nbytes, name, (nbytes,), "uint8")
            if not kept:
                keys.append(key)
    for key in keys:
        recorder.synthetic_free(key)
    recorder.empty_cache("probes")
    load_weights(pipe, recorder, "cuda", swap, make=make)
    loaded = [n for n, _ in module_order(pipe)]
    for step in history:
        sign, name = step[0], step[1:]
        if sign == "-" and name in loaded:
            unload_weights(pipe, recorder, swap, name)
            loaded.remove(name)
        elif sign == "+" and name not in loaded:
            load_weights(pipe, recorder, "cuda", swap, make=make, modules=(name,))
            loaded.append(name)
        else:
            raise ValueError(f"bad history step {step!r} (loaded: {loaded})")
        recorder.empty_cache(step)
    return loaded
