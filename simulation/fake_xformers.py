"""A stand-in for xformers during a simulation: xformers cannot be installed next to a CPU torch.

diffusers binds ``xformers`` when attention_processor.py is imported (``if
is_xformers_available(): import xformers.ops``) and checks it again in
Attention.set_use_memory_efficient_attention_xformers, which also needs
``torch.cuda.is_available()`` and runs a test call ``memory_efficient_attention(q, q, q)``
on a (1, 2, 40) fp32 CUDA tensor. ``patched_xformers`` makes those three answer as on a GPU
with xformers installed, so diffusers' own pipe.enable_xformers_memory_efficient_attention()
swaps in its XFormersAttnProcessor where the real call would, and the processor's copies and
reshapes run unchanged.

``FakeXformers.memory_efficient_attention`` does what xformers 0.0.35's forward without grad
does with diffusers' BMK tensors (xformers/ops/fmha/__init__.py
_memory_efficient_attention_forward): Inputs.normalize_bmhk (3-D -> unsqueeze(2), views),
the dispatch (sd_vram.formula.kernels.xformers_forward_op: the equation reads the same
table), the PyTorch kernel the op calls with the arguments it passes (flash.FwOp.apply:
aten._flash_attention_forward; cutlass.FwOp.apply_bmhk: aten._efficient_attention_forward
with compute_log_sumexp=False), whose meta kernels allocate the output and log-sum-exp, and
the kernel-internal scratch as synthetic events, as sdpa.py does for SDPA: flash's fp32
split-KV buffers when it splits, memory-efficient's fp32 output accumulator for fp16 head
dims > 128, each allocated after the kernel's outputs and freed when the op returns. Then
out.reshape(output_shape), a view. Imports torch, diffusers and sd_vram.formula.
"""

from __future__ import annotations

import contextlib
import types

import torch

from sd_vram.formula import kernels

from .patches import patch_attr

_aten = torch.ops.aten


class FakeXformers:
    """The ``xformers`` module as diffusers uses it (``xformers.ops.memory_efficient_attention``)."""

    def __init__(self, profile, recorder=None):
        self.profile, self.recorder = profile, recorder
        self.ops = types.SimpleNamespace(memory_efficient_attention=self.memory_efficient_attention)
        self.__version__ = kernels.XFORMERS_VERSION
        self.choices: dict[tuple, str] = {}    # (model, q shape, k shape, bias) -> op, like SDPAPatcher's

    def memory_efficient_attention(self, query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
                                   output_dtype=None):
        output_shape = tuple(query.shape[:-1]) + (value.shape[-1],)
        if query.ndim == 3:                         # normalize_bmhk: the legacy BMK format
            query, key, value = query.unsqueeze(2), key.unsqueeze(2), value.unsqueeze(2)
        if query.ndim != 4 or op is not None or output_dtype is not None:
            raise NotImplementedError("the simulation's xformers takes BMK/BMHK tensors and xformers' own dispatch")
        b, m, h, d = query.shape
        choice = kernels.xformers_forward_op(self.profile, d, str(query.dtype).replace("torch.", ""),
                                             bias=attn_bias is not None, batch_heads=b * h, q_len=m,
                                             kv_len=key.size(1))
        if choice is None or (attn_bias is not None and choice.kernel == kernels.FLASH):
            raise NotImplementedError(f"No operator found for `memory_efficient_attention_forward` "
                                      f"(head dim {d}, {query.dtype})")
        self._note(choice, query, key, attn_bias)
        scale = d ** -0.5 if scale is None else scale
        rec = self.recorder
        scratch = self._scratch(choice, b * h, m, d, str(query.dtype).replace("torch.", ""))
        keys = []

        def add_scratch(func, args, kwargs, out):
            if func in (_aten._flash_attention_forward.default, _aten._efficient_attention_forward.default) \
                    and not keys:
                keys.extend(rec.synthetic_alloc(n, name, shape, "float32") for name, shape, n in scratch)

        if rec is not None and scratch:
            rec.post_op_hooks.append(add_scratch)
        try:
            if choice.kernel == kernels.FLASH:
                out = _aten._flash_attention_forward(query, key, value, None, None, m, key.size(1), p, False, False,
                                                     scale=scale, window_size_left=-1, window_size_right=-1)[0]
            else:
                out = _aten._efficient_attention_forward(query, key, value, attn_bias, None, None, None, None, p, 0,
                                                         compute_log_sumexp=False, scale=scale)[0]
        finally:
            if rec is not None and scratch:
                rec.post_op_hooks.remove(add_scratch)
                for k in keys:                      # freed when the kernel returns
                    rec.synthetic_free(k)
        return out.reshape(output_shape)

    def _scratch(self, choice: kernels.XformersOp, batch_heads: int, m: int, d: int, dtype: str) -> list:
        """(name, shape, bytes) of the fp32 buffers the kernel allocates inside (module docstring)."""
        if choice.kernel == kernels.FLASH:
            if choice.splits <= 1:
                return []
            lse = (choice.splits, batch_heads, 1, m)
            acc = (choice.splits, batch_heads, 1, m, kernels.flash_head_dim_rounded(d))
            return [("flash_attn:softmax_lse_accum", lse, 4 * _numel(lse)),
                    ("flash_attn:out_accum", acc, 4 * _numel(acc))]
        if kernels.efficient_output_accumulator(dtype, d, d):
            acc = (batch_heads, m, 1, d)
            return [("efficient_attn:output_accum", acc, 4 * _numel(acc))]
        return []

    def _note(self, choice, q, k, bias):
        """Keyed as SDPAPatcher keys its choices (q and k as batch, heads, tokens, head dim);
        diffusers' test call, outside any model, is left out."""
        module = self.recorder.module if self.recorder is not None else ""
        if module:
            key = (module.split(".")[0], tuple(q.transpose(1, 2).shape), tuple(k.transpose(1, 2).shape))
            self.choices[(*key, bias is not None)] = str(choice)


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


@contextlib.contextmanager
def patched_xformers(fake: FakeXformers):
    """diffusers sees `fake` as an installed xformers for as long as this lasts (module docstring)."""
    from diffusers.models import attention_processor

    with contextlib.ExitStack() as es:
        es.enter_context(patch_attr(attention_processor, "xformers", fake))
        es.enter_context(patch_attr(attention_processor, "is_xformers_available", lambda: True))
        yield fake


def enable_xformers(pipe, fake: FakeXformers) -> None:
    """diffusers' own pipe.enable_xformers_memory_efficient_attention(), its CUDA check answered
    as on a GPU; its test call runs on the fake (a 512-B small-pool block on a GPU, outside the
    recorded call)."""
    with patch_attr(torch.cuda, "is_available", lambda: True):
        pipe.enable_xformers_memory_efficient_attention()
