"""The tensors alive at each stage's peak operation, from the architecture (DERIVATION.md, sections 4-7).

Every term is a tensor the diffusers/transformers code holds at that moment, named after the
module that made it, with its shape; bytes are rounded as the CUDA caching allocator rounds a
request (512 B). Shapes use H, W (rounded to multiples of 8), h = H/8, w = W/8, the image
batch n (num_images_per_prompt) and the UNet batch B = n x (2 with classifier-free guidance).

A stage usually has a few candidate peak points (a full-resolution resnet, an attention
score matrix, a feed-forward expansion, a convolution's workspace); the stage peak is the
largest. Components: "activations" (feature maps), "attention" (score matrices and fused
attention scratch), "workspace" (library scratch alive at the operation), "state" (what the
pipeline carries between stages: prompt embeddings, latents, scheduler history, images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil, prod

from . import architecture as arch
from .allocator import block_bytes
from .kernels import (FLASH, ConvWorkspace, Layouts, XformersOp, conv_rules, efficient_output_accumulator,
                      flash_head_dim_rounded)
from .options import DTYPE_ITEMSIZE, DTYPE_TORCH_NAME

FP16, FP32 = 2, 4


def nbytes(*shape: int, itemsize: int = FP16) -> int:
    """Bytes the allocator hands out for one tensor of this shape (allocator.block_bytes)."""
    return block_bytes(prod(shape) * itemsize)


@dataclass
class Peak:
    """The live set at one candidate peak operation."""

    operation: str
    terms: list[tuple[str, str, int]] = field(default_factory=list)  # (component, tensor, bytes)

    def add(self, component: str, name: str, size: int, count: int = 1) -> "Peak":
        for i in range(count):
            self.terms.append((component, name if count == 1 else f"{name}[{i}]", size))
        return self

    @property
    def total(self) -> int:
        return sum(b for _, _, b in self.terms)

    def components(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for comp, _, b in self.terms:
            out[comp] = out.get(comp, 0) + b
        return out


@dataclass(frozen=True)
class Shape:
    """Sizes of one call: image, latent, batches, and the UNet's level sizes; `model` holds the
    architecture's channel, head and token counts (architecture.spec(config))."""

    H: int
    W: int
    n: int          # images per prompt (VAE decode batch)
    B: int          # UNet batch
    cfg: bool
    dtype: str = "fp16"   # the pipeline's torch_dtype (Options.dtype)
    model: arch.Spec = arch.spec()
    layouts: Layouts = Layouts()   # the feature maps' layout copies (Options.channels_last)

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def torch_dtype(self) -> str:
        """torch's name of the dtype ("float16"), as kernels.SdpaCall takes it."""
        return DTYPE_TORCH_NAME[self.dtype]

    def bytes(self, *shape: int) -> int:
        """nbytes of a tensor of the pipeline's dtype."""
        return nbytes(*shape, itemsize=self.itemsize)

    @property
    def h(self):
        return self.H // self.model.vae_scale_factor

    @property
    def w(self):
        return self.W // self.model.vae_scale_factor

    def level(self, i: int) -> tuple[int, int]:
        """UNet feature size at level i: each stride-2 conv (padding 1) gives ceil(x / 2)."""
        h, w = self.h, self.w
        for _ in range(i):
            h, w = ceil(h / 2), ceil(w / 2)
        return h, w


# --- state the pipeline carries -------------------------------------------------------------

def prompt_state(s: Shape) -> Peak:
    """encode_prompt: prompt_embeds.repeat(1, n, 1) per prompt; with CFG __call__ keeps
    negative_prompt_embeds and the cat([negative, prompt]) it feeds the UNet."""
    p, tokens, dim = Peak("prompt embeddings"), s.model.text_tokens, s.model.text_dim
    if s.cfg:
        p.add("state", "negative_prompt_embeds", s.bytes(s.n, tokens, dim))
        p.add("state", "prompt_embeds (cat)", s.bytes(2 * s.n, tokens, dim))
    else:
        p.add("state", "prompt_embeds", s.bytes(s.n, tokens, dim))
    return p


def latent_state(s: Shape, history: int, what: str = "scheduler history (ets, cur_sample)",
                 noise_pred: int = 0) -> Peak:
    """latents (n,4,h,w) and `history` more latent-sized tensors the scheduler keeps (`what`:
    PNDM's ets and cur_sample, DPM-Solver's model_outputs, ...: schedulers.py), and
    `noise_pred` (0 or 1) for __call__'s last guided prediction where no history holds it."""
    p, z = Peak("latents"), s.model.latent_channels
    p.add("state", "latents", s.bytes(s.n, z, s.h, s.w))
    if history:
        p.add("state", what, s.bytes(s.n, z, s.h, s.w), history)
    if noise_pred:
        p.add("state", "noise_pred of the last step (__call__'s local)", s.bytes(s.n, z, s.h, s.w))
    return p


NHWC_COPY = "NHWC copy of the conv input (channels_last)"


def nhwc_input_copy(s: Shape, p: Peak, size: int) -> None:
    """A convolution after GroupNorm and SiLU with channels-last weights where GroupNorm writes
    NCHW (kernels.Layouts.norm_copies): its input is copied to NHWC first."""
    if s.layouts.norm_copies:
        p.add("activations", NHWC_COPY, size)


def upsample_copies(layouts: Layouts, batch: int, c: int, h: int, w: int) -> bool:
    """diffusers' Upsample2D.forward (models/upsampling.py) calls ``hidden_states.contiguous()``
    for a batch of 64 or more, and where the interpolated map would exceed 2^31 elements
    (``numel() * scale_factor > 2 ** 31``, scale 2). With channels-last weights that copies the
    NHWC input to NCHW, the interpolation writes NCHW and the conv copies it back to NHWC."""
    return layouts.channels_last and (batch >= 64 or batch * c * h * w * 2 > 2 ** 31)


def merge(*peaks: Peak, operation: str | None = None) -> Peak:
    out = Peak(operation or peaks[-1].operation)
    for p in peaks:
        out.terms.extend(p.terms)
    return out


# --- attention -------------------------------------------------------------------------------

def attention_scratch(backend: str, batch: int, heads: int, tokens: int, head_dim: int, kv_tokens: int | None = None,
                      dtype: str = "fp16") -> Peak:
    """What one attention call allocates besides its output, at its own peak.

    math: PyTorch's math kernel upcasts fp16 and bf16 q, k, v to fp32
    (allow_fp16_bf16_reduction_math_sdp is off by default; fp32 inputs are used as they are),
    scales q, and holds the fp32 score matrix and its softmax together, with _safe_softmax's
    boolean mask of the same shape.
    flash: the kernel also returns a fp32 log-sum-exp (batch, heads, tokens).
    efficient: for head_dim > 128 in fp16 or bf16 the kernel keeps a fp32 output accumulator.
    cudnn: no extra tensor in inference.
    """
    kv = kv_tokens or tokens
    p = Peak(f"sdpa[{backend}]")
    if backend == "math":
        if dtype != "fp32":
            p.add("attention", "q upcast to fp32", nbytes(batch, heads, tokens, head_dim, itemsize=FP32))
            p.add("attention", "k, v upcast to fp32", nbytes(batch, heads, kv, head_dim, itemsize=FP32), 2)
        p.add("attention", "q * scale", nbytes(batch, heads, tokens, head_dim, itemsize=FP32))
        p.add("attention", "scores q@k^T (fp32)", nbytes(batch * heads, tokens, kv, itemsize=FP32))
        p.add("attention", "softmax(scores) (fp32)", nbytes(batch, heads, tokens, kv, itemsize=FP32))
        # _safe_softmax zeroes rows that are all -inf: its eq(-inf) mask is a bool tensor the
        # size of the scores, alive with them (the H200/H100 math cases: UNet at 256x256 and
        # the safety checker; the simulation of torch's decomposition agrees).
        p.add("attention", "_safe_softmax -inf row mask (bool)", nbytes(batch * heads, tokens, kv, itemsize=1))
    elif backend == "flash":
        p.add("attention", "softmax log-sum-exp (fp32)", nbytes(batch, heads, tokens, itemsize=FP32))
    elif backend == "efficient" and efficient_output_accumulator(DTYPE_TORCH_NAME[dtype], head_dim, head_dim):
        p.add("workspace", "fp32 output accumulator", nbytes(batch, tokens, heads, head_dim, itemsize=FP32))
    return p


def sliced_attention_scratch(batch: int, heads: int, tokens: int, kv: int, slice_size: int,
                             dtype: str = "fp16") -> Peak:
    """diffusers SlicedAttnProcessor (enable_attention_slicing): baddbmm + softmax in the
    pipeline's dtype over `slice_size` of the batch x heads rows at a time; SDPA is not used."""
    rows, item = min(slice_size, batch * heads), DTYPE_ITEMSIZE[dtype]
    p = Peak("sliced attention")
    p.add("attention", f"scores slice ({dtype})", nbytes(rows, tokens, kv, itemsize=item))
    p.add("attention", f"softmax slice ({dtype})", nbytes(rows, tokens, kv, itemsize=item))
    return p


# --- stages ----------------------------------------------------------------------------------

FF_MULT = 4                           # GEGLU (BasicTransformerBlock's default): proj to 2 x 4C, gelu(gate) and product at 4C


def slice_rows(slicing, heads: int) -> int | None:
    """diffusers set_attention_slice: "auto" = heads // 2, "max" = 1, an int as given."""
    if slicing is None:
        return None
    return {"auto": heads // 2, "max": 1}.get(slicing, slicing)


def unet_last_up_block_input(s: Shape, operation: str) -> Peak:
    """What is alive while the last up block (level 0) runs: the UNet's input and time
    embedding, the level-0 skips its res_samples tuple holds, the block's input (the UNet's
    `sample`, from the up block before's upsampler)."""
    m = s.model
    h, w = s.level(0)
    B, C, last = s.B, m.unet_channels[0], len(m.unet_channels) - 1
    p = Peak(operation)
    p.add("state", "latent_model_input (cat)", s.bytes(B, m.unet_in_channels, h, w))
    p.add("state", "time embedding emb", s.bytes(B, m.time_embed_dim))
    p.add("activations", "level-0 skips (conv_in, down_blocks.0.attentions.0/1)", s.bytes(B, C, h, w),
          m.unet_layers + 1)
    p.add("activations", f"up_blocks.{last} input (up_blocks.{last - 1} upsampler conv)",
          s.bytes(B, m.unet_channels[1], h, w))
    return p


def unet_level0_transformer_input(s: Shape) -> Peak:
    """unet_last_up_block_input as its first transformer starts: with the transformer's
    residual (resnets[0]'s output) and proj_in's output."""
    m = s.model
    h, w = s.level(0)
    B, C = s.B, m.unet_channels[0]
    base = unet_last_up_block_input(s, f"up_blocks.{len(m.unet_channels) - 1}.attentions.0")
    base.add("activations", "resnets.0 output (transformer residual)", s.bytes(B, C, h, w))
    base.add("activations", "proj_in output", s.bytes(B, C, h, w))
    return base


def unet_level0_feed_forward_input(s: Shape, operation: str) -> Peak:
    """unet_level0_transformer_input as its first block's feed-forward starts: with what
    BasicTransformerBlock.forward holds there (attn_output of attn2, hidden_states after its
    residual, norm3's output, the feed-forward's input)."""
    h, w = s.level(0)
    B, N, C = s.B, h * w, s.model.unet_channels[0]
    p = merge(unet_level0_transformer_input(s), Peak(operation))
    p.add("activations", "attn2 output (/ rescale_output_factor)", s.bytes(B, N, C))
    p.add("activations", "hidden_states after attn2 residual", s.bytes(B, N, C))
    p.add("activations", "norm3 output", s.bytes(B, N, C))
    return p


def unet(s: Shape, backend: str, slicing=None, ws_rule=None) -> list[Peak]:
    """One UNet evaluation. The peak sits in the last up block (level 0, N = h*w tokens; SD1.5:
    up_blocks[3]): the layers + 1 level-0 skips (conv_in, down_blocks[0]'s attentions) are
    still held by the UNet's res_samples tuple, the block's input (channels[1], from the
    up block before's upsampler) by the UNet's `sample`, and the transformer's residual
    (resnets[0] output) and proj_in output by Transformer2DModel.forward."""
    m = s.model
    h, w = s.level(0)
    N, B, C, heads, last = h * w, s.B, m.unet_channels[0], m.unet_heads, len(m.unet_channels) - 1
    peaks = [unet_up_conv(s, i, ws_rule) for i in range(min(2, last))]
    if not m.unet_up_attention[last]:
        return peaks
    base = unet_level0_transformer_input(s)

    ff = unet_level0_feed_forward_input(s, "transformer_blocks.0.ff GEGLU: gelu(gate) * hidden")
    ff.add("activations", "ff.net.0.proj output (2 x 4C)", s.bytes(B * N, 2 * FF_MULT * C))
    ff.add("activations", "gelu(gate)", s.bytes(B, N, FF_MULT * C))
    ff.add("activations", "hidden * gelu(gate)", s.bytes(B, N, FF_MULT * C))

    attn = merge(base, Peak("transformer_blocks.0.attn1 (self-attention)"))
    attn.add("activations", "norm1 output", s.bytes(B, N, C))
    rows = slice_rows(slicing, heads)
    if not getattr(ws_rule, "elastic", True):     # cuDNN off: the level-0 im2col columns
        peaks.append(unet_level0_conv(s, ws_rule))
    if rows is None and isinstance(backend, XformersOp):
        return [ff, *xformers_self_attention(attn, backend, B, heads, N, C // heads)] + peaks
    if rows is None:
        attn.add("activations", "q, k, v projections", s.bytes(B * N, C), 3)
        if backend != "math":
            attn.add("activations", "sdpa output", s.bytes(B, N, heads, C // heads))
        attn = merge(attn, attention_scratch(backend, B, heads, N, C // heads, dtype=s.dtype))
    else:
        attn.add("activations", "q, k, v as (B*heads, N, d)", s.bytes(B * heads, N, C // heads), 3)
        attn.add("activations", "sliced output buffer (zeros)", s.bytes(B * heads, N, C // heads))
        attn = merge(attn, sliced_attention_scratch(B, heads, N, N, rows, dtype=s.dtype))
    attn.operation = f"{attn.operation}: {attn.terms[-1][1]}"
    return [ff, attn] + peaks


def unet_level0_conv(s: Shape, ws) -> Peak:
    """The last up block's resnets[0].conv1 at level 0 (SD1.5: up_blocks[3], 960 -> 320, 3x3)
    with cuDNN off: the layers + 1 level-0 skips (the UNet's res_samples tuple), the block input
    (the UNet's `sample`), cat(sample, skip), its SiLU, the conv output, and the im2col columns
    of one batch element (C_in x 9 x N: without CFG they outweigh the feed-forward)."""
    m = s.model
    h, w = s.level(0)
    B, C, last = s.B, m.unet_channels[0], len(m.unet_channels) - 1
    c_in = m.unet_channels[1] + C
    p = unet_last_up_block_input(s, f"up_blocks.{last}.resnets.0.conv1 ({c_in} -> {C}, 3x3, level 0)")
    p.add("activations", f"cat(sample, skip) ({c_in} ch)", s.bytes(B, c_in, h, w))
    p.add("activations", f"silu(norm1(x)) ({c_in} ch)", s.bytes(B, c_in, h, w))
    p.add("activations", f"conv1 output ({C} ch)", s.bytes(B, C, h, w))
    cols = conv_workspace(ws, f"unet.up_blocks.{last}.resnets.0.conv1", 3, (B, c_in, h, w), s.bytes(B, c_in, h, w),
                          s.bytes(B, C, h, w), c_in * C * 9 * s.itemsize)
    if cols:
        p.add("workspace", workspace_term(ws), cols)
    return p


def unet_up_conv(s: Shape, block: int, ws_rule) -> Peak:
    """up_blocks[block].resnets[0].conv1 at level (levels - 1 - block) (SD1.5: 2560 -> 1280,
    3x3): its filter alone is 59 MB, and cuDNN's workspace holds a transposed copy (in + out +
    filter), so at small images this convolution is the UNet's peak. Alive: the down path's
    skips less `layers` per earlier up block (its res_samples slice takes `layers + 1`; the
    SD1.5 live set has always counted one of them as still held, a map at that block's level,
    small, and the simulation agrees within the bands), the UNet's `sample`, the resnet's
    input cat(sample, skip) and SiLU output, the conv output."""
    m = s.model
    B, ch = s.B, m.unet_channels
    lvl = len(ch) - 1 - block
    down = m.unet_skips()
    skips = down[:len(down) - block * m.unet_layers]
    c_sample = ch[-1] if block == 0 else ch[::-1][block - 1]     # the mid block's or the up block before's
    c_skip = down[len(down) - block * (m.unet_layers + 1) - 1][1]   # what resnets[0] concatenates
    c_in, c_out = c_sample + c_skip, ch[lvl]
    p = Peak(f"up_blocks.{block}.resnets.0.conv1 ({c_in} -> {c_out}, 3x3, level {lvl})")
    p.add("state", "latent_model_input (cat)", s.bytes(B, m.unet_in_channels, s.h, s.w))
    p.add("state", "time embedding emb", s.bytes(B, m.time_embed_dim))
    for level, c in skips:
        p.add("activations", f"skip ({c} ch, level {level})", s.bytes(B, c, *s.level(level)))
    hl, wl = s.level(lvl)
    p.add("activations", f"UNet sample ({c_sample} ch)", s.bytes(B, c_sample, hl, wl))
    p.add("activations", f"cat(sample, skip) ({c_in} ch)", s.bytes(B, c_in, hl, wl))
    p.add("activations", f"silu(norm1(x)) ({c_in} ch)", s.bytes(B, c_in, hl, wl))
    nhwc_input_copy(s, p, s.bytes(B, c_in, hl, wl))
    p.add("activations", f"conv1 output ({c_out} ch)", s.bytes(B, c_out, hl, wl))
    ws = conv_workspace(ws_rule, f"unet.up_blocks.{block}.resnets.0.conv1", 3, (B, c_in, hl, wl),
                        s.bytes(B, c_in, hl, wl), s.bytes(B, c_out, hl, wl), c_in * c_out * 9 * s.itemsize)
    if ws:
        p.add("workspace", workspace_term(ws_rule), ws)
    return p


VAE_TILE_OVERLAP = 0.25                 # AutoencoderKL.tile_overlap_factor


def _vae_tile_sizes(s: Shape) -> tuple[int, int]:
    """AutoencoderKL.tile_sample_min_size (config sample_size, 512) and tile_latent_min_size."""
    tile = s.model.vae_sample_size
    return tile, tile // s.model.vae_scale_factor


def _vae_mid_attention(s: Shape, b: int, h: int, w: int, backend: str, where: str) -> Peak:
    """Mid-block Attention over N = h*w tokens (one head over the deepest channels, SD1.5: 512):
    the block input (held by the caller), the resnet output (residual), group_norm output,
    q, k, v, and the attention kernel's own."""
    N, C = h * w, s.model.vae_channels[-1]
    p = Peak(f"{where}.mid_block.attentions.0")
    p.add("activations", "mid-block input, resnets.0 output", s.bytes(b, C, h, w), 2)
    p.add("activations", "group_norm output", s.bytes(b, C, N))
    p.add("activations", "q, k, v projections", s.bytes(b * N, C), 3)
    if isinstance(backend, XformersOp):   # one head: head_to_batch_dim and batch_to_head_dim are views
        return merge(p, xformers_kernel(backend, b, N, C), operation=f"{p.operation}: {backend}")
    if backend != "math":
        p.add("activations", "sdpa output", s.bytes(b, N, 1, C))
    return merge(p, attention_scratch(backend, b, 1, N, C, dtype=s.dtype), operation=f"{p.operation}: sdpa[{backend}]")


def vae_decode_full(s: Shape, b: int, H: int, W: int) -> Peak:
    """Decoder's last up block's resnets[0] (SD1.5: up_blocks[3], 256 -> 128 channels at full
    resolution), at its SiLU: the block input (the up block before's upsampled conv output,
    held by Decoder.forward's `sample`), norm1's output and the SiLU's output are three
    channels[1] full-resolution maps."""
    ch, last = s.model.vae_channels, len(s.model.vae_channels) - 1
    p = Peak(f"decoder.up_blocks.{last}.resnets.0: silu(norm1(x))")
    x = s.bytes(b, ch[1], H, W)
    p.add("activations", f"decoder.up_blocks.{last - 1} upsampler output ({ch[1]} ch, full res)", x)
    p.add("activations", f"norm1 output ({ch[1]} ch, full res)", x)
    p.add("activations", f"silu output ({ch[1]} ch, full res)", x)
    return p


def conv_workspace(ws, module: str, kernel: int, input_shape, in_bytes: int, out_bytes: int,
                   weight_bytes: int, output_shape=None) -> int:
    """cuDNN's workspace for one convolution: ``ws`` is the GPU profile's
    kernels.ConvWorkspace (measured shapes, else the rule set, e.g. "nchw_transpose": input +
    output + filter bytes for the VAE's 3x3 convs; see formula/kernels.py), a rule set's name,
    or None."""
    if isinstance(ws, str):
        ws = ConvWorkspace(conv_rules(ws))
    if not ws:
        return 0
    if getattr(ws, "elastic", True):        # cuDNN's workspace: its rules need no output shape
        return ws(module, kernel, input_shape, in_bytes, out_bytes, weight_bytes)
    return ws(module, kernel, input_shape, in_bytes, out_bytes, weight_bytes, output_shape=output_shape)


def workspace_term(ws) -> str:
    """The live-set name of a convolution's kernel-internal allocation: cuDNN's workspace, or
    with cuDNN off PyTorch's im2col columns (kernels.NativeConv)."""
    return getattr(ws, "term", ConvWorkspace.term)


def vae_decode_upsampler(s: Shape, b: int, H: int, W: int, ws_rule) -> Peak:
    """The upsampler into full resolution (SD1.5: up_blocks[2]'s): nearest x2, then a
    channels[1] 3x3 conv. Alive: Decoder.forward's `sample` (the up block before's output,
    channels[2] at H/2), the block's hidden state (channels[1] at H/2), the interpolated input
    and the conv output (full res), and cuDNN's workspace (or, channels-last, upsample_copies'
    NHWC copy of the interpolated map)."""
    m = s.model
    ch, blk = m.vae_channels, len(m.vae_channels) - 2
    c = ch[1]
    p = Peak(f"decoder.up_blocks.{blk}.upsamplers.0.conv ({c} -> {c}, 3x3, full res)")
    full = s.bytes(b, c, H, W)
    p.add("activations", f"decoder.up_blocks.{blk - 1} output ({ch[2]} ch, H/2)", s.bytes(b, ch[2], H // 2, W // 2))
    p.add("activations", f"up_blocks.{blk}.resnets.{m.vae_layers} output ({c} ch, H/2)", s.bytes(b, c, H // 2, W // 2))
    p.add("activations", f"interpolate(x, 2) ({c} ch, full res)", full)
    if upsample_copies(s.layouts, b, c, H // 2, W // 2):
        p.add("activations", NHWC_COPY, full)
    p.add("activations", f"conv output ({c} ch, full res)", full)
    ws = conv_workspace(ws_rule, f"vae.decoder.up_blocks.{blk}.upsamplers.0.conv", 3, (b, c, H, W),
                        full, full, c * c * 9 * s.itemsize)
    if ws:
        p.add("workspace", workspace_term(ws_rule), ws)
    return p


def _tiles(size: int, stride: int, tile: int) -> list[int]:
    return [min(tile, size - i) for i in range(0, size, stride)]


def vae_tile(s: Shape, tiling: bool, latent: bool) -> tuple[int, int]:
    """(height, width) in pixels that one VAE pass works on: the whole image, or with
    enable_vae_tiling() and an image larger than a tile, the largest tile."""
    tile, _ = _vae_tile_sizes(s)
    if not tiling or (s.H <= tile and s.W <= tile):
        return s.H, s.W
    stride = int(tile * (1 - VAE_TILE_OVERLAP))
    return max(_tiles(s.H, stride, tile)), max(_tiles(s.W, stride, tile))


def vae_decode_conv1(s: Shape, b: int, H: int, W: int, ws_rule) -> Peak:
    """The last up block's resnets[0].conv1 (SD1.5: up_blocks[3], 256 -> 128, 3x3, full res):
    the block input, the SiLU output it convolves (channels[1]), the conv output (channels[0])
    and cuDNN's workspace."""
    ch, last = s.model.vae_channels, len(s.model.vae_channels) - 1
    c_in, c_out = ch[1], ch[0]
    p = Peak(f"decoder.up_blocks.{last}.resnets.0.conv1 ({c_in} -> {c_out}, 3x3, full res)")
    x, y = s.bytes(b, c_in, H, W), s.bytes(b, c_out, H, W)
    p.add("activations", f"decoder.up_blocks.{last - 1} upsampler output ({c_in} ch, full res)", x)
    p.add("activations", f"silu(norm1(x)) ({c_in} ch, full res)", x)
    nhwc_input_copy(s, p, x)
    p.add("activations", f"conv1 output ({c_out} ch, full res)", y)
    ws = conv_workspace(ws_rule, f"vae.decoder.up_blocks.{last}.resnets.0.conv1", 3, (b, c_in, H, W),
                        x, y, c_out * c_in * 9 * s.itemsize)
    if ws:
        p.add("workspace", workspace_term(ws_rule), ws)
    return p


def _vae_decode_at(s: Shape, b: int, H: int, W: int, ws_rule) -> list[Peak]:
    return [vae_decode_full(s, b, H, W), vae_decode_upsampler(s, b, H, W, ws_rule), vae_decode_conv1(s, b, H, W, ws_rule)]


def vae_decode(s: Shape, backend: str, slicing: bool, tiling: bool, ws_rule=None) -> list[Peak]:
    h, w = s.h, s.w
    b = 1 if slicing else s.n
    m = s.model
    z, rgb, f = m.latent_channels, m.vae_out_channels, m.vae_scale_factor
    _, tile_latent = _vae_tile_sizes(s)
    state = Peak("decode inputs")
    state.add("state", "latents / scaling_factor", s.bytes(s.n, z, h, w))
    state.add("state", "post_quant_conv output", s.bytes(b, z, h, w))
    if slicing and s.n > 1:  # decoded slices wait in a list for torch.cat
        state.add("state", "decoded images of earlier slices", s.bytes(1, rgb, s.H, s.W), s.n - 1)
    peaks = []
    if tiling and (h > tile_latent or w > tile_latent):
        stride = int(tile_latent * (1 - VAE_TILE_OVERLAP))
        rows, cols = _tiles(h, stride, tile_latent), _tiles(w, stride, tile_latent)
        stored = sum(s.bytes(b, rgb, f * th, f * tw) for th in rows for tw in cols)
        th, tw = max(rows), max(cols)
        # The largest tile is decoded while (at most) all other decoded tiles wait in `rows`.
        for tile_peak in _vae_decode_at(s, b, f * th, f * tw, ws_rule):
            p = merge(state, tile_peak, operation=f"tiled_decode, largest tile: {tile_peak.operation}")
            p.add("state", "decoded tiles waiting for blending", stored - s.bytes(b, rgb, f * th, f * tw))
            peaks.append(p)
        end = merge(state, Peak("tiled_decode: torch.cat of blended rows"))
        end.add("state", "decoded tiles", stored)
        end.add("state", "blended rows (cat)", s.bytes(b, rgb, s.H, s.W))
        end.add("state", "decoded image (cat)", s.bytes(b, rgb, s.H, s.W))
        peaks.append(end)
        mid_hw = (th, tw)
    else:
        peaks += [merge(state, p) for p in _vae_decode_at(s, b, s.H, s.W, ws_rule)]
        mid_hw = (h, w)
    peaks.append(merge(state, _vae_mid_attention(s, b, *mid_hw, backend, "decoder")))
    return peaks


def _vae_encode_residual(s: Shape) -> list[str]:
    """The encoder's first block's last resnet (SD1.5: down_blocks[0].resnets[1]) has as
    input the resnet before's output, held as its residual; with one layer that input is
    conv_in's output itself."""
    L = s.model.vae_layers
    return [f"resnets.{L - 2} output"] if L >= 2 else []


def _vae_encode_held(s: Shape, p: Peak, full: int) -> None:
    """What the encoder's first block holds at its last resnet: conv_in's output (Encoder.forward's
    `sample`) and the resnet before's output (the residual), each a channels[0] full-res map."""
    p.add("activations", f"conv_in output ({s.model.vae_channels[0]} ch, full res)", full)
    for name in _vae_encode_residual(s):
        p.add("activations", name, full)


def _vae_encode_last_resnet(s: Shape, H: int, W: int, operation: str, *maps: str) -> tuple[Peak, int]:
    """The encoder's first block's last resnet: what the block holds (_vae_encode_held) and `maps`,
    each a channels[0] full-res map; returns the live set and that map's bytes."""
    full = s.bytes(1, s.model.vae_channels[0], H, W)
    p = Peak(operation)
    _vae_encode_held(s, p, full)
    for name in maps:
        p.add("activations", name, full)
    return p, full


def vae_encode_full(s: Shape, H: int, W: int) -> Peak:
    """Encoder down_blocks[0]'s last resnet (SD1.5: resnets[1]) at its output division by
    output_scale_factor: conv_in's output (held by Encoder.forward's `sample`), the resnet
    before's output (the residual), conv2's output, the residual sum and the quotient: five
    channels[0] full-resolution maps."""
    return _vae_encode_last_resnet(
        s, H, W, f"encoder.down_blocks.0.resnets.{s.model.vae_layers - 1}: (x + conv2) / output_scale_factor",
        "conv2 output", "x + conv2", "(x + conv2) / 1.0")[0]


def vae_encode_conv(s: Shape, H: int, W: int, ws_rule) -> Peak:
    """Encoder down_blocks[0]'s last resnet's conv2 (SD1.5: resnets[1], 128 -> 128, 3x3, full
    res): conv_in's output, the resnet before's output (the residual), the SiLU output it
    convolves (and its NHWC copy, nhwc_input_copy) and the conv output are alive, with cuDNN's
    workspace."""
    c, j = s.model.vae_channels[0], s.model.vae_layers - 1
    p, full = _vae_encode_last_resnet(s, H, W, f"encoder.down_blocks.0.resnets.{j}.conv2 ({c} -> {c}, 3x3, full res)",
                                      "silu(norm2(.)) (conv input)")
    nhwc_input_copy(s, p, full)
    p.add("activations", "conv2 output", full)
    ws = conv_workspace(ws_rule, f"vae.encoder.down_blocks.0.resnets.{j}.conv2", 3, (1, c, H, W),
                        full, full, c * c * 9 * s.itemsize)
    if ws:
        p.add("workspace", workspace_term(ws_rule), ws)
    return p


def vae_encode_norm(s: Shape, H: int, W: int) -> Peak:
    """With channels-last weights where GroupNorm copies (kernels.Layouts.norm_copies): the
    encoder's first block's last resnet at norm2: conv_in's output, the resnet before's output, conv1's (NHWC)
    output, GroupNorm's NCHW copy of it and its output, five channels[0] full-res maps, with
    the group statistics (mean, rstd: 1 x groups each)."""
    p, _ = _vae_encode_last_resnet(
        s, H, W, f"encoder.down_blocks.0.resnets.{s.model.vae_layers - 1}.norm2 (GroupNorm of an NHWC map)",
        "conv1 output (NHWC)", "its NCHW copy (native_group_norm: X.contiguous())", "norm2 output")
    p.add("activations", "mean, rstd", s.bytes(1, s.model.vae_norm_groups), 2)
    return p


def _vae_encode_at(s: Shape, H: int, W: int, ws_rule) -> list[Peak]:
    peaks = [vae_encode_full(s, H, W), vae_encode_conv(s, H, W, ws_rule)]
    return peaks + ([vae_encode_norm(s, H, W)] if s.layouts.norm_copies else [])


def vae_encode(s: Shape, backend: str, tiling: bool, ws_rule=None) -> list[Peak]:
    """The image is encoded once (batch 1); latents are repeated for n images afterwards."""
    m = s.model
    f, tile = m.vae_scale_factor, m.vae_sample_size
    state = Peak("encode input")
    state.add("state", f"image on the GPU ({s.dtype})", s.bytes(1, m.vae_in_channels, s.H, s.W))
    if tiling and (s.H > tile or s.W > tile):
        stride = int(tile * (1 - VAE_TILE_OVERLAP))
        rows, cols = _tiles(s.H, stride, tile), _tiles(s.W, stride, tile)
        th, tw = max(rows), max(cols)
        moments = sum(s.bytes(1, 2 * m.latent_channels, r // f, c // f) for r in rows for c in cols)
        out = []
        for tile_peak in _vae_encode_at(s, th, tw, ws_rule):
            p = merge(state, tile_peak, operation=f"tiled_encode, largest tile: {tile_peak.operation}")
            p.add("state", "encoded tiles (moments)", moments)
            out.append(p)
        return out + [merge(state, _vae_mid_attention(s, 1, th // f, tw // f, backend, "encoder"))]
    return ([merge(state, p) for p in _vae_encode_at(s, s.H, s.W, ws_rule)]
            + [merge(state, _vae_mid_attention(s, 1, s.h, s.w, backend, "encoder"))])


def clip_mlp_input(s: Shape, batch: int, tokens: int, d: int, p: Peak) -> Peak:
    """`p` with what a CLIP encoder layer after the first holds as its MLP runs: the residual
    stream and the layer input held by the caller, layer_norm2's output."""
    p.add("activations", "residual stream", s.bytes(batch, tokens, d), 2)
    p.add("activations", "layer_norm2 output", s.bytes(batch, tokens, d))
    return p


def _clip_layer(s: Shape, batch: int, tokens: int, d: int, mlp: int, heads: int, backend: str, where: str) -> list[Peak]:
    """A CLIP encoder layer after the first: the residual stream and the layer input held by
    the caller; quick_gelu(x) = x * sigmoid(1.702 x) holds fc1's output, the sigmoid and the
    product; attention holds q, k, v and the kernel's own."""
    mlp_peak = clip_mlp_input(s, batch, tokens, d, Peak(f"{where} mlp: x * sigmoid(1.702 x)"))
    mlp_peak.add("activations", "fc1 output, sigmoid, product", s.bytes(batch, tokens, mlp), 3)
    att = Peak(f"{where} self_attn")
    att.add("activations", "residual stream, layer_norm1 output", s.bytes(batch, tokens, d), 2)
    att.add("activations", "q, k, v projections", s.bytes(batch, tokens, d), 3)
    if backend != "math":
        att.add("activations", "sdpa output", s.bytes(batch, tokens, d))
    att = merge(att, attention_scratch(backend, batch, heads, tokens, d // heads, dtype=s.dtype))
    return [mlp_peak, att]


def first_prompt_held(s: Shape, operation: str) -> Peak:
    """What the text encoder stage holds beside a prompt's encoder layer."""
    p = Peak(operation)
    if s.cfg:   # the first prompt's embeddings wait for the negative prompt's (text_encoder())
        p.add("state", "prompt_embeds (repeat)", s.bytes(s.n, s.model.text_tokens, s.model.text_dim))
    return p


def text_encoder(s: Shape, backend: str) -> list[Peak]:
    """Prompt, then negative prompt, each batch 1 x 77 tokens (padding="max_length"); then,
    before the VAE encoder starts (so in this stage), prepare_latents uploads the image."""
    held, m = first_prompt_held(s, "first prompt's embeddings"), s.model
    clip = dict(tokens=m.text_tokens, d=m.text_dim, mlp=m.text_mlp, heads=m.text_heads)
    return [merge(held, p) for p in _clip_layer(s, 1, backend=backend, where="text_encoder", **clip)] + [
        merge(prompt_state(s), image_upload(s))]


def image_upload(s: Shape) -> Peak:
    """image.to(device, dtype): the preprocessed image is a channels-last fp32 CPU tensor, so
    the destination is channels-last. Copy.cu's CPU->GPU copy of another dtype needs a
    contiguous destination and stages through a contiguous temporary of the destination
    dtype on the GPU; in fp32 (same dtype, same strides) it is one cudaMemcpy, no temporary."""
    p = Peak(f"prepare_latents: image.to(cuda, {s.dtype})")
    image = s.bytes(1, s.model.vae_in_channels, s.H, s.W)
    p.add("state", f"image on the GPU ({s.dtype}, channels-last)", image)
    if s.dtype != "fp32":
        p.add("workspace", "contiguous staging copy (Copy.cu)", image)
    return p


def safety_checker(s: Shape, backend: str) -> list[Peak]:
    """CLIP ViT-L/14 on one (n,3,224,224) input; the decoded image waits. Then the final
    postprocess (denormalize per image, stack) before the copy to the host."""
    m = s.model
    held = Peak("decoded images")
    held.add("state", "decoded image(s)", s.bytes(s.n, m.vae_out_channels, s.H, s.W))
    inputs, side = Peak("pixel_values"), m.vision_input
    # run_safety_checker: feature_extractor(...).to(device) keeps CLIPImageProcessor's fp32,
    # then pixel_values.to(dtype) copies it (no copy in fp32)
    inputs.add("state", "pixel_values fp32 and fp16", nbytes(s.n, 3, side, side, itemsize=FP32))
    if s.dtype != "fp32":
        inputs.add("state", f"pixel_values {s.dtype}", s.bytes(s.n, 3, side, side))
    clip = dict(tokens=m.vision_tokens, d=m.vision_dim, mlp=m.vision_mlp, heads=m.vision_heads)
    peaks = [merge(held, inputs, p) for p in
             _clip_layer(s, s.n, backend=backend, where="safety_checker", **clip)]
    return peaks


def postprocess(s: Shape) -> Peak:
    """image_processor.postprocess: (image * 0.5 + 0.5).clamp(0, 1) per image, then stack."""
    p, rgb = Peak("postprocess: denormalize"), s.model.vae_out_channels
    p.add("state", "decoded image(s)", s.bytes(s.n, rgb, s.H, s.W))
    p.add("state", "image * 0.5 + 0.5, clamp", s.bytes(1, rgb, s.H, s.W), 2)
    if s.n > 1:
        p.add("state", "denormalized images waiting for stack", s.bytes(1, rgb, s.H, s.W), s.n - 1)
    return p


# --- xformers (pipe.enable_xformers_memory_efficient_attention) -------------------------------

def xformers_kernel(op: XformersOp, batch_heads: int, tokens: int, head_dim: int) -> Peak:
    """xformers.ops.memory_efficient_attention on (batch_heads, tokens, head_dim) q, k, v in
    inference (kernels.py section 4): the output (batch_heads, tokens, 1, head_dim) and what
    the PyTorch kernel under the op allocates while it runs. fa2F-pt
    (aten._flash_attention_forward): the fp32 log-sum-exp (batch_heads, 1, tokens), and with
    more than one split fp32 softmax_lse_accum and out_accum; cutlassF-pt
    (aten._efficient_attention_forward, compute_log_sumexp=False: a 0-element log-sum-exp):
    the fp32 output accumulator for fp16 head dims > 128."""
    p = Peak(str(op))
    p.add("activations", "memory_efficient_attention output", nbytes(batch_heads, tokens, 1, head_dim))
    if op.kernel == FLASH:
        p.add("attention", "softmax log-sum-exp (fp32)", nbytes(batch_heads, 1, tokens, itemsize=FP32))
        if op.splits > 1:
            p.add("workspace", "flash split-KV softmax_lse_accum (fp32)",
                  nbytes(op.splits, batch_heads, 1, tokens, itemsize=FP32))
            p.add("workspace", "flash split-KV out_accum (fp32)",
                  nbytes(op.splits, batch_heads, 1, tokens, flash_head_dim_rounded(head_dim), itemsize=FP32))
    elif efficient_output_accumulator("float16", head_dim, head_dim):
        p.add("workspace", "fp32 output accumulator", nbytes(batch_heads, tokens, 1, head_dim, itemsize=FP32))
    return p


def xformers_self_attention(held: Peak, op: XformersOp, batch: int, heads: int, tokens: int, head_dim: int) -> list[Peak]:
    """XFormersAttnProcessor.__call__ (diffusers 0.42.1) for self-attention with heads > 1,
    on top of `held` (what the caller holds, with the processor's input). head_to_batch_dim's
    reshape after permute copies q, k and v to (batch*heads, tokens, head_dim) (each projection
    is freed once copied) and the copies stay alive in the locals query, key, value until
    the processor returns. Two candidate peaks: inside the kernel (copies, output, the
    kernel's scratch) and at batch_to_head_dim, whose permute-reshape copies the output back
    to (batch, tokens, heads*head_dim) while the output is still alive (to_out and the
    division by rescale_output_factor later hold as much, never more)."""
    bh = batch * heads
    copies = merge(held, Peak("xformers q, k, v"))
    copies.add("activations", "q, k, v head_to_batch_dim copies", nbytes(bh, tokens, head_dim), 3)
    kernel = merge(copies, xformers_kernel(op, bh, tokens, head_dim),
                   operation=f"{held.operation}: {op}")
    out = merge(copies, Peak(f"{held.operation}: batch_to_head_dim"))
    out.add("activations", "memory_efficient_attention output", nbytes(bh, tokens, 1, head_dim))
    out.add("activations", "batch_to_head_dim copy", nbytes(batch, tokens, heads * head_dim))
    return [kernel, out]


# --- LoRA adapters (unfused) -----------------------------------------------------------------

def lora_linear_temporaries(s: Shape, rows: int, out_features: int) -> Peak:
    """What an unfused peft lora.Linear holds beside its base output (peft tuners/lora/layer.py
    Linear.forward: result = base(x); result = result + lora_B(lora_A(dropout(x))) * scaling,
    dropout Identity at lora_dropout 0): at the `* scaling` lora_B's output and the product,
    at the sum the product and the new result, each (rows, out_features); lora_A's (rows, r)
    output is gone by then."""
    p = Peak("LoRA")
    p.add("activations", "LoRA: lora_B(lora_A(x)) or the new result", s.bytes(rows, out_features))
    p.add("activations", "LoRA: lora_B(...) * scaling", s.bytes(rows, out_features))
    return p


_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def lora_unet_attention(s: Shape, targets: frozenset) -> list[Peak]:
    """The UNet's attention at level 0 (N = h*w tokens) with unfused LoRA on `targets`: at the
    last targeted projection of attn1 (self-attention) and of attn2 (cross-attention; its
    to_k/to_v see the 77 text tokens) the tensors of AttnProcessor2_0.__call__ made so far
    (query, key, value stay alive until it returns) and the adapter's temporaries. Never above
    the feed-forward's live set (unet()), but a candidate like the others."""
    m = s.model
    h, w = s.level(0)
    N, B, C = h * w, s.B, m.unet_channels[0]
    last = [t for t in _PROJECTIONS if t in targets]
    if not last:
        return []
    last = last[-1]
    base = unet_level0_transformer_input(s)
    peaks = []
    for attn, kv in (("attn1", N), ("attn2", m.text_tokens)):
        p = merge(base, Peak(f"transformer_blocks.0.{attn}.{last} (unfused LoRA)"))
        if attn == "attn1":
            p.add("activations", "norm1 output", s.bytes(B, N, C))
        else:
            p.add("activations", "attn1 output, hidden_states after its residual", s.bytes(B, N, C), 2)
            p.add("activations", "norm2 output", s.bytes(B, N, C))
        made = _PROJECTIONS[:_PROJECTIONS.index(last) + 1]
        for proj in made[:3]:
            p.add("activations", f"{proj} output", s.bytes(B, N if proj == "to_q" else kv, C))
        if last == "to_out.0":
            p.add("activations", "sdpa output", s.bytes(B, N, C))
            p.add("activations", "to_out.0 output (base layer)", s.bytes(B, N, C))
        rows = B * (N if last in ("to_q", "to_out.0") else kv)
        peaks.append(merge(p, lora_linear_temporaries(s, rows, C), operation=p.operation))
    return peaks


def lora_unet_feed_forward(s: Shape, targets: frozenset) -> list[Peak]:
    """The first level-0 transformer's feed-forward with unfused LoRA: inside ff.net.0.proj
    (GEGLU's proj, C -> 2 x 4C) the base output and the adapter's two temporaries of its size;
    inside ff.net.2 (4C -> C) GEGLU's output (its proj output and gelu(gate) are freed when
    GEGLU.forward returns), the base output and two temporaries of C."""
    h, w = s.level(0)
    rows, C = s.B * h * w, s.model.unet_channels[0]
    peaks = []
    if "ff.net.0.proj" in targets:
        p = unet_level0_feed_forward_input(s, "transformer_blocks.0.ff.net.0.proj (unfused LoRA)")
        p.add("activations", "ff.net.0.proj output (base layer)", s.bytes(rows, 2 * FF_MULT * C))
        peaks.append(merge(p, lora_linear_temporaries(s, rows, 2 * FF_MULT * C), operation=p.operation))
    if "ff.net.2" in targets:
        p = unet_level0_feed_forward_input(s, "transformer_blocks.0.ff.net.2 (unfused LoRA)")
        p.add("activations", "GEGLU output hidden * gelu(gate)", s.bytes(rows, FF_MULT * C))
        p.add("activations", "ff.net.2 output (base layer)", s.bytes(rows, C))
        peaks.append(merge(p, lora_linear_temporaries(s, rows, C), operation=p.operation))
    return peaks


def lora_text_attention(s: Shape, targets: frozenset) -> list[Peak]:
    """CLIPAttention (batch 1, 77 tokens) with unfused LoRA, at its last targeted projection
    (q_proj, k_proj, v_proj, out_proj in the order CLIPAttention.forward calls them): the
    residual stream and layer_norm1's output held by the caller, the projections made, the
    attention output before out_proj, and the adapter's temporaries."""
    order = ("q_proj", "k_proj", "v_proj", "out_proj")
    last = [t for t in order if t in targets]
    if not last:
        return []
    last = last[-1]
    t, d = s.model.text_tokens, s.model.text_dim
    p = first_prompt_held(s, f"text_encoder self_attn.{last} (unfused LoRA)")
    p.add("activations", "residual stream, layer_norm1 output", s.bytes(1, t, d), 2)
    made = order[:order.index(last) + 1]
    p.add("activations", "projections made", s.bytes(1, t, d), min(len(made), 3))
    if last == "out_proj":
        p.add("activations", "attention output, out_proj output (base layer)", s.bytes(1, t, d), 2)
    return [merge(p, lora_linear_temporaries(s, t, d), operation=p.operation)]


def lora_text_mlp(s: Shape, targets: frozenset) -> list[Peak]:
    """CLIPMLP (batch 1, 77 tokens) with unfused LoRA: inside fc1 (d -> mlp) the base output and
    two temporaries of its size, as many as quick_gelu holds (_clip_layer), so never above it;
    inside fc2 (mlp -> d) quick_gelu's output, the base output and two temporaries of d."""
    t, d, mlp = s.model.text_tokens, s.model.text_dim, s.model.text_mlp
    peaks = []
    for name, n_in, n_out in (("fc1", None, mlp), ("fc2", mlp, d)):
        if name not in targets:
            continue
        p = clip_mlp_input(s, 1, t, d, first_prompt_held(s, f"text_encoder mlp.{name} (unfused LoRA)"))
        if n_in:
            p.add("activations", "quick_gelu output", s.bytes(1, t, n_in))
        p.add("activations", f"{name} output (base layer)", s.bytes(1, t, n_out))
        peaks.append(merge(p, lora_linear_temporaries(s, t, n_out), operation=p.operation))
    return peaks
