"""The order in which the VAE allocates and frees its feature maps (DERIVATION.md, section 4).

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

A name drops when the Python variable holding it is rebound (CPython frees at refcount 0).
Only the blocks at full and half resolution are replayed (and the upsampler into half
resolution): the maps below are 1/16 of a full-resolution map or smaller and fit in the
blocks the big maps leave cached.
"""

from __future__ import annotations

from .activations import FP16, conv_workspace, nbytes
from .allocator import Segments


class Schedule:
    """Replays allocations and frees through the allocator model as they are written."""

    def __init__(self, seg: Segments, ws_rule: str, batch: int):
        self.seg, self.ws_rule, self.b = seg, ws_rule, batch
        self._blocks: dict[int, int] = {}
        self._next = 0

    def new(self, c: int, h: int, w: int) -> int:
        return self._alloc(nbytes(self.b, c, h, w))

    def _alloc(self, size: int) -> int:
        t = self._next
        self._next += 1
        self._blocks[t] = self.seg.alloc_one(size)
        return t

    def free(self, *tensors: int) -> None:
        for t in tensors:
            self.seg.free_one(self._blocks.pop(t))

    def conv(self, x: int, c_in: int, c_out: int, k: int, h: int, w: int, stride: int = 1) -> int:
        y = self.new(c_out, h // stride, w // stride)
        ws = conv_workspace(self.ws_rule, nbytes(self.b, c_in, h, w), nbytes(self.b, c_out, h // stride, w // stride),
                            c_in * c_out * k * k * FP16)
        if ws:
            self.free(self._alloc(ws))
        return y

    def resnet(self, x: int, c_in: int, c_out: int, h: int, w: int) -> int:
        a = self.new(c_in, h, w)                       # norm1
        b = self.new(c_in, h, w); self.free(a)         # silu
        a = self.conv(b, c_in, c_out, 3, h, w); self.free(b)
        b = self.new(c_out, h, w); self.free(a)        # norm2
        a = self.new(c_out, h, w); self.free(b)        # silu
        b = self.conv(a, c_out, c_out, 3, h, w); self.free(a)
        short = self.conv(x, c_in, c_out, 1, h, w) if c_in != c_out else None
        s = self.new(c_out, h, w)                      # x + h
        out = self.new(c_out, h, w); self.free(s)      # / output_scale_factor
        self.free(b)
        if short is not None:
            self.free(short)
        return out


def vae_encoder(seg: Segments, H: int, W: int, ws_rule: str, channels=(128, 256, 512, 512), layers: int = 2) -> None:
    """Encoder.forward on the (1, 3, H, W) image: conv_in and the first two down blocks."""
    s = Schedule(seg, ws_rule, 1)
    h, w = H, W
    sample = s.conv(None, 3, channels[0], 3, h, w)
    c_prev = channels[0]
    for i, c in enumerate(channels[:2]):
        x = sample
        for j in range(layers):
            y = s.resnet(x, c_prev if j == 0 else c, c, h, w)
            if x != sample:
                s.free(x)
            x = y
        if i == 0:
            p = s._alloc(nbytes(1, c, h + 1, w + 1))  # F.pad(x, (0, 1, 0, 1))
            y = s.conv(p, c, c, 3, h, w, stride=2)
            s.free(p, x)
            x = y
            h, w = h // 2, w // 2
        s.free(sample)
        sample = x
        c_prev = c
    s.free(sample)


def vae_decoder(seg: Segments, b: int, H: int, W: int, ws_rule: str, channels=(512, 512, 256, 128), layers: int = 3) -> None:
    """Decoder.forward from up_blocks[1]'s upsampler to the (b, 3, H, W) image."""
    s = Schedule(seg, ws_rule, b)
    h, w = H // 4, W // 4
    x = s.new(channels[1], h, w)                       # up_blocks[1]'s last resnet output
    u = s.new(channels[1], 2 * h, 2 * w)               # its upsampler: interpolate, conv
    sample = s.conv(u, channels[1], channels[1], 3, 2 * h, 2 * w)
    s.free(u, x)
    h, w = 2 * h, 2 * w
    c_prev = channels[1]
    for i, c in enumerate(channels[2:], start=2):
        x = sample
        for j in range(layers):
            y = s.resnet(x, c_prev if j == 0 else c, c, h, w)
            if x != sample:
                s.free(x)
            x = y
        if i < len(channels) - 1:
            u = s.new(c, 2 * h, 2 * w)                 # interpolate
            # batch >= 2: another cuDNN engine, workspace taken as 0 (activations.vae_decode_upsampler)
            y = s.conv(u, c, c, 3, 2 * h, 2 * w) if b == 1 else s.new(c, 2 * h, 2 * w)
            s.free(u, x)
            x = y
            h, w = 2 * h, 2 * w
        s.free(sample)
        sample = x
        c_prev = c
    n = s.new(c_prev, h, w)                            # conv_norm_out
    a = s.new(c_prev, h, w); s.free(n)                 # silu
    out = s.conv(a, c_prev, 3, 3, h, w); s.free(a, sample)
    s.free(out)
