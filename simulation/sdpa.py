"""Choose the SDPA backend the real GPU would choose, and call its fused aten operator.

On fake CUDA tensors F.scaled_dot_product_attention cannot ask the device which kernels it
has and silently runs the math decomposition, which materialises the B x heads x N x N
score matrix. During a simulation F.scaled_dot_product_attention is replaced by
`SDPAPatcher.__call__`, which mirrors aten/src/ATen/native/transformers/attention.cpp
(scaled_dot_product_attention) with the choice of
aten/src/ATen/native/transformers/cuda/sdp_utils.cpp (select_sdp_backend), evaluated for a
GPUProfile instead of the local device:

- priority order: flash, efficient, math, cudnn (at::Context default). priority_order()
  moves cuDNN first when check_prefer_cudnn_attention(): cuDNN runtime > 9.15.0 on sm90 /
  sm100 (and, for CUDA < 13 builds, minor version 0 or 3), unless
  TORCH_CUDNN_SDPA_DEPRIORITIZED is set.
- cuDNN: sm80..sm121, fp16/bf16, cuDNN >= 9.0 (8.9.3 checks omitted: no such build ships
  torch 2.4+), head dim limit per torch version (cudnn_head_dim_limit: 256 on sm90 with
  torch 2.11 and cuDNN 9.19, as measured); head dims multiple of 8; key length != 1 (the
  UNet's 1-token self-attention at 64x64 ran FLASH_ATTENTION on the H200); batch and heads
  <= 65535.
- flash: sm80..sm121, fp16/bf16, no attn_mask, q/k/v head dims equal and <= 256, is_causal
  only with equal lengths.
- memory-efficient: sm50..sm121, head dim divisible by minimum_gemm_alignment (8 for fp16
  on sm75+ with tensor cores, 4 on sm80 for fp32), storage offsets aligned (sm80+).
- math: always.

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
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .profile import GPUProfile

FLASH, EFFICIENT, MATH, CUDNN = "flash", "efficient", "math", "cudnn"
DEFAULT_ORDER = (FLASH, EFFICIENT, MATH, CUDNN)
CUDNN_FIRST_ORDER = (CUDNN, FLASH, EFFICIENT, MATH)

_aten = torch.ops.aten


def _cc_in(cc, lo, hi) -> bool:
    return lo <= tuple(cc) <= hi


def priority_order(profile: GPUProfile) -> tuple[str, ...]:
    major, minor = profile.compute_capability
    v = profile.cudnn_version or 0
    prefer = (not profile.cudnn_sdpa_deprioritized and v > 91500 and major in (9, 10)
              and (profile.cuda_version >= (13, 0) or minor in (0, 3)))
    return CUDNN_FIRST_ORDER if prefer else DEFAULT_ORDER


def _half(dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def cudnn_head_dim_limit(profile, d_qk: int, d_v: int) -> int:
    """check_cudnn_tensor_shapes' head dim limit, per torch version.

    torch <= 2.12 (measured on torch 2.11 + cuDNN 9.19 on an H200, results/H200/
    20261126T052554Z_nogit.json: head dims 40, 80 and 160 all ran CUDNN_ATTENTION): 128,
    256 on sm90 exactly with cuDNN >= 9.10.0, 192 for the (192, 128) DeepSeek shape on sm10x
    with cuDNN >= 9.11.0.
    torch >= 2.13 (read from the sources, not measured yet): 256 on sm90/sm10x (not sm107
    before cuDNN 9.26) with cuDNN > 9.22 and cudnn-frontend >= 1.24, the same 192 case, else 128.
    """
    cc = tuple(profile.compute_capability)
    ver = profile.cudnn_version or 0
    if tuple(profile.torch_version) <= (2, 12):
        if ver >= 91000 and cc == (9, 0):
            return 256
        if ver >= 91100 and cc[0] == 10 and d_qk == 192 and d_v == 128:
            return 192
        return 128
    sm90_or_10x = cc == (9, 0) or cc[0] == 10
    unsupported_sm107 = cc == (10, 7) and ver <= 92500
    if sm90_or_10x and not unsupported_sm107 and ver > 92200 and profile.cudnn_frontend_d256:
        return 256
    if sm90_or_10x and ver >= 91100 and d_qk == 192 and d_v == 128:
        return 192
    return 128


def can_use_cudnn(profile, q, k, v, attn_mask, dropout_p, is_causal) -> bool:
    cc = tuple(profile.compute_capability)
    ver = profile.cudnn_version or 0
    if ver < 90000 or not _cc_in(cc, (8, 0), (12, 1)) or not _half(q.dtype):
        return False
    if dropout_p * 16.0 != math.floor(dropout_p * 16.0):
        return False
    if q.dim() != 4 or q.size(0) > 65535 or q.size(1) > 65535:
        return False
    d_qk, d_v = q.size(-1), v.size(-1)
    limit = cudnn_head_dim_limit(profile, d_qk, d_v)
    if d_qk > limit or d_v > limit or d_qk % 8 or d_v % 8:
        return False
    if k.size(-2) == 1 or q.size(-2) == 0 or k.size(-2) == 0:
        return False
    return all(t.stride(-1) == 1 or t.size(-1) == 1 for t in (q, k, v))


def can_use_flash(profile, q, k, v, attn_mask, dropout_p, is_causal) -> bool:
    cc = tuple(profile.compute_capability)
    if not _cc_in(cc, (8, 0), (12, 1)) or not _half(q.dtype) or attn_mask is not None:
        return False
    if not (q.size(-1) == k.size(-1) == v.size(-1)) or q.size(-1) > 256:
        return False
    if is_causal and q.size(-2) != k.size(-2):
        return False
    if q.size(-2) == 0 or k.size(-2) == 0:
        return False
    return all(t.stride(-1) == 1 or t.size(-1) == 1 for t in (q, k, v))


def _min_gemm_alignment(profile, dtype) -> int:
    major = profile.compute_capability[0]
    is_half = _half(dtype)
    use_tc = major >= 8 or (major >= 7 and is_half)
    align = 4 if major >= 8 else 1
    if use_tc:
        align = max(align, 128 // (16 if is_half else 32))
    return align


def can_use_efficient(profile, q, k, v, attn_mask, dropout_p, is_causal) -> bool:
    cc = tuple(profile.compute_capability)
    if not _cc_in(cc, (5, 0), (12, 1)):
        return False
    if cc[0] >= 8:
        ok_dtypes = (torch.float16, torch.float32, torch.bfloat16)
    else:
        ok_dtypes = (torch.float16, torch.float32)
    if q.dtype not in ok_dtypes:
        return False
    align = _min_gemm_alignment(profile, q.dtype)
    d_qk, d_v = q.size(-1), v.size(-1)
    if d_qk != k.size(-1) or d_qk % align or d_v % align or d_qk <= 0 or d_v <= 0:
        return False
    if cc[0] >= 8:
        align_bytes = align * q.element_size()
        if any((t.storage_offset() * t.element_size()) % align_bytes for t in (q, k, v)):
            return False
    if q.size(-2) == 0 or k.size(-2) == 0:
        return False
    return all(t.stride(-1) == 1 for t in (q, k, v))


CHECKS = {CUDNN: can_use_cudnn, FLASH: can_use_flash, EFFICIENT: can_use_efficient,
          MATH: lambda *a: True}


def choose_backend(profile: GPUProfile, requested: str, q, k, v, attn_mask=None,
                   dropout_p=0.0, is_causal=False) -> str:
    """The backend PyTorch picks ("auto") or the requested one where it can run.

    An explicit request puts that backend first and keeps PyTorch's order for the rest, so
    a call the requested kernel cannot run (e.g. the VAE's head dim 512 for flash or cuDNN)
    goes where the GPU would send it next; "math" forces the math path everywhere.
    """
    if requested == MATH:
        return MATH
    order = priority_order(profile)
    if requested != "auto":
        order = (requested,) + tuple(b for b in order if b != requested)
    for backend in order:
        if CHECKS[backend](profile, q, k, v, attn_mask, dropout_p, is_causal):
            return backend
    return MATH


def needs_output_accumulator(q, v) -> bool:
    """kNeedsOutputAccumulatorBuffer for the kernel attention.cu dispatches to.

    The fp16/bf16 forward kernels are 64x64 (kMaxK 64), 64x128 (kMaxK 128), both keeping the
    output in registers, and 32x128 with kMaxK 65536 for larger head dims, which accumulates
    in a global-memory fp32 buffer; fp32 never needs it (output_accum_t == output_t).
    """
    return _half(q.dtype) and max(q.size(-1), v.size(-1)) > 128


def flash_num_splits(profile: GPUProfile, batch, heads, seqlen_q, seqlen_k, head_dim) -> int:
    """flash_api.cpp num_splits_heuristic (dropout 0)."""
    block_n = 256 if head_dim <= 64 else (128 if head_dim <= 128 else 64)
    num_n_blocks = (seqlen_k + block_n - 1) // block_n
    num_m_blocks = (seqlen_q + 64 - 1) // 64
    batch_nheads_mblocks = batch * heads * num_m_blocks
    num_sms = profile.multiprocessor_count * 2
    if batch_nheads_mblocks >= 0.8 * num_sms:
        return 1
    max_splits = min(128, num_sms, num_n_blocks)
    if max_splits < 1:
        return 1

    def eligible(s):
        return s == 1 or -(-num_n_blocks // s) != -(-num_n_blocks // (s - 1))

    eff = []
    max_eff = 0.0
    for s in range(1, max_splits + 1):
        if not eligible(s):
            eff.append(0.0)
            continue
        n_waves = batch_nheads_mblocks * s / num_sms
        e = n_waves / math.ceil(n_waves)
        max_eff = max(max_eff, e)
        eff.append(e)
    for s in range(1, max_splits + 1):
        if eligible(s) and eff[s - 1] >= 0.85 * max_eff:
            return s
    return 1


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
            d_rounded = -(-q.size(3) // 32) * 32 if q.size(3) <= 128 else -(-q.size(3) // 64) * 64
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
