"""The order in which the VAE allocates and frees its feature maps (DERIVATION.md, section 8).

Allocated memory at a peak depends only on what is alive there (activations.py); reserved
memory depends on the order of every allocation and free before it, because the caching
allocator reuses a cached block only when it is large enough. The VAE's full-resolution
maps are the only tensors large enough to force new segments, so the equation replays the
VAE encoder's and decoder's maps in the order diffusers' code makes and drops them:

    ResnetBlock2D:  h = norm1(x); h = silu(h); h = conv1(h); h = norm2(h); h = silu(h);
                    h = conv2(h); [x' = conv_shortcut(x)]; out = (x' + h) / 1.0
    Downsample2D:   p = pad(x, (0, 1, 0, 1)); y = conv(p)          (stride 2)
    Upsample2D:     u = interpolate(x, 2); y = conv(u)
    convolution:    output, then cuDNN's workspace, freed when the conv returns
    channels_last:  the layout copies of kernels.Layouts: GroupNorm's of its NHWC input (alive
                    until it returns), the conv's of an NCHW input (allocated before the output,
                    freed after the workspace), Upsample2D's (activations.upsample_copies)

A name drops when the Python variable holding it is rebound (CPython frees at refcount 0).
Only the blocks at full and half resolution are replayed (and the upsampler into half
resolution): the maps below are 1/16 of a full-resolution map or smaller and fit in the
blocks the big maps leave cached.
"""

from __future__ import annotations

from . import architecture as arch
from .activations import FP16, conv_workspace, nbytes, upsample_copies
from .allocator import CachingAllocator, OutOfMemoryError
from .kernels import Layouts


class Schedule:
    """Replays allocations and frees through the allocator model as they are written.

    fallbacks: under a memory capacity, a convolution whose workspace cannot be had runs the
    next engine of cuDNN's list instead (Conv_v8.cpp try_configs catches the OOM); the list
    ends with engines that take none, and the engines between are unmeasured, so the replay
    falls back to no workspace and names the convolution here. None: the OOM propagates.
    An OOM carries `operation`: the module and whether its output or workspace failed."""

    def __init__(self, alloc: CachingAllocator, ws, batch: int, fallbacks: list | None = None, itemsize: int = FP16,
                 layouts: Layouts = Layouts()):
        self.alloc, self.ws, self.b, self.fallbacks = alloc, ws, batch, fallbacks  # ws: kernels.ConvWorkspace
        self.itemsize = itemsize                     # the pipeline's dtype (weights and feature maps)
        self.layouts = layouts                       # the maps' layout copies (Options.channels_last)
        self._blocks: dict[int, object] = {}
        self._next = 0

    def new(self, c: int, h: int, w: int, what: str = "") -> int:
        return self._alloc(self.b * c * h * w * self.itemsize, what or f"feature map ({self.b}, {c}, {h}, {w})")

    def _alloc(self, size: int, what: str = "") -> int:
        t = self._next
        self._next += 1
        try:
            self._blocks[t] = self.alloc.malloc(size)   # the allocator rounds
        except OutOfMemoryError as e:
            e.operation = what or f"tensor of {size:,} B"
            raise
        return t

    def free(self, *tensors: int) -> None:
        for t in tensors:
            self.alloc.free(self._blocks.pop(t))

    def norm(self, c: int, h: int, w: int, copies: bool | None = None) -> int:
        """GroupNorm's output and, copying its input (copies; default Layouts.norm_copies: an
        NHWC map), the copy while it runs."""
        copies = self.layouts.norm_copies if copies is None else copies
        cp = self.new(c, h, w, f"GroupNorm: NCHW copy ({self.b}, {c}, {h}, {w})") if copies else None
        out = self.new(c, h, w)
        if cp is not None:
            self.free(cp)
        return out

    def conv(self, x: int, c_in: int, c_out: int, k: int, h: int, w: int, stride: int = 1, out_hw=None,
             module: str = "", in_hw=None, nchw_input: bool = False) -> int:
        """`module`: the conv's path in the pipeline (it picks the profile's workspace rule);
        `in_hw`: the input's size where it differs from (h, w) (a padded input); `nchw_input`:
        the input is NCHW (GroupNorm's output, through SiLU), copied to NHWC with channels-last
        weights."""
        oh, ow = out_hw or (h // stride, w // stride)
        op = module or f"conv2d {c_in}->{c_out} {k}x{k} at {oh}x{ow}"
        copy = nchw_input and self.layouts.channels_last
        cp = self.new(c_in, *(in_hw or (h, w)), f"{op}: NHWC copy of the input") if copy else None
        y = self.new(c_out, oh, ow, f"{op}: output ({self.b}, {c_out}, {oh}, {ow})")
        e = self.itemsize
        i, o, f = nbytes(self.b, c_in, h, w, itemsize=e), nbytes(self.b, c_out, oh, ow, itemsize=e), c_in * c_out * k * k * e
        ws = conv_workspace(self.ws, module, k, (self.b, c_in, *(in_hw or (h, w))), i, o, f,
                            output_shape=(self.b, c_out, oh, ow))
        if ws:
            elastic = getattr(self.ws, "elastic", True)     # False: PyTorch's native columns (cuDNN off)
            try:
                self.free(self._alloc(ws, f"{op}: {'cuDNN workspace' if elastic else self.ws.term}"))
            except OutOfMemoryError:
                if self.fallbacks is None or not elastic:
                    raise
                self.fallbacks.append(op)
        if cp is not None:
            self.free(cp)
        return y

    def upsample(self, c: int, h: int, w: int, module: str, out_hw=None) -> int:
        """Upsample2D: interpolate a (c, h, w) map (its caller holds it) to out_hw (default
        2h x 2w), then the 3x3 conv; activations.upsample_copies: an NCHW copy to interpolate
        from, and the conv's NHWC copy of the NCHW result."""
        oh, ow = out_hw or (2 * h, 2 * w)
        nchw = upsample_copies(self.layouts, self.b, c, h, w)
        cp = self.new(c, h, w, f"{module}: NCHW copy of the input (.contiguous())") if nchw else None
        u = self.new(c, oh, ow)                        # interpolate
        if cp is not None:
            self.free(cp)
        y = self.conv(u, c, c, 3, oh, ow, module=f"{module}.conv", nchw_input=nchw)
        self.free(u)
        return y

    def resnet(self, x: int, c_in: int, c_out: int, h: int, w: int, module: str, temb: bool = False) -> int:
        """`module`: the ResnetBlock2D's path; `temb`: the UNet's resnets add the projected
        time embedding after conv1."""
        nchw = self.layouts.norm_copies                # the convs' inputs: GroupNorm's NCHW output
        a = self.norm(c_in, h, w)                      # norm1
        b = self.new(c_in, h, w); self.free(a)         # silu
        a = self.conv(b, c_in, c_out, 3, h, w, module=f"{module}.conv1", nchw_input=nchw); self.free(b)
        if temb:
            b = self.new(c_out, h, w); self.free(a)    # + time_emb_proj(temb)[:, :, None, None]
            a = b
        b = self.norm(c_out, h, w); self.free(a)       # norm2
        a = self.new(c_out, h, w); self.free(b)        # silu
        b = self.conv(a, c_out, c_out, 3, h, w, module=f"{module}.conv2", nchw_input=nchw); self.free(a)
        short = self.conv(x, c_in, c_out, 1, h, w, module=f"{module}.conv_shortcut") if c_in != c_out else None
        s = self.new(c_out, h, w)                      # x + h
        out = self.new(c_out, h, w); self.free(s)      # / output_scale_factor
        if short is not None:                          # return: input_tensor, then hidden_states
            self.free(short)
        self.free(b)
        return out


def vae_encoder(alloc: CachingAllocator, H: int, W: int, ws, fallbacks: list | None = None, itemsize: int = FP16,
                model: arch.Spec | None = None, layouts: Layouts = Layouts()) -> None:
    """Encoder.forward on the (1, 3, H, W) image: conv_in and the first two down blocks.
    model: the architecture's channels and layers (default: the bundled SD1.5 config)."""
    m = model or arch.spec()
    channels, layers = m.vae_channels, m.vae_layers
    s = Schedule(alloc, ws, 1, fallbacks, itemsize, layouts)
    h, w = H, W
    sample = s.conv(None, m.vae_in_channels, channels[0], 3, h, w, module="vae.encoder.conv_in")
    c_prev = channels[0]
    for i, c in enumerate(channels[:2]):
        x = sample
        for j in range(layers):
            y = s.resnet(x, c_prev if j == 0 else c, c, h, w, f"vae.encoder.down_blocks.{i}.resnets.{j}")
            if x != sample:
                s.free(x)
            x = y
        if i == 0:
            p = s._alloc(nbytes(1, c, h + 1, w + 1, itemsize=itemsize), f"F.pad (1, {c}, {h + 1}, {w + 1})")  # F.pad(x, (0, 1, 0, 1))
            y = s.conv(p, c, c, 3, h, w, stride=2, module=f"vae.encoder.down_blocks.{i}.downsamplers.0.conv",
                       in_hw=(h + 1, w + 1))
            s.free(p, x)
            x = y
            h, w = h // 2, w // 2
        s.free(sample)
        sample = x
        c_prev = c
    s.free(sample)


def vae_decoder(alloc: CachingAllocator, b: int, H: int, W: int, ws, fallbacks: list | None = None,
                itemsize: int = FP16, model: arch.Spec | None = None, layouts: Layouts = Layouts()) -> None:
    """Decoder.forward from up_blocks[1]'s upsampler to the (b, 3, H, W) image (4 levels:
    architecture.spec requires them); the decoder's blocks have layers_per_block + 1 resnets."""
    m = model or arch.spec()
    channels, layers = tuple(reversed(m.vae_channels)), m.vae_layers + 1
    s = Schedule(alloc, ws, b, fallbacks, itemsize, layouts)
    h, w = H // 4, W // 4
    x = s.new(channels[1], h, w)                       # up_blocks[1]'s last resnet output
    sample = s.upsample(channels[1], h, w, "vae.decoder.up_blocks.1.upsamplers.0")   # its upsampler
    s.free(x)
    h, w = 2 * h, 2 * w
    c_prev = channels[1]
    for i, c in enumerate(channels[2:], start=2):
        x = sample
        for j in range(layers):
            y = s.resnet(x, c_prev if j == 0 else c, c, h, w, f"vae.decoder.up_blocks.{i}.resnets.{j}")
            if x != sample:
                s.free(x)
            x = y
        if i < len(channels) - 1:
            y = s.upsample(c, h, w, f"vae.decoder.up_blocks.{i}.upsamplers.0")
            s.free(x)
            x = y
            h, w = 2 * h, 2 * w
        s.free(sample)
        sample = x
        c_prev = c
    n = s.norm(c_prev, h, w)                           # conv_norm_out
    a = s.new(c_prev, h, w); s.free(n)                 # silu
    out = s.conv(a, c_prev, m.vae_out_channels, 3, h, w, module="vae.decoder.conv_out",
                 nchw_input=layouts.norm_copies); s.free(a, sample)
    s.free(out)


def _unet_resnet(s: Schedule, x: int, c_in: int, c_out: int, h: int, w: int, module: str) -> int:
    """ResnetBlock2D with a time embedding."""
    return s.resnet(x, c_in, c_out, h, w, module, temb=True)


def _unet_transformer(s: Schedule, x: int, c: int, h: int, w: int, module: str) -> int:
    """Transformer2DModel with one BasicTransformerBlock, fused attention (AttnProcessor2_0).

    Frees follow CPython: a tensor goes when its last name is rebound or its frame returns
    (the processor's q, k, v after to_out; attn1's output when attn2's rebinds it)."""
    n = h * w
    tok = lambda ch: s.new(ch, n, 1, f"{module}: tokens ({s.b}, {n}, {ch})")  # noqa: E731  (B, N, ch) tensors
    a = s.norm(c, h, w)                                  # norm (GroupNorm)
    hs = s.conv(a, c, c, 1, h, w, module=f"{module}.proj_in", nchw_input=s.layouts.norm_copies); s.free(a)
    if s.layouts.channels_last:                          # the permuted NHWC map is contiguous
        n1 = tok(c)                                      # norm1
    else:                                                # LayerNorm's CUDA kernel copies its
        cp = tok(c)                                      # non-contiguous (permuted) input
        n1 = tok(c); s.free(cp)                          # norm1
    q, k, v = tok(c), tok(c), tok(c)
    o = tok(c)                                           # sdpa output
    t = tok(c); s.free(o)                                # to_out
    a1 = tok(c); s.free(t, q, k, v)                      # / rescale_output_factor; return
    h1 = tok(c)                                          # attn_output + hidden_states
    n2 = tok(c); s.free(n1)                              # norm2
    q = tok(c)
    o = tok(c)                                           # cross-attention over 77 tokens
    t = tok(c); s.free(o)
    a2 = tok(c); s.free(t, q, a1)                        # attn_output rebound
    h2 = tok(c); s.free(h1)                              # + hidden_states
    n3 = tok(c); s.free(n2)                              # norm3
    p = tok(8 * c)                                       # GEGLU proj
    g = tok(4 * c)                                       # gelu(gate)
    m = tok(4 * c); s.free(g, p)                         # hidden * gelu(gate)
    f = tok(c); s.free(m)                                # ff.net.2
    h3 = tok(c); s.free(h2, n3, a2, f, hs)               # + hidden_states; the block returns
    r = s.new(c, h, w)                                   # reshape/permute back (.contiguous())
    po = s.conv(r, c, c, 1, h, w, module=f"{module}.proj_out", nchw_input=True); s.free(r)
    out = s.new(c, h, w); s.free(po, h3)                 # + residual
    return out


def unet(alloc: CachingAllocator, B: int, levels: list[tuple[int, int]], ws, fallbacks: list | None = None,
         itemsize: int = FP16, model: arch.Spec | None = None, layouts: Layouts = Layouts()) -> None:
    """One UNet2DConditionModel.forward at batch B; levels[i] = (h_i, w_i), one per block.

    Needed for reserved memory when the VAE's cached blocks are smaller than the UNet's
    tensors (VAE tiling); otherwise the encoder's cached blocks hold the whole UNet.
    model: channels, layers, which blocks have transformers, conv_in/conv_out channels."""
    m = model or arch.spec()
    channels, layers, last = m.unet_channels, m.unet_layers, len(m.unet_channels) - 1
    s = Schedule(alloc, ws, B, fallbacks, itemsize, layouts)
    sample = s.conv(None, m.unet_in_channels, channels[0], 3, *levels[0], module="unet.conv_in")
    skips = [(sample, channels[0])]                      # down_block_res_samples, with channels
    c_prev = channels[0]
    for i, c in enumerate(channels):
        h, w = levels[i]
        x = sample
        for j in range(layers):
            y = _unet_resnet(s, x, c_prev if j == 0 else c, c, h, w, f"unet.down_blocks.{i}.resnets.{j}")
            if m.unet_down_attention[i]:
                z = _unet_transformer(s, y, c, h, w, f"unet.down_blocks.{i}.attentions.{j}")
                s.free(y)
                y = z
            skips.append((y, c))
            x = y
        if i < last:
            x = s.conv(x, c, c, 3, h, w, out_hw=levels[i + 1], module=f"unet.down_blocks.{i}.downsamplers.0.conv")
            skips.append((x, c))
        sample = x
        c_prev = c
    h, w = levels[last]
    top = channels[last]
    x = _unet_resnet(s, sample, top, top, h, w, "unet.mid_block.resnets.0")
    y = _unet_transformer(s, x, top, h, w, "unet.mid_block.attentions.0"); s.free(x)
    sample = _unet_resnet(s, y, top, top, h, w, "unet.mid_block.resnets.1"); s.free(y)
    for i, c in enumerate(reversed(channels)):
        lvl = last - i
        h, w = levels[lvl]
        res, skips = skips[-(layers + 1):], skips[:-(layers + 1)]
        x = sample
        for j in range(layers + 1):
            c_in = (c_prev if j == 0 else c) + res[-(j + 1)][1]
            cat = s.new(c_in, h, w)
            if j > 0:
                s.free(x)
            y = _unet_resnet(s, cat, c_in, c, h, w, f"unet.up_blocks.{i}.resnets.{j}"); s.free(cat)
            if m.unet_up_attention[i]:
                z = _unet_transformer(s, y, c, h, w, f"unet.up_blocks.{i}.attentions.{j}"); s.free(y)
                y = z
            x = y
        if lvl > 0:                                      # interpolate to the next skip's size
            y = s.upsample(c, h, w, f"unet.up_blocks.{i}.upsamplers.0", out_hw=levels[lvl - 1]); s.free(x)
            x = y
        s.free(sample)
        if lvl > 0:                                      # res_samples rebound by the next block
            s.free(*(t for t, _ in reversed(res)))       # (a tuple drops its items last first)
        sample = x
        c_prev = c
    n = s.norm(channels[0], *levels[0])                  # conv_norm_out
    s.free(sample)
    a = s.new(channels[0], *levels[0]); s.free(n)        # conv_act
    out = s.conv(a, channels[0], m.unet_out_channels, 3, *levels[0], module="unet.conv_out",
                 nchw_input=layouts.norm_copies)
    s.free(a, *(t for t, _ in reversed(res)), out)       # forward returns


def vae_decoder_low_res(alloc: CachingAllocator, b: int, H: int, W: int, ws, fallbacks: list | None = None,
                        itemsize: int = FP16, model: arch.Spec | None = None, layouts: Layouts = Layouts()) -> None:
    """Decoder.forward before vae_decoder's part: conv_in, the mid block and up_blocks[0] at
    H/8, up_blocks[1]'s resnets at H/4, all at the deepest channels (SD1.5: 512). After the VAE
    encoder these maps fit in its cached blocks and need no replay; with nothing big cached
    (txt2img: no encoder ran) they open their own segments (DERIVATION.md, "Pipelines")."""
    m = model or arch.spec()
    c, layers = m.vae_channels[-1], m.vae_layers + 1
    s = Schedule(alloc, ws, b, fallbacks, itemsize, layouts)
    h, w = H // 8, W // 8
    sample = s.conv(None, m.latent_channels, c, 3, h, w, module="vae.decoder.conv_in")
    x = s.resnet(sample, c, c, h, w, "vae.decoder.mid_block.resnets.0"); s.free(sample)
    n = s.norm(c, h, w, copies=layouts.channels_last)    # group_norm of the (B, C, N) view: copied if NHWC
    q, k, v = s.new(c, h, w), s.new(c, h, w), s.new(c, h, w); s.free(n)
    o = s.new(c, h, w); s.free(q, k, v)                  # sdpa output (q, k, v dropped with the processor's names)
    t = s.new(c, h, w); s.free(o)                        # to_out
    y = s.new(c, h, w); s.free(t, x)                     # + residual, / rescale_output_factor
    x = s.resnet(y, c, c, h, w, "vae.decoder.mid_block.resnets.1"); s.free(y)
    for i in (0, 1):
        for j in range(layers):
            y = s.resnet(x, c, c, h, w, f"vae.decoder.up_blocks.{i}.resnets.{j}"); s.free(x)
            x = y
        if i == 0:
            y = s.upsample(c, h, w, "vae.decoder.up_blocks.0.upsamplers.0"); s.free(x)
            x = y
            h, w = 2 * h, 2 * w
    s.free(x)                                            # vae_decoder starts from this output again
