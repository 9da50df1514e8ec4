"""Run the real diffusers StableDiffusionImg2ImgPipeline.__call__ on fake CUDA fp16 tensors.

The pipeline is built once on the meta device (sd_vram.models.build_pipeline) and, for each
simulation, the device state the GPU suite measures from is rebuilt (resident_setup): the
suite's hardware probes, which leave cuBLAS's and cuBLASLt's workspaces allocated, then
the parameters and buffers as fake tensors on the simulated device (same shapes and
dtypes) in the order ``build_pipeline("cuda")`` allocates them: safety_checker,
text_encoder, unet, vae, each depth-first with children before a module's own parameters
and buffers (nn.Module._apply). This reproduces the measured resident memory exactly
(results/H200/20261126T052554Z_nogit.json: 2,765,889,536 B of weights, 2,800,492,544 B
with the workspaces; 2,740,518,912 B of weights with expandable segments). The call then
runs under FakeTensorMode with a MemoryRecorder on top.

Substitutions (each keeps the device-side operations of the real call):

1. Input image: ``image_processor.preprocess`` returns what the PIL path builds on the CPU,
   a float32 (1, 3, H, W) tensor with the channels-last strides of
   ``torch.from_numpy(np.stack(...).transpose(0, 3, 1, 2))`` followed by the real
   ``normalize`` (2x - 1), with H and W rounded down to multiples of 8
   (get_default_height_width). It is a fake CPU tensor, so no pixel data exists; the
   ``.to(cuda, fp16)`` in prepare_latents and everything after it run unchanged.
2. ``Tensor.to`` / ``Tensor.cuda`` towards CUDA: a CPU-only torch refuses to parse a CUDA
   device before dispatch, so these calls go straight to ``aten._to_copy`` (what
   ``aten::to`` calls after its no-copy checks, which are kept).
3. ``Tensor.numpy()`` on a fake tensor returns zeros of the right shape and dtype (a
   read-only broadcast view, no memory), or the real value where the recorder knows it.
   The postprocess before the safety checker (denormalize on the GPU, ``.cpu()``,
   ``.permute``, ``.float()``) runs as in the real call; only the host array is blank.
4. ``image_processor.numpy_to_pil`` returns 1x1 placeholder images, and the feature
   extractor returns a zero float32 CPU ``pixel_values`` of the shape CLIPImageProcessor
   produces (1, 3, 224, 224); both are host-only work. ``.to(device)`` and ``.to(fp16)``
   of pixel_values run unchanged.
5. The safety checker: its ``.cpu().float().numpy()`` scores come back as zeros (3.) and
   ``concept_embeds_weights`` / ``special_care_embeds_weights`` have shadow values of 1.0, so
   ``.item()`` works and no image is flagged: the no-NSFW branch the real-GPU harness also
   takes (it sets the concept thresholds so that random weights never flag).
6. F.scaled_dot_product_attention picks the backend the GPU would (sdpa.py).
7. Scalar reads (``.item()``, ``bool()``) of small tensors use values computed on the CPU
   alongside (recorder.py shadows), e.g. the PNDM scheduler's ``prev_timestep >= 0``.
8. Denoising steps: after the UNet evaluation where PNDM's ets list reaches its steady
   size (``steps="auto"``: 6 evaluations), the remaining steps are skipped through the
   pipeline's own ``interrupt`` flag. Every later step allocates the same tensors and the
   ets list keeps 4 noise predictions, so the peak is the same (tests prove it).
9. A fresh PNDMScheduler per call: ``add_noise`` moves alphas_cumprod to the device and keeps
   it there, so this models the first call of a process (the suite's scheduler keeps it
   and the last timesteps between calls: 4,608 B more resident there).

Kernel-internal allocations the meta kernels do not show are added as synthetic events:
cuDNN convolution workspaces (the profile's conv rules, _conv_workspace_hook), the
contiguous staging tensor of a CPU -> CUDA copy that converts into a non-contiguous
destination (h2d_temporary_bytes), SDPA's (sdpa.py) and layer_norm's input copy.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from functools import lru_cache

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .profile import GPUProfile, get_profile
from .recorder import MemoryRecorder
from .sdpa import SDPAPatcher, patched_sdpa

STEADY_STATE_EVALS = 6     # PNDM (skip_prk_steps): ets reaches 4 entries at evaluation 6
@lru_cache(maxsize=2)
def meta_pipeline(safety_checker: bool = True):
    """The pipeline on the meta device (built once per process: diffusers' init is slow)."""
    from sd_vram.models import build_pipeline

    pipe = build_pipeline("meta", safety_checker=safety_checker)
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


class _WeightSwap:
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


def load_weights(pipe, recorder: MemoryRecorder, device: str, swap: _WeightSwap,
                 make=None, modules=None):
    """Allocate every parameter and buffer on `device` as sd_vram.models.build_pipeline does.

    Per model, in module_order: ``to_empty`` allocates each tensor in nn.Module._apply order
    (fp16 directly: the models were cast on the meta device), then ``_randomize`` copies
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


def unload_weights(pipe, recorder: MemoryRecorder, swap: _WeightSwap, name: str):
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


def resident_setup(pipe, recorder: MemoryRecorder, swap: _WeightSwap, profile: GPUProfile,
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


@contextlib.contextmanager
def _patch_attr(obj, name, value, use_dict=False):
    if use_dict:
        had = name in obj.__dict__
        old = obj.__dict__.get(name)
        obj.__dict__[name] = value
        try:
            yield
        finally:
            if had:
                obj.__dict__[name] = old
            else:
                del obj.__dict__[name]
        return
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class _FeatureExtractorStub:
    """CLIPImageProcessor's output shape without touching pixels (host-only work)."""

    def __init__(self, real):
        crop = getattr(real, "crop_size", None)
        h = getattr(crop, "height", None) if not isinstance(crop, dict) else crop.get("height")
        w = getattr(crop, "width", None) if not isinstance(crop, dict) else crop.get("width")
        if h is None and isinstance(crop, int):
            h = w = crop
        self.hw = (int(h or 224), int(w or 224))

    def __call__(self, images, return_tensors="pt", **kwargs):
        from transformers import BatchFeature

        n = len(images) if isinstance(images, (list, tuple)) else 1
        with torch.utils._python_dispatch._disable_current_modes():
            pixel_values = torch.zeros(n, 3, *self.hw, dtype=torch.float32)
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=None)


def _make_preprocess(height: int, width: int):
    def preprocess(image, *args, **kwargs):
        # PIL path: np.stack of (H, W, 3) float32 arrays, transposed to NCHW by from_numpy
        hwc = torch.empty(1, height, width, 3, dtype=torch.float32, device="cpu")
        return 2.0 * hwc.permute(0, 3, 1, 2) - 1.0
    return preprocess


class _HeldArray(np.ndarray):
    """A blank array that, like Tensor.numpy() on the CPU, keeps its tensor alive."""


def _patched_tensor_methods(recorder: MemoryRecorder | None, fake: bool, device_type: str):
    """Tensor.to / .cuda towards the simulated device and Tensor.numpy for fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensor

    stack = contextlib.ExitStack()
    orig_numpy = torch.Tensor.numpy

    def numpy(self, *args, **kwargs):
        if isinstance(self, FakeTensor):
            s = recorder.shadow(self) if recorder is not None else None
            if s is not None:
                from torch.utils._mode_utils import no_dispatch

                with no_dispatch():
                    return s.detach().numpy().copy()
            np_dtype = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
                        torch.bfloat16: np.float32, torch.int64: np.int64, torch.int32: np.int32,
                        torch.uint8: np.uint8, torch.bool: np.bool_}.get(self.dtype, np.float32)
            arr = np.broadcast_to(np.zeros((), dtype=np_dtype), tuple(self.shape))
            if self.device.type == "cpu":
                # a real CPU tensor's .numpy() shares its memory: the array keeps it alive
                arr = arr.view(_HeldArray)
                arr._held = self
            return arr
        return orig_numpy(self, *args, **kwargs)

    stack.enter_context(_patch_attr(torch.Tensor, "numpy", numpy))

    if fake and device_type == "cuda" and not torch.cuda.is_available():
        orig_to = torch.Tensor.to

        def to(self, *args, **kwargs):
            copy = kwargs.pop("copy", False)
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
            if device is None or device.type != "cuda":
                return orig_to(self, *args, copy=copy, **kwargs)
            # aten::to: no copy when nothing changes
            if (not copy and self.device.type == "cuda" and (dtype is None or dtype == self.dtype)
                    and memory_format in (None, torch.preserve_format)):
                return self
            return torch.ops.aten._to_copy(self, dtype=dtype or self.dtype, device=device,
                                           non_blocking=non_blocking,
                                           memory_format=memory_format or torch.preserve_format)

        def cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
            return to(self, "cuda", non_blocking=non_blocking, memory_format=memory_format)

        stack.enter_context(_patch_attr(torch.Tensor, "to", to))
        stack.enter_context(_patch_attr(torch.Tensor, "cuda", cuda))

        # Python indexing takes a CUDA DeviceGuard before dispatch, which a CPU-only torch
        # cannot build (torch._C._ensureCUDADeviceGuardSet only helps CUDA builds without a
        # device). The fake tensors involved pretend to be on "meta" (a no-op guard) for the
        # duration of the call; the ops and their fake outputs are the same, and the
        # recorder counts "meta" outputs as device allocations meanwhile.
        meta = torch.device("meta")

        def _swap(objs):
            saved = []
            for a in objs:
                if isinstance(a, FakeTensor) and a.fake_device.type == "cuda":
                    saved.append((a, a.fake_device))
                    a.fake_device = meta
            return saved

        def _flat(x):
            out = []
            for a in (x if isinstance(x, (tuple, list)) else (x,)):
                if isinstance(a, (tuple, list)):
                    out.extend(_flat(a))
                else:
                    out.append(a)
            return out

        def guard_free(orig):
            def method(self, *args, **kwargs):
                saved = _swap([self] + _flat(list(args)) + list(kwargs.values()))
                if not saved:
                    return orig(self, *args, **kwargs)
                try:
                    out = orig(self, *args, **kwargs)
                finally:
                    for a, d in saved:
                        a.fake_device = d
                for o in _flat(out):
                    if isinstance(o, FakeTensor) and o.fake_device.type == "meta":
                        o.fake_device = saved[0][1]
                return out
            return method

        for name in ("__getitem__", "__setitem__", "contiguous", "item", "tolist", "__bool__",
                     "__float__", "__int__", "__index__", "copy_", "new_tensor", "type", "chunk",
                     "split", "unbind"):
            if hasattr(torch.Tensor, name):
                stack.enter_context(_patch_attr(torch.Tensor, name, guard_free(getattr(torch.Tensor, name))))
        if recorder is not None:
            recorder.device_types = {"cuda", "meta"}
            stack.callback(setattr, recorder, "device_types", {recorder.device_type})
    return stack


class ForwardMemo:
    """Replay a module's recorded allocation stream instead of re-running its forward.

    The first call with given argument metadata (shapes, strides, dtypes, devices and the
    non-tensor arguments) runs for real; its events are kept when every allocation made
    inside it is either freed inside it or is the storage of the returned tensor. A later
    call with the same metadata re-emits those events (same sizes, order, ops, modules) and
    allocates a fake output of the recorded shape at the position of the original output.
    The UNet is such a module: every denoising step runs the same code on the same shapes.
    """

    def __init__(self, recorder: MemoryRecorder, module: torch.nn.Module, device: str):
        self.rec = recorder
        self.module = module
        self.device = device
        self.cache: dict = {}
        self.replays = 0
        self.orig_forward = module.forward

    @staticmethod
    def _sig(args, kwargs):
        def one(a):
            if isinstance(a, torch.Tensor):
                # offsets only matter through alignment (e.g. SDPA's 16-byte check)
                return ("T", tuple(a.shape), tuple(a.stride()), a.dtype, a.device.type,
                        (a.storage_offset() * a.element_size()) % 16)
            if isinstance(a, (list, tuple)):
                return tuple(one(x) for x in a)
            if isinstance(a, dict):
                return tuple(sorted((k, one(v)) for k, v in a.items()))
            return ("V", repr(a))
        return (one(args), one(kwargs))

    def __call__(self, *args, **kwargs):
        sig = self._sig(args, kwargs)
        entry = self.cache.get(sig)
        if entry is not None:
            return self._replay(entry, args, kwargs)
        rec = self.rec
        start = len(rec.events)
        out = self.orig_forward(*args, **kwargs)
        evs = rec.events[start:]
        flat = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if len(flat) == 1:
            key = flat[0].untyped_storage()._cdata
            # storage keys are StorageImpl addresses and get reused: walk in order
            live, foreign_free = set(), False
            for e in evs:
                if e.kind == "alloc":
                    live.add(e.key)
                elif e.key in live:
                    live.discard(e.key)
                else:
                    foreign_free = True
            if live == {key} and not foreign_free:
                t = flat[0]
                out_index = max(i for i, e in enumerate(evs) if e.kind == "alloc" and e.key == key)
                self.cache[sig] = ([e for e in evs], out_index, (tuple(t.shape), tuple(t.stride()), t.dtype),
                                   treespec_of(out))
        return out

    def _replay(self, entry, args, kwargs):
        evs, out_index, (shape, stride, dtype), spec = entry
        rec = self.rec
        self.replays += 1
        keymap = {}
        out = None
        for i, e in enumerate(evs):
            if e.kind == "alloc":
                if i == out_index:
                    out = torch.empty_strided(shape, stride, dtype=dtype, device=self.device)
                    if not rec.track(out, op=e.op, module=e.module):
                        last = rec.events[-1]     # tracked by the dispatch already: relabel
                        last.op, last.module = e.op, e.module
                else:
                    keymap[e.key] = rec.synthetic_alloc(e.nbytes, e.op, e.shape, e.dtype, module=e.module)
            else:
                rec.synthetic_free(keymap.pop(e.key), op=e.op, module=e.module)
        return tree_unflatten([out], spec)


def treespec_of(out):
    return tree_flatten(out)[1]


def _layer_norm_contiguous(recorder: MemoryRecorder):
    """CUDA layer_norm: ``X = input.expect_contiguous()`` then a contiguous output.

    aten/src/ATen/native/cuda/layer_norm_kernel.cu (layer_norm_cuda) copies a
    non-contiguous input inside the kernel (allocated before Y, mean and rstd, freed when it
    returns) and allocates Y contiguous. The meta kernel keeps the input's strides and
    shows no copy. SD1.5's transformer blocks feed LayerNorm the permuted view
    ``hidden_states.permute(0, 2, 3, 1).reshape(b, h*w, c)``, so this copy is real memory.
    """
    def rewrite(func, args, kwargs):
        x = args[0]
        if x.is_contiguous():
            return func(*args, **kwargs)
        x_c = x.contiguous()          # dispatched inside our handler: record by hand
        recorder.track(x_c, op="native_layer_norm:expect_contiguous")
        out = func(x_c, *args[1:], **kwargs)
        for t in out:                 # Y, mean, rstd exist before the copy is freed
            recorder.track(t)
        del x_c
        return out
    return rewrite


def h2d_temporary_bytes(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool) -> int:
    """Device bytes of the temporary a CPU -> CUDA copy allocates inside the copy
    (aten/src/ATen/native/cuda/Copy.cu, copy_kernel_cuda with copy_requires_temporaries):
    a same-dtype copy over dense, equally strided tensors is one cudaMemcpyAsync; otherwise
    a blocking copy converts on the CPU and stages through a contiguous device tensor unless
    dst is contiguous; a non_blocking one converts on the GPU from a contiguous temporary
    of the source dtype unless dst is contiguous and of the same dtype.
    The pipeline's ``image.to(device, fp16)`` of the channels-last-strided float32 image is
    such a copy: the archive's text_encoder stage peaks show the extra 3 x H x W fp16 bytes
    (results/H200/20261126T052554Z_nogit.json, vae-tiling-2048x2048: 25,165,824 B)."""
    same = dst.dtype == src.dtype
    if same and dst.stride() == src.stride() and _dense(dst):
        return 0
    if not non_blocking:
        return 0 if dst.is_contiguous() else dst.numel() * dst.element_size()
    return 0 if (dst.is_contiguous() and same) else dst.numel() * src.element_size()


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous."""
    expected = 1
    for size, stride in sorted(((sz, st) for sz, st in zip(t.shape, t.stride()) if sz != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _h2d_copy_hook(recorder: MemoryRecorder, device_type: str):
    aten = torch.ops.aten

    def hook(func, args, kwargs, out):
        if func is aten._to_copy.default:
            dst, src, nb = out, args[0], kwargs.get("non_blocking", False)
        elif func is aten.copy_.default:
            dst, src = args[0], args[1]
            nb = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        else:
            return
        if (not isinstance(dst, torch.Tensor) or not isinstance(src, torch.Tensor)
                or src.device.type != "cpu" or dst.device.type not in recorder.device_types
                or dst.device.type == "cpu"):
            return
        nbytes = h2d_temporary_bytes(dst, src, bool(nb))
        if nbytes:
            k = recorder.synthetic_alloc(nbytes, "copy_:h2d_contiguous_temporary", tuple(dst.shape), str(dst.dtype))
            recorder.synthetic_free(k)
    return hook


def _safe_softmax_hook(recorder: MemoryRecorder):
    """aten._safe_softmax on CUDA (SDPA's math path): the softmax output, then
    ``self == -inf`` as a bool tensor and its all() over the softmax dim (keepdim) to zero
    fully masked rows, both alive with the output until the op returns. The archive's math
    cases show exactly these bytes above the simulation without them (results/H200/
    20261126T052814Z_nogit.json, math-256x256: unet stage +16,793,600 B for B x heads x N x N
    = 2 x 8 x 1024 x 1024 and 2 x 8 x 1024; the safety checker's 16 x 257 x 257 likewise)."""
    safe = torch.ops.aten._safe_softmax.default

    def hook(func, args, kwargs, out):
        if func is not safe or not isinstance(out, torch.Tensor) or out.device.type not in recorder.device_types:
            return
        x = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
        n = x.numel()
        masked = recorder.synthetic_alloc(n, "_safe_softmax:eq(-inf)", tuple(x.shape), "bool")
        rows = recorder.synthetic_alloc(n // max(x.shape[dim], 1), "_safe_softmax:all", (), "bool")
        recorder.synthetic_free(rows)
        recorder.synthetic_free(masked)
    return hook


def _conv_workspace_hook(recorder: MemoryRecorder, ws):
    """cuDNN's convolution workspace: allocated through the caching allocator inside
    at::native::cudnn_convolution after the output exists, freed when the convolution
    returns (results/H200/20261126T052749Z_nogit_memhistory_truck-4032x3024.json: the
    decoder's peak is at up_blocks.2.upsamplers.0.conv with the interpolated input, the conv
    output and a 12,486,574,464 B workspace alive). Its size comes from the GPU profile's
    workspaces (profile.conv_workspace(): a probe's measurement for this module and input
    shape, else the first rule matching the module path, kernel size and batch)."""
    conv = torch.ops.aten.convolution.default

    def hook(func, args, kwargs, out):
        if func is not conv or not isinstance(out, torch.Tensor) or out.device.type not in recorder.device_types:
            return
        x, weight = args[0], args[1]
        nbytes = ws(recorder.module, tuple(weight.shape[2:]), tuple(x.shape), x.numel() * x.element_size(),
                    out.numel() * out.element_size(), weight.numel() * weight.element_size())
        if nbytes > 0:
            k = recorder.synthetic_alloc(nbytes, "cudnn_convolution:workspace", (nbytes,), "uint8")
            recorder.synthetic_free(k, op="cudnn_convolution:workspace")
    return hook


def _prompt_for(prompt, prompt_length):
    if prompt is not None:
        return prompt
    n = 10 if prompt_length is None else int(prompt_length)
    # "photo" is one CLIP BPE token; no device tensor depends on the prompt (padding to 77)
    return " ".join(["photo"] * max(n, 0))


def run_call(pipe, recorder: MemoryRecorder, *, height: int, width: int, prompt: str,
             options, device_type: str, profile: GPUProfile | None = None, fake: bool = True,
             max_unet_evals: int | None = STEADY_STATE_EVALS, sdpa: bool = True,
             memo_unet: bool = True):
    """Run pipe.__call__ under the recorder with the substitutions of the module docstring.

    The caller has already entered FakeTensorMode (fake=True) and put the weights on the
    device. Returns (call_start_index, call_end_index, info) over recorder.events.
    """
    from diffusers import PNDMScheduler
    from PIL import Image

    from sd_vram.stages import stage_hooks

    info = {"unet_evals": 0, "sdpa": {}}
    es = contextlib.ExitStack()
    with es:
        # fresh scheduler: models the first call of a process
        es.enter_context(_patch_attr(pipe, "scheduler", PNDMScheduler.from_config(pipe.scheduler.config),
                                     use_dict=True))
        ip = pipe.image_processor
        es.enter_context(_patch_attr(ip, "preprocess", _make_preprocess(height, width), use_dict=True))
        es.enter_context(_patch_attr(ip, "numpy_to_pil",
                                     lambda images: [Image.new("RGB", (1, 1)) for _ in range(len(images))],
                                     use_dict=True))
        if pipe.feature_extractor is not None:
            es.enter_context(_patch_attr(pipe, "feature_extractor", _FeatureExtractorStub(pipe.feature_extractor),
                                         use_dict=True))
        es.enter_context(_patched_tensor_methods(recorder, fake, device_type))

        # memory options, restored afterwards (the meta pipeline is shared)
        unet_procs = dict(pipe.unet.attn_processors)
        vae_procs = dict(pipe.vae.attn_processors)
        es.callback(pipe.vae.set_attn_processor, vae_procs)
        es.callback(pipe.unet.set_attn_processor, unet_procs)
        if options.attention_slicing is not None:
            pipe.enable_attention_slicing(options.attention_slicing)
        old_slicing, old_tiling = getattr(pipe.vae, "use_slicing", False), getattr(pipe.vae, "use_tiling", False)
        es.callback(setattr, pipe.vae, "use_slicing", old_slicing)
        es.callback(setattr, pipe.vae, "use_tiling", old_tiling)
        if options.vae_slicing:
            pipe.vae.enable_slicing()
        if options.vae_tiling:
            pipe.vae.enable_tiling()

        # safety checker thresholds: known values, never flagged
        sc = pipe.safety_checker
        if sc is not None:
            for name in ("concept_embeds_weights", "special_care_embeds_weights"):
                p = getattr(sc, name)
                if fake:
                    from torch.utils._mode_utils import no_dispatch

                    with no_dispatch():
                        value = torch.ones(tuple(p.shape), dtype=p.dtype, device="cpu")
                    recorder.set_shadow(p, value)
                else:
                    with torch.no_grad():
                        p.fill_(1.0)

        patcher = None
        if sdpa and device_type == "cuda":
            patcher = SDPAPatcher(profile or get_profile(None), options.attention, recorder, device_type)
            es.enter_context(patched_sdpa(patcher))
            h2d = _h2d_copy_hook(recorder, device_type)
            recorder.post_op_hooks.append(h2d)
            es.callback(recorder.post_op_hooks.remove, h2d)

            ss = _safe_softmax_hook(recorder)
            recorder.post_op_hooks.append(ss)
            es.callback(recorder.post_op_hooks.remove, ss)

            ws = (profile or get_profile(None)).conv_workspace()
            if ws:
                hook = _conv_workspace_hook(recorder, ws)
                recorder.post_op_hooks.append(hook)
                es.callback(recorder.post_op_hooks.remove, hook)

            recorder.rewrites[torch.ops.aten.native_layer_norm.default] = _layer_norm_contiguous(recorder)
            es.callback(recorder.rewrites.pop, torch.ops.aten.native_layer_norm.default, None)

        def on_step_end(p, i, t, kwargs):
            info["unet_evals"] += 1
            if max_unet_evals is not None and info["unet_evals"] >= max_unet_evals:
                p._interrupt = True
            return {}

        if memo_unet:
            memo = ForwardMemo(recorder, pipe.unet, device_type)
            es.enter_context(_patch_attr(pipe.unet, "forward", memo, use_dict=True))
            info["memo"] = memo

        es.enter_context(stage_hooks(pipe, recorder.set_stage))
        # num_images_per_prompt > 1: diffusers warns that it repeats the one image (FutureWarning,
        # the real call's own behaviour, nothing about memory); keep it off the user's stderr
        es.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=r"You have passed \d+ text prompts", category=FutureWarning)
        start = len(recorder.events)
        with recorder:
            out = pipe(prompt, image=Image.new("RGB", (8, 8)), strength=options.strength,
                       num_inference_steps=options.num_inference_steps,
                       guidance_scale=options.guidance_scale,
                       num_images_per_prompt=options.num_images_per_prompt,
                       output_type=options.output_type, callback_on_step_end=on_step_end,
                       callback_on_step_end_tensor_inputs=[])
            end = len(recorder.events)
        del out
        if patcher is not None:
            info["sdpa"] = dict(patcher.choices)
        if memo_unet:
            info["unet_replays"] = info.pop("memo").replays
    return start, end, info


def simulate_events(height: int, width: int, prompt=None, prompt_length=None, *, options,
                    profile: GPUProfile, steps="auto", history=(), memo_unet: bool = True):
    """Run the fake CUDA call from the GPU suite's resident state (resident_setup); return
    (recorder, start, end, info)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # the suite builds the pipeline with its safety checker and sets it to None for a case
    # without one; a history that unloads it needs the model built too
    built_with_checker = bool(options.safety_checker) or any(h == "-safety_checker" for h in history)
    pipe = meta_pipeline(built_with_checker)
    max_evals = None if steps == "full" else (STEADY_STATE_EVALS if steps == "auto" else int(steps))
    recorder = MemoryRecorder("cuda")
    recorder.name_modules({n: m for n, m in module_order(pipe)})
    swap = _WeightSwap()
    t0 = time.perf_counter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with fake_mode, contextlib.ExitStack() as es:
            loaded = resident_setup(pipe, recorder, swap, profile, history)
            if pipe.safety_checker is not None and (not options.safety_checker or "safety_checker" not in loaded):
                if options.safety_checker:
                    raise ValueError("the history leaves the safety checker off the device")
                es.enter_context(_patch_attr(pipe, "safety_checker", None, use_dict=True))
            start, end, info = run_call(pipe, recorder, height=height, width=width,
                                        prompt=_prompt_for(prompt, prompt_length), options=options,
                                        device_type="cuda", profile=profile, fake=True,
                                        max_unet_evals=max_evals, memo_unet=memo_unet)
    finally:
        swap.restore()
    info["seconds"] = time.perf_counter() - t0
    info["weights_end"] = start
    return recorder, start, end, info


def record_call(height: int, width: int, *, device_type: str = "cuda", fake: bool = True,
                options=None, profile: GPUProfile | None = None, max_unet_evals=STEADY_STATE_EVALS,
                memo_unet: bool = True, dtype: torch.dtype = torch.float16, prompt: str = "a photo"):
    """Record one call on `device_type`, on fake tensors or (fake=False, CPU) real ones.

    The real CPU run gets uninitialised weights (torch.empty: memory does not depend on
    values, and untouched pages cost no RAM); both runs use the same substitutions.
    Returns (recorder, call_start, call_end, info).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sd_vram.formula.options import Options

    options = options or Options()
    pipe = meta_pipeline(bool(options.safety_checker))
    recorder = MemoryRecorder(device_type, shadows=fake)
    recorder.name_modules({n: m for n, m in module_order(pipe)})
    swap = _WeightSwap()

    def make(like, dt):
        if not like.is_floating_point():   # position_ids: the values a checkpoint holds
            return torch.arange(like.shape[-1], dtype=dt, device=device_type).expand(like.shape).contiguous()
        return torch.empty_strided(like.shape, like.stride(), dtype=dtype, device=device_type)

    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    try:
        with mode:
            load_weights(pipe, recorder, device_type, swap, make=make)
            start, end, info = run_call(pipe, recorder, height=height, width=width, prompt=prompt,
                                        options=options, device_type=device_type, profile=profile,
                                        fake=fake, max_unet_evals=max_unet_evals, memo_unet=memo_unet)
    finally:
        swap.restore()
    return recorder, start, end, info
