"""Substitutes for the host-side work of diffusers and transformers during a simulated call.

Each keeps the device-side operations of the real call:

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
6. A fresh scheduler of the call's kind per call (``Options.scheduler``:
   ``X.from_config(pipe.scheduler.config)``, built outside the fake mode so its CPU tables
   hold real values, as set_timesteps and its Python branches need): PNDM's and DDIM's
   ``add_noise`` move alphas_cumprod to the device and keep it there, so this models the
   first call of a process (the suite's scheduler keeps it and the last timesteps between
   calls: 4,608 B more resident there). LMS's ``get_lms_coefficient`` (a host float from
   scipy.integrate.quad over the CPU sigmas) is computed by Simpson's rule instead, exact for
   its integrand (a polynomial of degree order - 1 <= 3), so no scipy is needed.

Imports torch, numpy, diffusers and transformers, and the recorder (recorder.py).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .recorder import MemoryRecorder


@contextlib.contextmanager
def patch_attr(obj, name, value, use_dict=False):
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
    # An attribute the object only inherits is deleted again, not set to the inherited value: on
    # a class, setting a dunder such as __getitem__ rewires the type's C slots (torch.Tensor then
    # passes PySequence_Check, and torch.tensor([0-d tensor]) calls len() on the element).
    owned = name in getattr(obj, "__dict__", {})
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if owned:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def fresh_scheduler(pipe, name: str):
    """Substitution 6: a new scheduler `name` from the pipeline's scheduler config, on real CPU tensors."""
    from sd_vram.models import switch_scheduler

    if name == "pndm":
        # built in the call's own (fake) mode, as it always was: the recorder's shadows give
        # the values its step reads, and its fake CPU tables move as real ones do; a table
        # built outside the mode would be converted on first use, an allocation no real CPU
        # run makes (tests/test_simulation_faithful.py)
        return switch_scheduler(pipe.scheduler, name)
    with torch.utils._python_dispatch._disable_current_modes():
        scheduler = switch_scheduler(pipe.scheduler, name)
    if hasattr(scheduler, "get_lms_coefficient"):
        scheduler.get_lms_coefficient = _lms_coefficient.__get__(scheduler)
    return scheduler


def _lms_coefficient(self, order: int, t: int, current_order: int) -> float:
    """LMSDiscreteScheduler.get_lms_coefficient's integral of the Lagrange basis polynomial,
    by Simpson's rule (exact: the integrand's degree is order - 1 <= 3)."""
    # float() of a small CPU table: real values (a fake tensor's through its recorder shadow)
    sigma = {i: float(self.sigmas[i]) for i in {t + 1, *(t - k for k in range(order))}}

    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != current_order:
                prod *= (tau - sigma[t - k]) / (sigma[t - current_order] - sigma[t - k])
        return prod

    a, b = sigma[t], sigma[t + 1]
    return (b - a) / 6 * (basis(a) + 4 * basis((a + b) / 2) + basis(b))


@contextlib.contextmanager
def pipeline_substitutes(pipe, height: int, width: int, scheduler: str = "pndm"):
    """Substitutions 1, 4 and 6 on `pipe` for one call of a height x width image, restored
    afterwards (the meta pipeline is shared)."""
    from PIL import Image

    with contextlib.ExitStack() as es:
        # fresh scheduler: models the first call of a process
        es.enter_context(patch_attr(pipe, "scheduler", fresh_scheduler(pipe, scheduler), use_dict=True))
        ip = pipe.image_processor
        es.enter_context(patch_attr(ip, "preprocess", _make_preprocess(height, width), use_dict=True))
        es.enter_context(patch_attr(ip, "numpy_to_pil",
                                    lambda images: [Image.new("RGB", (1, 1)) for _ in range(len(images))],
                                    use_dict=True))
        if pipe.feature_extractor is not None:
            es.enter_context(patch_attr(pipe, "feature_extractor", _FeatureExtractorStub(pipe.feature_extractor),
                                        use_dict=True))
        yield


def set_safety_thresholds(pipe, recorder: MemoryRecorder, fake: bool) -> None:
    """Substitution 5: the safety checker's thresholds get known values, so no image is flagged."""
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


def patched_tensor_methods(recorder: MemoryRecorder | None, fake: bool, device_type: str):
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

    stack.enter_context(patch_attr(torch.Tensor, "numpy", numpy))

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

        stack.enter_context(patch_attr(torch.Tensor, "to", to))
        stack.enter_context(patch_attr(torch.Tensor, "cuda", cuda))

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

        for name in ("__setitem__", "contiguous", "item", "tolist", "__bool__",
                     "__float__", "__int__", "__index__", "copy_", "new_tensor", "type", "chunk",
                     "split", "unbind"):
            if hasattr(torch.Tensor, name):
                stack.enter_context(patch_attr(torch.Tensor, name, guard_free(getattr(torch.Tensor, name))))
        # __getitem__ on FakeTensor only: set on torch.Tensor it would give every tensor, for the
        # rest of the process, a sequence slot (sq_item) that deleting the attribute does not take
        # back, and torch.tensor([a 0-d tensor]) then calls len() on it
        stack.enter_context(patch_attr(FakeTensor, "__getitem__", guard_free(torch.Tensor.__getitem__)))
        if recorder is not None:
            recorder.device_types = {"cuda", "meta"}
            stack.callback(setattr, recorder, "device_types", {recorder.device_type})
    return stack
