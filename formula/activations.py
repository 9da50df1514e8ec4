"""The tensors alive at each stage's peak operation, from the architecture (DERIVATION.md, section 3).

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

from .allocator import block_bytes
from .kernels import ConvWorkspace, conv_rules, efficient_output_accumulator

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
    """Sizes of one call: image, latent, batches, and the UNet's level sizes."""

    H: int
    W: int
    n: int          # images per prompt (VAE decode batch)
    B: int          # UNet batch
    cfg: bool

    @property
    def h(self):
        return self.H // 8

    @property
    def w(self):
        return self.W // 8

    def level(self, i: int) -> tuple[int, int]:
        """UNet feature size at level i: each stride-2 conv (padding 1) gives ceil(x / 2)."""
        h, w = self.h, self.w
        for _ in range(i):
            h, w = ceil(h / 2), ceil(w / 2)
        return h, w


# --- state the pipeline carries -------------------------------------------------------------

TOKENS, TEXT_DIM = 77, 768


def prompt_state(s: Shape) -> Peak:
    """encode_prompt: prompt_embeds.repeat(1, n, 1) per prompt; with CFG __call__ keeps
    negative_prompt_embeds and the cat([negative, prompt]) it feeds the UNet."""
    p = Peak("prompt embeddings")
    if s.cfg:
        p.add("state", "negative_prompt_embeds", nbytes(s.n, TOKENS, TEXT_DIM))
        p.add("state", "prompt_embeds (cat)", nbytes(2 * s.n, TOKENS, TEXT_DIM))
    else:
        p.add("state", "prompt_embeds", nbytes(s.n, TOKENS, TEXT_DIM))
    return p


def latent_state(s: Shape, history: int) -> Peak:
    """latents (n,4,h,w) and `history` more latent-sized tensors (scheduler ets, last outputs)."""
    p = Peak("latents")
    p.add("state", "latents", nbytes(s.n, 4, s.h, s.w))
    if history:
        p.add("state", "scheduler history (ets, cur_sample)", nbytes(s.n, 4, s.h, s.w), history)
    return p


def merge(*peaks: Peak, operation: str | None = None) -> Peak:
    out = Peak(operation or peaks[-1].operation)
    for p in peaks:
        out.terms.extend(p.terms)
    return out


# --- attention -------------------------------------------------------------------------------

def attention_scratch(backend: str, batch: int, heads: int, tokens: int, head_dim: int, kv_tokens: int | None = None) -> Peak:
    """What one attention call allocates besides its output, at its own peak.

    math: PyTorch's math kernel upcasts fp16 q, k, v to fp32 (allow_fp16_bf16_reduction_math_sdp
    is off by default), scales q, and holds the fp32 score matrix and its softmax together,
    with _safe_softmax's boolean mask of the same shape.
    flash: the kernel also returns a fp32 log-sum-exp (batch, heads, tokens).
    efficient: for head_dim > 128 in fp16 the kernel keeps a fp32 output accumulator.
    cudnn: no extra tensor in inference.
    """
    kv = kv_tokens or tokens
    p = Peak(f"sdpa[{backend}]")
    if backend == "math":
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
    elif backend == "efficient" and efficient_output_accumulator("float16", head_dim, head_dim):
        p.add("workspace", "fp32 output accumulator", nbytes(batch, tokens, heads, head_dim, itemsize=FP32))
    return p


def sliced_attention_scratch(batch: int, heads: int, tokens: int, kv: int, slice_size: int) -> Peak:
    """diffusers SlicedAttnProcessor (enable_attention_slicing): baddbmm + softmax in fp16 over
    `slice_size` of the batch x heads rows at a time; SDPA is not used at all."""
    rows = min(slice_size, batch * heads)
    p = Peak("sliced attention")
    p.add("attention", "scores slice (fp16)", nbytes(rows, tokens, kv))
    p.add("attention", "softmax slice (fp16)", nbytes(rows, tokens, kv))
    return p


# --- stages ----------------------------------------------------------------------------------

UNET_C0, UNET_HEADS = 320, 8          # level-0 channels and attention heads (head dim 40)
FF_MULT = 4                           # GEGLU: proj to 2 x 4C, gelu(gate) and product at 4C


def slice_rows(slicing, heads: int) -> int | None:
    """diffusers set_attention_slice: "auto" = heads // 2, "max" = 1, an int as given."""
    if slicing is None:
        return None
    return {"auto": heads // 2, "max": 1}.get(slicing, slicing)


def unet(s: Shape, backend: str, slicing=None, ws_rule=None) -> list[Peak]:
    """One UNet evaluation. The peak sits in up_blocks[3] (level 0, N = h*w tokens): the three
    level-0 skips (conv_in, down_blocks[0].attentions[0..1]) are still held by the UNet's
    res_samples tuple, the block's input (640 channels from up_blocks[2]'s upsampler) by the
    UNet's `sample`, and the transformer's residual (resnets[0] output) and proj_in output by
    Transformer2DModel.forward."""
    h, w = s.level(0)
    N, B, C = h * w, s.B, UNET_C0
    base = Peak("up_blocks.3.attentions.0")
    base.add("state", "latent_model_input (cat)", nbytes(B, 4, h, w))
    base.add("state", "time embedding emb", nbytes(B, 4 * C))
    base.add("activations", "level-0 skips (conv_in, down_blocks.0.attentions.0/1)", nbytes(B, C, h, w), 3)
    base.add("activations", "up_blocks.3 input (up_blocks.2 upsampler conv)", nbytes(B, 2 * C, h, w))
    base.add("activations", "resnets.0 output (transformer residual)", nbytes(B, C, h, w))
    base.add("activations", "proj_in output", nbytes(B, C, h, w))

    ff = merge(base, Peak("transformer_blocks.0.ff GEGLU: gelu(gate) * hidden"))
    ff.add("activations", "attn2 output (/ rescale_output_factor)", nbytes(B, N, C))
    ff.add("activations", "hidden_states after attn2 residual", nbytes(B, N, C))
    ff.add("activations", "norm3 output", nbytes(B, N, C))
    ff.add("activations", "ff.net.0.proj output (2 x 4C)", nbytes(B * N, 2 * FF_MULT * C))
    ff.add("activations", "gelu(gate)", nbytes(B, N, FF_MULT * C))
    ff.add("activations", "hidden * gelu(gate)", nbytes(B, N, FF_MULT * C))

    attn = merge(base, Peak("transformer_blocks.0.attn1 (self-attention)"))
    attn.add("activations", "norm1 output", nbytes(B, N, C))
    rows = slice_rows(slicing, UNET_HEADS)
    if rows is None:
        attn.add("activations", "q, k, v projections", nbytes(B * N, C), 3)
        if backend != "math":
            attn.add("activations", "sdpa output", nbytes(B, N, UNET_HEADS, C // UNET_HEADS))
        attn = merge(attn, attention_scratch(backend, B, UNET_HEADS, N, C // UNET_HEADS))
    else:
        attn.add("activations", "q, k, v as (B*heads, N, d)", nbytes(B * UNET_HEADS, N, C // UNET_HEADS), 3)
        attn.add("activations", "sliced output buffer (zeros)", nbytes(B * UNET_HEADS, N, C // UNET_HEADS))
        attn = merge(attn, sliced_attention_scratch(B, UNET_HEADS, N, N, rows))
    attn.operation = f"{attn.operation}: {attn.terms[-1][1]}"
    return [ff, attn] + [unet_up_conv(s, i, ws_rule) for i in (0, 1)]


def unet_up_conv(s: Shape, block: int, ws_rule) -> Peak:
    """up_blocks[block].resnets[0].conv1 (2560 -> 1280, 3x3) at level 3 - block: its filter
    alone is 59 MB, and cuDNN's workspace holds a transposed copy (in + out + filter), so at
    small images this convolution is the UNet's peak. Alive: every skip the up blocks have
    not consumed yet, the UNet's `sample`, the resnet's input cat(sample, skip) and SiLU
    output, the conv output."""
    B, C = s.B, UNET_C0
    lvl = 3 - block
    p = Peak(f"up_blocks.{block}.resnets.0.conv1 (2560 -> 1280, 3x3, level {lvl})")
    p.add("state", "latent_model_input (cat)", nbytes(B, 4, s.h, s.w))
    p.add("state", "time embedding emb", nbytes(B, 4 * C))
    skips = [(0, C), (0, C), (0, C), (1, C), (1, 2 * C), (1, 2 * C), (2, 2 * C), (2, 4 * C), (2, 4 * C), (3, 4 * C)]
    if block == 0:
        skips += [(3, 4 * C), (3, 4 * C)]
    for level, ch in skips:
        p.add("activations", f"skip ({ch} ch, level {level})", nbytes(B, ch, *s.level(level)))
    hl, wl = s.level(lvl)
    p.add("activations", "UNet sample (1280 ch)", nbytes(B, 4 * C, hl, wl))
    p.add("activations", "cat(sample, skip) (2560 ch)", nbytes(B, 8 * C, hl, wl))
    p.add("activations", "silu(norm1(x)) (2560 ch)", nbytes(B, 8 * C, hl, wl))
    p.add("activations", "conv1 output (1280 ch)", nbytes(B, 4 * C, hl, wl))
    ws = conv_workspace(ws_rule, f"unet.up_blocks.{block}.resnets.0.conv1", 3, (B, 8 * C, hl, wl),
                        nbytes(B, 8 * C, hl, wl), nbytes(B, 4 * C, hl, wl), 8 * C * 4 * C * 9 * FP16)
    if ws:
        p.add("workspace", "cuDNN conv workspace", ws)
    return p


VAE_MID_C = 512                         # VAE mid-block channels; its attention: 1 head of dim 512
VAE_TILE, VAE_TILE_LATENT = 512, 64     # AutoencoderKL.tile_sample_min_size / tile_latent_min_size
VAE_TILE_OVERLAP = 0.25


def _vae_mid_attention(b: int, h: int, w: int, backend: str, where: str) -> Peak:
    """Mid-block Attention over N = h*w tokens: the block input (held by the caller), the
    resnet output (residual), group_norm output, q, k, v, and the attention kernel's own."""
    N, C = h * w, VAE_MID_C
    p = Peak(f"{where}.mid_block.attentions.0")
    p.add("activations", "mid-block input, resnets.0 output", nbytes(b, C, h, w), 2)
    p.add("activations", "group_norm output", nbytes(b, C, N))
    p.add("activations", "q, k, v projections", nbytes(b * N, C), 3)
    if backend != "math":
        p.add("activations", "sdpa output", nbytes(b, N, 1, C))
    return merge(p, attention_scratch(backend, b, 1, N, C), operation=f"{p.operation}: sdpa[{backend}]")


def vae_decode_full(b: int, H: int, W: int) -> Peak:
    """Decoder up_blocks[3].resnets[0] (256 -> 128 channels at full resolution), at its SiLU:
    the block input (up_blocks[2]'s upsampled conv output, held by Decoder.forward's `sample`),
    norm1's output and the SiLU's output are three 256-channel full-resolution maps."""
    p = Peak("decoder.up_blocks.3.resnets.0: silu(norm1(x))")
    p.add("activations", "decoder.up_blocks.2 upsampler output (256 ch, full res)", nbytes(b, 256, H, W))
    p.add("activations", "norm1 output (256 ch, full res)", nbytes(b, 256, H, W))
    p.add("activations", "silu output (256 ch, full res)", nbytes(b, 256, H, W))
    return p


def conv_workspace(ws, module: str, kernel: int, input_shape, in_bytes: int, out_bytes: int,
                   weight_bytes: int) -> int:
    """cuDNN's workspace for one convolution: ``ws`` is the GPU profile's
    kernels.ConvWorkspace (measured shapes, else the rule set, e.g. "nchw_transpose": input +
    output + filter bytes for the VAE's 3x3 convs; see formula/kernels.py), a rule set's name,
    or None."""
    if isinstance(ws, str):
        ws = ConvWorkspace(conv_rules(ws))
    if not ws:
        return 0
    return ws(module, kernel, input_shape, in_bytes, out_bytes, weight_bytes)


def vae_decode_upsampler(b: int, H: int, W: int, ws_rule) -> Peak:
    """Decoder up_blocks[2]'s upsampler: nearest x2 to full resolution, then a 256->256 3x3
    conv. Alive: Decoder.forward's `sample` (up_blocks[1] output, 512 ch at H/2), the block's
    hidden state (256 ch at H/2), the interpolated input and the conv output (256 ch, full
    res), and cuDNN's workspace."""
    p = Peak("decoder.up_blocks.2.upsamplers.0.conv (256 -> 256, 3x3, full res)")
    full = nbytes(b, 256, H, W)
    p.add("activations", "decoder.up_blocks.1 output (512 ch, H/2)", nbytes(b, 512, H // 2, W // 2))
    p.add("activations", "up_blocks.2.resnets.2 output (256 ch, H/2)", nbytes(b, 256, H // 2, W // 2))
    p.add("activations", "interpolate(x, 2) (256 ch, full res)", full)
    p.add("activations", "conv output (256 ch, full res)", full)
    ws = conv_workspace(ws_rule, "vae.decoder.up_blocks.2.upsamplers.0.conv", 3, (b, 256, H, W),
                        full, full, 256 * 256 * 9 * FP16)
    if ws:
        p.add("workspace", "cuDNN conv workspace", ws)
    return p


def _tiles(size: int, stride: int, tile: int) -> list[int]:
    return [min(tile, size - i) for i in range(0, size, stride)]


def vae_tile(s: Shape, tiling: bool, latent: bool) -> tuple[int, int]:
    """(height, width) in pixels that one VAE pass works on: the whole image, or with
    enable_vae_tiling() and an image larger than a tile, the largest tile."""
    if not tiling or (s.H <= VAE_TILE and s.W <= VAE_TILE):
        return s.H, s.W
    stride = int(VAE_TILE * (1 - VAE_TILE_OVERLAP))
    return max(_tiles(s.H, stride, VAE_TILE)), max(_tiles(s.W, stride, VAE_TILE))


def vae_decode_conv1(b: int, H: int, W: int, ws_rule) -> Peak:
    """Decoder up_blocks[3].resnets[0].conv1 (256 -> 128, 3x3, full res): the block input,
    the SiLU output it convolves (256 ch), the conv output (128 ch) and cuDNN's workspace."""
    p = Peak("decoder.up_blocks.3.resnets.0.conv1 (256 -> 128, 3x3, full res)")
    x, y = nbytes(b, 256, H, W), nbytes(b, 128, H, W)
    p.add("activations", "decoder.up_blocks.2 upsampler output (256 ch, full res)", x)
    p.add("activations", "silu(norm1(x)) (256 ch, full res)", x)
    p.add("activations", "conv1 output (128 ch, full res)", y)
    ws = conv_workspace(ws_rule, "vae.decoder.up_blocks.3.resnets.0.conv1", 3, (b, 256, H, W),
                        x, y, 128 * 256 * 9 * FP16)
    if ws:
        p.add("workspace", "cuDNN conv workspace", ws)
    return p


def _vae_decode_at(b: int, H: int, W: int, ws_rule) -> list[Peak]:
    return [vae_decode_full(b, H, W), vae_decode_upsampler(b, H, W, ws_rule), vae_decode_conv1(b, H, W, ws_rule)]


def vae_decode(s: Shape, backend: str, slicing: bool, tiling: bool, ws_rule=None) -> list[Peak]:
    h, w = s.h, s.w
    b = 1 if slicing else s.n
    state = Peak("decode inputs")
    state.add("state", "latents / scaling_factor", nbytes(s.n, 4, h, w))
    state.add("state", "post_quant_conv output", nbytes(b, 4, h, w))
    if slicing and s.n > 1:  # decoded slices wait in a list for torch.cat
        state.add("state", "decoded images of earlier slices", nbytes(1, 3, s.H, s.W), s.n - 1)
    peaks = []
    if tiling and (h > VAE_TILE_LATENT or w > VAE_TILE_LATENT):
        stride = int(VAE_TILE_LATENT * (1 - VAE_TILE_OVERLAP))
        rows, cols = _tiles(h, stride, VAE_TILE_LATENT), _tiles(w, stride, VAE_TILE_LATENT)
        stored = sum(nbytes(b, 3, 8 * th, 8 * tw) for th in rows for tw in cols)
        big = max(rows) * max(cols)
        th, tw = max(rows), max(cols)
        # The largest tile is decoded while (at most) all other decoded tiles wait in `rows`.
        for tile_peak in _vae_decode_at(b, 8 * th, 8 * tw, ws_rule):
            p = merge(state, tile_peak, operation=f"tiled_decode, largest tile: {tile_peak.operation}")
            p.add("state", "decoded tiles waiting for blending", stored - nbytes(b, 3, 8 * th, 8 * tw))
            peaks.append(p)
        end = merge(state, Peak("tiled_decode: torch.cat of blended rows"))
        end.add("state", "decoded tiles", stored)
        end.add("state", "blended rows (cat)", nbytes(b, 3, s.H, s.W))
        end.add("state", "decoded image (cat)", nbytes(b, 3, s.H, s.W))
        peaks.append(end)
        mid_hw = (th, tw)
        del big
    else:
        peaks += [merge(state, p) for p in _vae_decode_at(b, s.H, s.W, ws_rule)]
        mid_hw = (h, w)
    peaks.append(merge(state, _vae_mid_attention(b, *mid_hw, backend, "decoder")))
    return peaks


def vae_encode_full(H: int, W: int) -> Peak:
    """Encoder down_blocks[0].resnets[1] at its output division by output_scale_factor: conv_in's
    output (held by Encoder.forward's `sample`), resnets[0]'s output (the residual), conv2's
    output, the residual sum and the quotient: five 128-channel full-resolution maps."""
    p = Peak("encoder.down_blocks.0.resnets.1: (x + conv2) / output_scale_factor")
    p.add("activations", "conv_in output (128 ch, full res)", nbytes(1, 128, H, W))
    p.add("activations", "resnets.0 output", nbytes(1, 128, H, W))
    p.add("activations", "conv2 output", nbytes(1, 128, H, W))
    p.add("activations", "x + conv2", nbytes(1, 128, H, W))
    p.add("activations", "(x + conv2) / 1.0", nbytes(1, 128, H, W))
    return p


def vae_encode_conv(H: int, W: int, ws_rule) -> Peak:
    """Encoder down_blocks[0].resnets[1].conv2 (128 -> 128, 3x3, full res): conv_in's output,
    resnets[0]'s output (the residual), the SiLU output it convolves and the conv output are
    alive, with cuDNN's workspace."""
    p = Peak("encoder.down_blocks.0.resnets.1.conv2 (128 -> 128, 3x3, full res)")
    full = nbytes(1, 128, H, W)
    p.add("activations", "conv_in output (128 ch, full res)", full)
    p.add("activations", "resnets.0 output", full)
    p.add("activations", "silu(norm2(.)) (conv input)", full)
    p.add("activations", "conv2 output", full)
    ws = conv_workspace(ws_rule, "vae.encoder.down_blocks.0.resnets.1.conv2", 3, (1, 128, H, W),
                        full, full, 128 * 128 * 9 * FP16)
    if ws:
        p.add("workspace", "cuDNN conv workspace", ws)
    return p


def vae_encode(s: Shape, backend: str, tiling: bool, ws_rule=None) -> list[Peak]:
    """The image is encoded once (batch 1); latents are repeated for n images afterwards."""
    state = Peak("encode input")
    state.add("state", "image on the GPU (fp16)", nbytes(1, 3, s.H, s.W))
    if tiling and (s.H > VAE_TILE or s.W > VAE_TILE):
        stride = int(VAE_TILE * (1 - VAE_TILE_OVERLAP))
        rows, cols = _tiles(s.H, stride, VAE_TILE), _tiles(s.W, stride, VAE_TILE)
        th, tw = max(rows), max(cols)
        moments = sum(nbytes(1, 8, r // 8, c // 8) for r in rows for c in cols)
        out = []
        for tile_peak in (vae_encode_full(th, tw), vae_encode_conv(th, tw, ws_rule)):
            p = merge(state, tile_peak, operation=f"tiled_encode, largest tile: {tile_peak.operation}")
            p.add("state", "encoded tiles (moments)", moments)
            out.append(p)
        return out + [merge(state, _vae_mid_attention(1, th // 8, tw // 8, backend, "encoder"))]
    return [merge(state, vae_encode_full(s.H, s.W)), merge(state, vae_encode_conv(s.H, s.W, ws_rule)),
            merge(state, _vae_mid_attention(1, s.h, s.w, backend, "encoder"))]


CLIP_TEXT = dict(tokens=77, d=768, mlp=3072, heads=12)
CLIP_VISION = dict(tokens=257, d=1024, mlp=4096, heads=16)


def _clip_layer(batch: int, tokens: int, d: int, mlp: int, heads: int, backend: str, where: str) -> list[Peak]:
    """A CLIP encoder layer after the first: the residual stream and the layer input held by
    the caller; quick_gelu(x) = x * sigmoid(1.702 x) holds fc1's output, the sigmoid and the
    product; attention holds q, k, v and the kernel's own."""
    mlp_peak = Peak(f"{where} mlp: x * sigmoid(1.702 x)")
    mlp_peak.add("activations", "residual stream", nbytes(batch, tokens, d), 2)
    mlp_peak.add("activations", "layer_norm2 output", nbytes(batch, tokens, d))
    mlp_peak.add("activations", "fc1 output, sigmoid, product", nbytes(batch, tokens, mlp), 3)
    att = Peak(f"{where} self_attn")
    att.add("activations", "residual stream, layer_norm1 output", nbytes(batch, tokens, d), 2)
    att.add("activations", "q, k, v projections", nbytes(batch, tokens, d), 3)
    if backend != "math":
        att.add("activations", "sdpa output", nbytes(batch, tokens, d))
    att = merge(att, attention_scratch(backend, batch, heads, tokens, d // heads))
    return [mlp_peak, att]


def text_encoder(s: Shape, backend: str) -> list[Peak]:
    """Prompt, then negative prompt, each batch 1 x 77 tokens (padding="max_length"); then,
    before the VAE encoder starts (so in this stage), prepare_latents uploads the image."""
    held = Peak("first prompt's embeddings")
    if s.cfg:
        held.add("state", "prompt_embeds (repeat)", nbytes(s.n, TOKENS, TEXT_DIM))
    return [merge(held, p) for p in _clip_layer(1, backend=backend, where="text_encoder", **CLIP_TEXT)] + [
        merge(prompt_state(s), image_upload(s))]


def image_upload(s: Shape) -> Peak:
    """image.to(device, fp16): the preprocessed image is a channels-last fp32 CPU tensor, so
    the fp16 destination is channels-last; Copy.cu's CPU->GPU copy needs a contiguous
    destination and stages through a contiguous fp16 temporary on the GPU."""
    p = Peak("prepare_latents: image.to(cuda, fp16)")
    p.add("state", "image on the GPU (fp16, channels-last)", nbytes(1, 3, s.H, s.W))
    p.add("workspace", "contiguous staging copy (Copy.cu)", nbytes(1, 3, s.H, s.W))
    return p


def safety_checker(s: Shape, backend: str) -> list[Peak]:
    """CLIP ViT-L/14 on one (n,3,224,224) input; the decoded image waits. Then the final
    postprocess (denormalize per image, stack) before the copy to the host."""
    held = Peak("decoded images")
    held.add("state", "decoded image(s)", nbytes(s.n, 3, s.H, s.W))
    inputs = Peak("pixel_values")
    inputs.add("state", "pixel_values fp32 and fp16", nbytes(s.n, 3, 224, 224, itemsize=FP32))
    inputs.add("state", "pixel_values fp16", nbytes(s.n, 3, 224, 224))
    peaks = [merge(held, inputs, p) for p in
             _clip_layer(s.n, backend=backend, where="safety_checker", **CLIP_VISION)]
    return peaks


def postprocess(s: Shape) -> Peak:
    """image_processor.postprocess: (image * 0.5 + 0.5).clamp(0, 1) per image, then stack."""
    p = Peak("postprocess: denormalize")
    p.add("state", "decoded image(s)", nbytes(s.n, 3, s.H, s.W))
    p.add("state", "image * 0.5 + 0.5, clamp", nbytes(1, 3, s.H, s.W), 2)
    if s.n > 1:
        p.add("state", "denormalized images waiting for stack", nbytes(1, 3, s.H, s.W), s.n - 1)
    return p


# --- LoRA adapters (unfused) -----------------------------------------------------------------

def lora_linear_temporaries(rows: int, out_features: int) -> Peak:
    """What an unfused peft lora.Linear holds beside its base output (peft tuners/lora/layer.py
    Linear.forward: result = base(x); result = result + lora_B(lora_A(dropout(x))) * scaling,
    dropout Identity at lora_dropout 0): at the `* scaling` lora_B's output and the product,
    at the sum the product and the new result, each (rows, out_features); lora_A's (rows, r)
    output is gone by then."""
    p = Peak("LoRA")
    p.add("activations", "LoRA: lora_B(lora_A(x)) or the new result", nbytes(rows, out_features))
    p.add("activations", "LoRA: lora_B(...) * scaling", nbytes(rows, out_features))
    return p


_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def lora_unet_attention(s: Shape, targets: frozenset) -> list[Peak]:
    """The UNet's attention at level 0 (N = h*w tokens) with unfused LoRA on `targets`: at the
    last targeted projection of attn1 (self-attention) and of attn2 (cross-attention; its
    to_k/to_v see the 77 text tokens) the tensors of AttnProcessor2_0.__call__ made so far
    (query, key, value stay alive until it returns) and the adapter's temporaries. Never above
    the feed-forward's live set (unet()), but a candidate like the others."""
    h, w = s.level(0)
    N, B, C = h * w, s.B, UNET_C0
    last = [t for t in _PROJECTIONS if t in targets]
    if not last:
        return []
    last = last[-1]
    base = Peak("up_blocks.3.attentions.0")
    base.add("state", "latent_model_input (cat)", nbytes(B, 4, h, w))
    base.add("state", "time embedding emb", nbytes(B, 4 * C))
    base.add("activations", "level-0 skips (conv_in, down_blocks.0.attentions.0/1)", nbytes(B, C, h, w), 3)
    base.add("activations", "up_blocks.3 input (up_blocks.2 upsampler conv)", nbytes(B, 2 * C, h, w))
    base.add("activations", "resnets.0 output (transformer residual)", nbytes(B, C, h, w))
    base.add("activations", "proj_in output", nbytes(B, C, h, w))
    peaks = []
    for attn, kv in (("attn1", N), ("attn2", TOKENS)):
        p = merge(base, Peak(f"transformer_blocks.0.{attn}.{last} (unfused LoRA)"))
        if attn == "attn1":
            p.add("activations", "norm1 output", nbytes(B, N, C))
        else:
            p.add("activations", "attn1 output, hidden_states after its residual", nbytes(B, N, C), 2)
            p.add("activations", "norm2 output", nbytes(B, N, C))
        made = _PROJECTIONS[:_PROJECTIONS.index(last) + 1]
        for proj in made[:3]:
            p.add("activations", f"{proj} output", nbytes(B, N if proj == "to_q" else kv, C))
        if last == "to_out.0":
            p.add("activations", "sdpa output", nbytes(B, N, C))
            p.add("activations", "to_out.0 output (base layer)", nbytes(B, N, C))
        rows = B * (N if last in ("to_q", "to_out.0") else kv)
        peaks.append(merge(p, lora_linear_temporaries(rows, C), operation=p.operation))
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
    t, d = CLIP_TEXT["tokens"], CLIP_TEXT["d"]
    p = Peak(f"text_encoder self_attn.{last} (unfused LoRA)")
    if s.cfg:   # the first prompt's embeddings wait for the negative prompt's (text_encoder())
        p.add("state", "prompt_embeds (repeat)", nbytes(s.n, TOKENS, TEXT_DIM))
    p.add("activations", "residual stream, layer_norm1 output", nbytes(1, t, d), 2)
    made = order[:order.index(last) + 1]
    p.add("activations", "projections made", nbytes(1, t, d), min(len(made), 3))
    if last == "out_proj":
        p.add("activations", "attention output, out_proj output (base layer)", nbytes(1, t, d), 2)
    return [merge(p, lora_linear_temporaries(t, d), operation=p.operation)]
