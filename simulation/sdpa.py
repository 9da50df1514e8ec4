"""Choose the SDPA backend the real GPU would choose, and call its fused aten operator.

On fake CUDA tensors F.scaled_dot_product_attention cannot ask the device which kernels it
has and silently runs the math decomposition, which materialises the B x heads x N x N
score matrix. During a simulation F.scaled_dot_product_attention is replaced by
`SDPAPatcher.__call__`, which mirrors aten/src/ATen/native/transformers/attention.cpp
(scaled_dot_product_attention) with the choice of
aten/src/ATen/native/transformers/cuda/sdp_utils.cpp (select_sdp_backend) as the kernel
table sd_vram.formula.kernels writes it (the equation reads the same table), evaluated for a
GPUProfile instead of the local device; `sdpa_call` reads the tensors' shapes, dtype,
strides and storage offsets that its filters look at.

Kernel-internal allocations that the meta kernels do not show become synthetic events:
- memory-efficient attention allocates an fp32 output accumulator {B, M, heads, Kv} when
  Kernel::kNeedsOutputAccumulatorBuffer (kernel_forward.h: !kKeepOutputInRF && output_accum_t
  != output_t), i.e. for fp16/bf16 with the gmem kernel (kMaxK = 65536) that head dims > 128
  use (attention.cu _efficient_attention_forward); freed when the op returns.
- the cuDNN backend's meta kernel allocates a logsumexp that the real kernel only allocates
  when compute_log_sumexp (training); it is dropped from the record.
- flash attention's split-KV buffers (flash_api.cpp set_params_splitkv: softmax_lse_accum
  {splits, B, H, Sq} and out_accum {splits, B, H, Sq, d_rounded}, fp32) when the
  num_splits_heuristic picks more than one split (few query blocks: small images).

The decision and its sizes are sd_vram.formula.kernels' (choose_backend,
needs_output_accumulator and flash_num_splits only hand it what the tensors say). This
module remains for what needs the tensors: reading them, standing in for
F.scaled_dot_product_attention, and calling the fused aten operators with the
allocations their kernels make inside. Imports torch, sd_vram.formula and the recorder
it is given.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from sd_vram.formula import kernels
from sd_vram.formula.gpu_profiles import GPUProfile
from sd_vram.formula.kernels import CUDNN, EFFICIENT, FLASH, MATH  # noqa: F401

_aten = torch.ops.aten


def sdpa_call(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False) -> kernels.SdpaCall:
    """What sdp_utils.cpp's filters read of these tensors, for kernels.sdpa_backend."""
    qkv = (q, k, v)
    return kernels.SdpaCall(
        batch=q.size(0), heads=q.size(1), q_len=q.size(-2), kv_len=k.size(-2),
        d_qk=q.size(-1), d_k=k.size(-1), d_v=v.size(-1), dtype=str(q.dtype).replace("torch.", ""),
        mask=attn_mask is not None, dropout_p=dropout_p, is_causal=is_causal,
        last_dim_contiguous=all(t.stride(-1) == 1 or t.size(-1) == 1 for t in qkv),
        last_dim_stride_1=all(t.stride(-1) == 1 for t in qkv),
        offset_bytes=tuple(t.storage_offset() * t.element_size() for t in qkv))


def choose_backend(profile: GPUProfile, requested: str, q, k, v, attn_mask=None,
                   dropout_p=0.0, is_causal=False) -> str:
    """The backend PyTorch picks for these tensors on this profile (kernels.sdpa_backend)."""
    if q.dim() != 4:
        return MATH
    return kernels.sdpa_backend(profile, requested, sdpa_call(q, k, v, attn_mask, dropout_p, is_causal))


def needs_output_accumulator(q, v) -> bool:
    return kernels.efficient_output_accumulator(str(q.dtype).replace("torch.", ""), q.size(-1), v.size(-1))


def flash_num_splits(profile: GPUProfile, batch, heads, seqlen_q, seqlen_k, head_dim) -> int:
    return kernels.flash_num_splits(profile.multiprocessor_count, batch, heads, seqlen_q, seqlen_k, head_dim)


class SDPAPatcher:
    """Callable standing in for F.scaled_dot_product_attention during a simulation."""

    def __init__(self, profile: GPUProfile, requested: str = "auto", recorder=None,
                 device_type: str = "cuda"):
        self.profile = profile
        self.requested = requested
        self.recorder = recorder
        self.device_type = device_type
        self.original = F.scaled_dot_product_attention
        self.choices: dict[tuple, str] = {}     # (module, q shape, k shape) -> backend

    def _note(self, backend, q, k, attn_mask):
        module = self.recorder.module if self.recorder is not None else ""
        key = (module.split(".")[0], tuple(q.shape), tuple(k.shape), attn_mask is not None)
        self.choices[key] = backend

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                 scale=None, enable_gqa=False):
        if query.device.type != self.device_type or query.dim() != 4 or enable_gqa:
            return self.original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                 is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        backend = choose_backend(self.profile, self.requested, query, key, value, attn_mask,
                                 dropout_p, is_causal)
        self._note(backend, query, key, attn_mask)
        if backend == MATH:
            # _fused_sdp_choice says math: attention.cpp runs _scaled_dot_product_attention_math,
            # CompositeImplicit, so the recorder sees its matmul/softmax temporaries.
            return self.original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                 is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # convert_boolean_attn_mask: where(mask, 0, -inf) in the query dtype
            attn_mask = torch.where(attn_mask, torch.zeros((), dtype=query.dtype, device=query.device),
                                    torch.full((), -math.inf, dtype=query.dtype, device=query.device))
        if backend == CUDNN:
            return self._cudnn(query, key, value, attn_mask, dropout_p, is_causal, scale)
        if backend == FLASH:
            return self._flash(query, key, value, dropout_p, is_causal, scale)
        return self._efficient(query, key, value, attn_mask, dropout_p, is_causal, scale)

    # The real CUDA kernels allocate their outputs in the op; the meta kernels do the same.
    def _cudnn(self, q, k, v, attn_mask, dropout_p, is_causal, scale):
        rec = self.recorder
        if rec is not None:
            def drop_lse(func, args, kwargs, out):
                if func is _aten._scaled_dot_product_cudnn_attention.default:
                    lse = out[1]
                    key = lse.untyped_storage()._cdata
                    ev = rec.live.pop(key, None)
                    if ev is not None:
                        for i in range(len(rec.events) - 1, -1, -1):
                            if rec.events[i] is ev:
                                del rec.events[i]
                                break
            rec.post_op_hooks.append(drop_lse)
        try:
            out = _aten._scaled_dot_product_cudnn_attention(q, k, v, attn_mask, False, dropout_p,
                                                            is_causal, False, scale=scale)
        finally:
            if rec is not None:
                rec.post_op_hooks.remove(drop_lse)
        return out[0]

    def _flash(self, q, k, v, dropout_p, is_causal, scale):
        rec = self.recorder
        splits = flash_num_splits(self.profile, q.size(0), q.size(1), q.size(2), k.size(2), q.size(3))
        keys = []
        if rec is not None and splits > 1:
            d_rounded = kernels.flash_head_dim_rounded(q.size(3))
            b, h, sq = q.size(0), q.size(1), q.size(2)
            keys.append(rec.synthetic_alloc(splits * b * h * sq * 4, "flash_attn:softmax_lse_accum",
                                            (splits, b, h, sq), "float32"))
            keys.append(rec.synthetic_alloc(splits * b * h * sq * d_rounded * 4, "flash_attn:out_accum",
                                            (splits, b, h, sq, d_rounded), "float32"))
        out = _aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)
        for key in keys:
            rec.synthetic_free(key)
        return out[0]

    def _efficient(self, q, k, v, attn_mask, dropout_p, is_causal, scale):
        rec = self.recorder
        if attn_mask is not None:
            attn_mask = _preprocess_mask(attn_mask, q, k)
        if rec is not None and needs_output_accumulator(q, v):
            b, h, m, kv = q.size(0), q.size(1), q.size(2), v.size(3)
            accum = {}

            def add_accum(func, args, kwargs, out):
                # allocated after the output (and logsumexp) inside _efficient_attention_forward
                if func is _aten._scaled_dot_product_efficient_attention.default and not accum:
                    accum["key"] = rec.synthetic_alloc(b * m * h * kv * 4, "efficient_attn:output_accum",
                                                       (b, m, h, kv), "float32")
            rec.post_op_hooks.append(add_accum)
        try:
            out = _aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, False, dropout_p,
                                                                is_causal, scale=scale)
        finally:
            if rec is not None and needs_output_accumulator(q, v):
                rec.post_op_hooks.remove(add_accum)
                # freed when the kernel returns: before the logsumexp and seeds are dropped
                if accum:
                    rec.synthetic_free(accum["key"])
        return out[0]


def _preprocess_mask(mask, q, k):
    """attention.cpp preprocess_mask: pad the last dim to a multiple of 16, expand."""
    align = 16
    last = mask.size(-1)
    if last % align:
        pad = align - last % align
        mask = F.pad(mask, (0, pad))[..., :last]
    return mask.expand(q.size(0), q.size(1), q.size(2), k.size(2))


@contextmanager
def patched_sdpa(patcher: SDPAPatcher):
    """Swap F.scaled_dot_product_attention (looked up at call time by diffusers and
    transformers' sdpa integration) for the patcher."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = patcher
    torch.nn.functional.scaled_dot_product_attention = patcher
    try:
        yield patcher
    finally:
        F.scaled_dot_product_attention = original
        torch.nn.functional.scaled_dot_product_attention = original
