"""Allocations made inside CUDA kernels, which the meta kernels do not show.

During a simulated call these become synthetic events on the recorder (recorder.py):
cuDNN convolution workspaces (the GPU profile's conv rules, sd_vram.formula.kernels); with
channels-last weights, the convolutions' NHWC input copies and outputs; GroupNorm as CUDA runs
it (kernels.py section 4b); the contiguous staging tensor of a CPU -> CUDA copy that converts
into a non-contiguous destination (h2d_temporary_bytes), the bool temporaries of SDPA's math
path (_safe_softmax) and layer_norm's input copy. The attention kernels' own (the
memory-efficient accumulator, flash's split-KV buffers) are sdpa.py's.

Imports torch and the recorder; the GPU profile comes from the caller.
"""

from __future__ import annotations

import contextlib
import math

import torch

from sd_vram.formula.gpu_profiles import GPUProfile
from sd_vram.formula.kernels import Layouts, NativeConv, conv_kernels, native_conv_columns
from sd_vram.models import copies_to_nhwc, is_channels_last, runs_nhwc

from .patches import patch_attr
from .recorder import MemoryRecorder


@contextlib.contextmanager
def kernel_allocations(recorder: MemoryRecorder, profile: GPUProfile, device_type: str, options):
    """Add this module's synthetic events to `recorder` for the duration of the block.
    `options` (formula Options): which convolution kernels run (kernels.conv_kernels)."""
    with contextlib.ExitStack() as es:
        h2d = _h2d_copy_hook(recorder, device_type)
        recorder.post_op_hooks.append(h2d)
        es.callback(recorder.post_op_hooks.remove, h2d)

        ss = _safe_softmax_hook(recorder)
        recorder.post_op_hooks.append(ss)
        es.callback(recorder.post_op_hooks.remove, ss)

        ws = conv_kernels(options, profile)
        if isinstance(ws, NativeConv):
            hook = _native_conv_hook(recorder)
            recorder.post_op_hooks.append(hook)
            es.callback(recorder.post_op_hooks.remove, hook)
        else:
            _rewrite(es, recorder, torch.ops.aten.convolution.default, _cudnn_convolution(recorder, ws))

        _rewrite(es, recorder, torch.ops.aten.native_layer_norm.default, _layer_norm_contiguous(recorder))
        keeps = Layouts.of(options, profile).norm_keeps_nhwc
        es.enter_context(patch_attr(torch.nn.functional, "group_norm", _cuda_group_norm(keeps)))
        if keeps:
            _rewrite(es, recorder, torch.ops.aten.native_group_norm.default, _group_norm_keeps_nhwc)
        yield


def _rewrite(es: contextlib.ExitStack, recorder: MemoryRecorder, op, rewrite) -> None:
    recorder.rewrites[op] = rewrite
    es.callback(recorder.rewrites.pop, op, None)


def _cuda_group_norm(keeps_nhwc: bool):
    """F.group_norm as group_norm.cpp runs it on CUDA (kernels.py section 4b), whatever the
    installed CPU build's composite does: a non-contiguous input copied to contiguous first (the
    recorder sees the clone, alive until native_group_norm returns), except an NHWC one where
    the stack's GroupNorm keeps NHWC (Layouts.norm_keeps_nhwc)."""
    def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
        if not input.is_contiguous() and not (keeps_nhwc and is_channels_last(input)):
            input = input.contiguous()
        n, c = input.shape[:2]
        return torch.ops.aten.native_group_norm(input, weight, bias, n, c, math.prod(input.shape[2:]),
                                                num_groups, eps)[0]
    return group_norm


def _group_norm_keeps_nhwc(func, args, kwargs):
    """native_group_norm keeping NHWC: an NHWC output (the meta kernel, the _refs decomposition,
    lays it out contiguous)."""
    x = args[0]
    y, mean, rstd = func(*args, **kwargs)
    return (torch.empty_like(x) if is_channels_last(x) else y), mean, rstd   # preserve_format: x's strides


def _cudnn_convolution(recorder: MemoryRecorder, ws):
    """A cuDNN convolution as Convolution.cpp _convolution runs it (kernels.py sections 3, 4b):
    with channels-last weights the input made contiguous in cudnn_conv_suggest_memory_format's
    NHWC (an NCHW input is copied before the output exists) and the output NHWC (the meta
    kernel lays every output out contiguous), then the workspace, allocated through the
    caching allocator after the output and freed when the convolution returns (results/H200/
    20261126T052749Z_nogit_memhistory_truck-4032x3024.json: the decoder's peak is at
    up_blocks.2.upsamplers.0.conv with the interpolated input, the conv output and a
    12,486,574,464 B workspace alive), then the input copy. The workspace's size comes from
    the GPU profile (profile.conv_workspace(): a probe's measurement for this module and input
    shape, else the first rule matching the module path, kernel size and batch)."""
    def rewrite(func, args, kwargs):
        x, weight = args[0], args[1]
        if x.device.type not in recorder.device_types:
            return func(*args, **kwargs)
        # cudnn_conv_suggest_memory_format's NHWC, for channels-last weights only (not float64):
        # with NCHW weights the meta kernel's contiguous output stays, and the workspace rules
        # (measured that way) name the encoder's convolutions that get the channels-last image
        nhwc = runs_nhwc(weight)
        x_in = x
        if copies_to_nhwc(x, weight):
            x_in = x.contiguous(memory_format=torch.channels_last)   # inside our handler: by hand
            recorder.track(x_in, op="convolution:input.contiguous(channels_last)")
        out = func(x_in, *args[1:], **kwargs)
        if nhwc:
            out = out.contiguous(memory_format=torch.channels_last)  # the fake's own output is never tracked
        recorder.track(out)
        nbytes = ws(recorder.module, tuple(weight.shape[2:]), tuple(x.shape), x.numel() * x.element_size(),
                    out.numel() * out.element_size(), weight.numel() * weight.element_size()) if ws else 0
        if nbytes > 0:
            k = recorder.synthetic_alloc(nbytes, "cudnn_convolution:workspace", (nbytes,), "uint8")
            recorder.synthetic_free(k, op="cudnn_convolution:workspace")
        del x_in
        return out
    return rewrite


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


def _native_conv_hook(recorder: MemoryRecorder):
    """cuDNN off (torch.backends.cudnn.enabled = False): _convolution runs ConvBackend::Slow2d,
    which first copies a non-contiguous (channels-last) input to NCHW (``input.contiguous()``:
    the image into the VAE encoder's conv_in), and slow_conv2d_forward then allocates the
    im2col columns after the output (kernels.native_conv_columns, from the call's own stride
    and padding); both are freed when the convolution returns (formula/kernels.py, section 4)."""
    conv = torch.ops.aten.convolution.default

    def hook(func, args, kwargs, out):
        if func is not conv or not isinstance(out, torch.Tensor) or out.device.type not in recorder.device_types:
            return
        x, weight = args[0], args[1]
        stride, padding = args[3], args[4]
        held = []
        if not x.is_contiguous():
            held.append(recorder.synthetic_alloc(x.numel() * x.element_size(), "slow_conv2d:input.contiguous()",
                                                 tuple(x.shape), str(x.dtype)))
        cols = native_conv_columns(int(x.shape[1]), tuple(weight.shape[2:]), tuple(out.shape[2:]),
                                   x.element_size(), stride=tuple(stride), padding=tuple(padding))
        if cols:
            held.append(recorder.synthetic_alloc(cols, "slow_conv2d:columns", (cols,), "uint8"))
        for k in reversed(held):
            recorder.synthetic_free(k, op="slow_conv2d")
    return hook
