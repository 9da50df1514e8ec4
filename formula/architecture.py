"""Every weight tensor of SD1.5, enumerated from the bundled config (no model is built).

Each function returns the tensors a module registers, as (name, shape, bytes_per_element),
in the order `Module._apply` visits them (children first, then a module's own tensors), which
is the order `.to("cuda")` allocates them. The counts are checked to the unit against models
built on the meta device (tests/test_weights.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from math import prod

FP16 = 2
INT64 = 8

Tensor = tuple[str, tuple[int, ...], int]


@lru_cache(maxsize=1)
def sd15() -> dict:
    return json.loads(resources.files(__package__).joinpath("data/sd15.json").read_text())


def _linear(name, n_in, n_out, bias=True) -> list[Tensor]:
    out = [(f"{name}.weight", (n_out, n_in), FP16)]
    return out + ([(f"{name}.bias", (n_out,), FP16)] if bias else [])


def _conv(name, c_in, c_out, k, bias=True) -> list[Tensor]:
    out = [(f"{name}.weight", (c_out, c_in, k, k), FP16)]
    return out + ([(f"{name}.bias", (c_out,), FP16)] if bias else [])


def _norm(name, c) -> list[Tensor]:  # GroupNorm and LayerNorm: weight and bias
    return [(f"{name}.weight", (c,), FP16), (f"{name}.bias", (c,), FP16)]


def _resnet(name, c_in, c_out, temb=None) -> list[Tensor]:
    """diffusers ResnetBlock2D: norm1, conv1, [time_emb_proj], norm2, conv2, [conv_shortcut]."""
    t = _norm(f"{name}.norm1", c_in) + _conv(f"{name}.conv1", c_in, c_out, 3)
    if temb:
        t += _linear(f"{name}.time_emb_proj", temb, c_out)
    t += _norm(f"{name}.norm2", c_out) + _conv(f"{name}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        t += _conv(f"{name}.conv_shortcut", c_in, c_out, 1)
    return t


def _attention(name, dim, cross_dim=None, bias=False, group_norm=False) -> list[Tensor]:
    """diffusers Attention: [group_norm], to_q, to_k, to_v, to_out.0 (to_out always has a bias)."""
    kv = cross_dim or dim
    t = _norm(f"{name}.group_norm", dim) if group_norm else []
    t += _linear(f"{name}.to_q", dim, dim, bias) + _linear(f"{name}.to_k", kv, dim, bias)
    t += _linear(f"{name}.to_v", kv, dim, bias) + _linear(f"{name}.to_out.0", dim, dim)
    return t


def _transformer2d(name, c, cross_dim) -> list[Tensor]:
    """Transformer2DModel with one BasicTransformerBlock (self-attn, cross-attn, GEGLU feed-forward)."""
    b = f"{name}.transformer_blocks.0"
    block = (
        _norm(f"{b}.norm1", c) + _attention(f"{b}.attn1", c)
        + _norm(f"{b}.norm2", c) + _attention(f"{b}.attn2", c, cross_dim)
        + _norm(f"{b}.norm3", c)
        + _linear(f"{b}.ff.net.0.proj", c, 8 * c) + _linear(f"{b}.ff.net.2", 4 * c, c)
    )
    return _norm(f"{name}.norm", c) + _conv(f"{name}.proj_in", c, c, 1) + block + _conv(f"{name}.proj_out", c, c, 1)


def unet_tensors(cfg: dict | None = None) -> list[Tensor]:
    cfg = cfg or sd15()["unet"]
    ch, layers, cross = cfg["block_out_channels"], cfg["layers_per_block"], cfg["cross_attention_dim"]
    temb = 4 * ch[0]
    t = _conv("conv_in", cfg["in_channels"], ch[0], 3)
    t += _linear("time_embedding.linear_1", ch[0], temb) + _linear("time_embedding.linear_2", temb, temb)
    c_prev = ch[0]
    for i, (kind, c) in enumerate(zip(cfg["down_block_types"], ch)):
        blk = f"down_blocks.{i}"
        attn = kind.startswith("CrossAttn")
        if attn:
            t += [x for j in range(layers) for x in _transformer2d(f"{blk}.attentions.{j}", c, cross)]
        t += [x for j in range(layers) for x in _resnet(f"{blk}.resnets.{j}", c_prev if j == 0 else c, c, temb)]
        if i < len(ch) - 1:
            t += _conv(f"{blk}.downsamplers.0.conv", c, c, 3)
        c_prev = c
    rch = list(reversed(ch))
    up = []
    for i, (kind, c) in enumerate(zip(cfg["up_block_types"], rch)):
        blk = f"up_blocks.{i}"
        prev_out = rch[i - 1] if i > 0 else rch[0]
        c_in = rch[min(i + 1, len(ch) - 1)]
        if kind.startswith("CrossAttn"):
            up += [x for j in range(layers + 1) for x in _transformer2d(f"{blk}.attentions.{j}", c, cross)]
        for j in range(layers + 1):
            skip = c_in if j == layers else c
            up += _resnet(f"{blk}.resnets.{j}", (prev_out if j == 0 else c) + skip, c, temb)
        if i < len(ch) - 1:
            up += _conv(f"{blk}.upsamplers.0.conv", c, c, 3)
    # Module registration order in UNet2DConditionModel.__init__: conv_in, time_embedding,
    # down_blocks, up_blocks, mid_block, conv_norm_out, conv_out.
    top = ch[-1]
    mid = (
        _transformer2d("mid_block.attentions.0", top, cross)
        + _resnet("mid_block.resnets.0", top, top, temb) + _resnet("mid_block.resnets.1", top, top, temb)
    )
    t += up + mid
    t += _norm("conv_norm_out", ch[0]) + _conv("conv_out", ch[0], cfg["out_channels"], 3)
    return t


def _vae_mid(name, c) -> list[Tensor]:
    return (
        _attention(f"{name}.attentions.0", c, bias=True, group_norm=True)
        + _resnet(f"{name}.resnets.0", c, c) + _resnet(f"{name}.resnets.1", c, c)
    )


def vae_encoder_tensors(cfg: dict | None = None) -> list[Tensor]:
    """Encoder and quant_conv (what vae.encode runs)."""
    cfg = cfg or sd15()["vae"]
    ch, layers, z = cfg["block_out_channels"], cfg["layers_per_block"], cfg["latent_channels"]
    t = _conv("encoder.conv_in", cfg["in_channels"], ch[0], 3)
    c_prev = ch[0]
    for i, c in enumerate(ch):
        blk = f"encoder.down_blocks.{i}"
        t += [x for j in range(layers) for x in _resnet(f"{blk}.resnets.{j}", c_prev if j == 0 else c, c)]
        if i < len(ch) - 1:
            t += _conv(f"{blk}.downsamplers.0.conv", c, c, 3)
        c_prev = c
    t += _vae_mid("encoder.mid_block", ch[-1])
    t += _norm("encoder.conv_norm_out", ch[-1]) + _conv("encoder.conv_out", ch[-1], 2 * z, 3)
    return t + _conv("quant_conv", 2 * z, 2 * z, 1)


def vae_decoder_tensors(cfg: dict | None = None) -> list[Tensor]:
    """Decoder and post_quant_conv (what vae.decode runs)."""
    cfg = cfg or sd15()["vae"]
    ch, layers, z = cfg["block_out_channels"], cfg["layers_per_block"], cfg["latent_channels"]
    rch = list(reversed(ch))
    t = _conv("decoder.conv_in", z, rch[0], 3)
    # Decoder registers up_blocks before mid_block.
    c_prev = rch[0]
    for i, c in enumerate(rch):
        blk = f"decoder.up_blocks.{i}"
        t += [x for j in range(layers + 1) for x in _resnet(f"{blk}.resnets.{j}", c_prev if j == 0 else c, c)]
        if i < len(ch) - 1:
            t += _conv(f"{blk}.upsamplers.0.conv", c, c, 3)
        c_prev = c
    t += _vae_mid("decoder.mid_block", rch[0])
    t += _norm("decoder.conv_norm_out", ch[0]) + _conv("decoder.conv_out", ch[0], cfg["out_channels"], 3)
    return t + _conv("post_quant_conv", z, z, 1)


def _clip_layers(name, n, d, mlp) -> list[Tensor]:
    t = []
    for i in range(n):
        L = f"{name}.layers.{i}"
        t += _linear(f"{L}.self_attn.k_proj", d, d) + _linear(f"{L}.self_attn.v_proj", d, d)
        t += _linear(f"{L}.self_attn.q_proj", d, d) + _linear(f"{L}.self_attn.out_proj", d, d)
        t += _norm(f"{L}.layer_norm1", d) + _linear(f"{L}.mlp.fc1", d, mlp) + _linear(f"{L}.mlp.fc2", mlp, d)
        t += _norm(f"{L}.layer_norm2", d)
    return t


def text_encoder_tensors(cfg: dict | None = None) -> list[Tensor]:
    cfg = cfg or sd15()["text_encoder"]
    d, pos = cfg["hidden_size"], cfg["max_position_embeddings"]
    t = [("embeddings.token_embedding.weight", (cfg["vocab_size"], d), FP16),
         ("embeddings.position_embedding.weight", (pos, d), FP16),
         ("embeddings.position_ids", (1, pos), INT64)]
    t += _clip_layers("encoder", cfg["num_hidden_layers"], d, cfg["intermediate_size"])
    return t + _norm("final_layer_norm", d)


def safety_checker_tensors(cfg: dict | None = None) -> list[Tensor]:
    cfg = cfg or sd15()["safety_checker"]
    v = cfg["vision_config"]
    d, p = v["hidden_size"], v["patch_size"]
    positions = (v["image_size"] // p) ** 2 + 1
    proj = cfg["projection_dim"]
    t = _conv("vision_model.embeddings.patch_embedding", v["num_channels"], d, p, bias=False)
    t += [("vision_model.embeddings.position_embedding.weight", (positions, d), FP16),
          ("vision_model.embeddings.class_embedding", (d,), FP16),
          ("vision_model.embeddings.position_ids", (1, positions), INT64)]
    t += _norm("vision_model.pre_layrnorm", d)
    t += _clip_layers("vision_model.encoder", v["num_hidden_layers"], d, v["intermediate_size"])
    t += _norm("vision_model.post_layernorm", d)
    t += _linear("visual_projection", d, proj, bias=False)
    # Registered directly on StableDiffusionSafetyChecker: 17 concepts, 3 special-care concepts.
    t += [("concept_embeds", (17, proj), FP16), ("special_care_embeds", (3, proj), FP16),
          ("concept_embeds_weights", (17,), FP16), ("special_care_embeds_weights", (3,), FP16)]
    return t


def vae_tensors(cfg: dict | None = None) -> list[Tensor]:
    """AutoencoderKL in registration order: encoder, decoder, quant_conv, post_quant_conv."""
    enc, dec = vae_encoder_tensors(cfg), vae_decoder_tensors(cfg)
    return enc[:-2] + dec[:-2] + enc[-2:] + dec[-2:]


MODELS = {
    "unet": unet_tensors,
    "vae": vae_tensors,
    "text_encoder": text_encoder_tensors,
    "safety_checker": safety_checker_tensors,
}


def model_tensors(name: str, spec: "Spec | None" = None) -> list[Tensor]:
    """MODELS[name]'s tensors for an architecture (default: the bundled SD1.5 config)."""
    return MODELS[name](None if spec is None else spec.config[name])


def in_dtype(tensors: list[Tensor], itemsize: int) -> list[Tensor]:
    """The tensors as a pipeline of that element size holds them: build_pipeline's
    ``m.to(dtype)`` and from_pretrained(torch_dtype=...) cast the floating tensors (enumerated
    at FP16 above); the int64 position_ids keep 8 bytes."""
    return [(n, s, itemsize if b == FP16 else b) for n, s, b in tensors]


def numel(tensors: list[Tensor], floating_only=True) -> int:
    return sum(prod(s) for _, s, b in tensors if b == FP16 or not floating_only)


# --- the numbers the live sets and schedules read (activations.py, schedule.py) ----------------

# The block pattern the live sets and schedules model (SD1.5's): cross-attention in every down
# block but the deepest, mirrored in the up blocks; one transformer layer per block.
_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("UpBlock2D", "CrossAttnUpBlock2D")


@dataclass(frozen=True)
class Spec:
    """One architecture's channel counts, block structure, head counts and token counts, from
    a config of sd15.json's layout (`spec(config)`); activations.Shape carries it."""

    unet_channels: tuple[int, ...]       # block_out_channels, level 0 first
    unet_layers: int                     # layers_per_block (up blocks: + 1)
    unet_heads: int                      # attention_head_dim: diffusers reads it as the head count
    unet_in_channels: int                # conv_in: 4 (img2img, txt2img), 9 (the inpainting UNet)
    unet_out_channels: int
    unet_down_attention: tuple[bool, ...]    # down block i has cross-attention transformers
    unet_up_attention: tuple[bool, ...]
    vae_channels: tuple[int, ...]
    vae_layers: int
    vae_sample_size: int                 # AutoencoderKL.tile_sample_min_size (tiling)
    vae_in_channels: int                 # the image's channels
    vae_out_channels: int
    latent_channels: int
    text_tokens: int                     # the tokenizer pads every prompt to this many tokens
    text_dim: int
    text_mlp: int
    text_heads: int
    vision_tokens: int                   # patches + class token
    vision_dim: int
    vision_mlp: int
    vision_heads: int
    vision_input: int                    # the feature extractor's crop: pixel_values' side
    config_json: str = field(repr=False, default="")   # the whole config, for the weight tensors

    @property
    def config(self) -> dict:
        return _parsed(self.config_json)

    @property
    def vae_scale_factor(self) -> int:
        """diffusers: 2 ** (len(vae.config.block_out_channels) - 1)."""
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def vae_norm_groups(self) -> int:
        """The VAE's GroupNorm groups (norm_num_groups): the size of its statistics."""
        return int(self.config["vae"]["norm_num_groups"])

    @property
    def time_embed_dim(self) -> int:
        """UNet2DConditionModel: block_out_channels[0] * 4."""
        return 4 * self.unet_channels[0]

    def unet_skips(self) -> list[tuple[int, int]]:
        """down_block_res_samples as (level, channels), in the order the down path appends them:
        conv_in's output, each resnet (+ transformer) output, each downsampler's output."""
        ch = self.unet_channels
        out = [(0, ch[0])]
        for i, c in enumerate(ch):
            out += [(i, c)] * self.unet_layers
            if i < len(ch) - 1:
                out.append((i + 1, c))
        return out


@lru_cache(maxsize=None)
def _parsed(config_json: str) -> dict:
    return json.loads(config_json)


def spec(config: dict | None = None) -> Spec:
    """The Spec of a config (default: the bundled sd15.json); ValueError for a block pattern
    the live sets do not model."""
    if config is None:
        return _bundled_spec()
    return _spec(json.dumps(config, sort_keys=True))


@lru_cache(maxsize=1)
def _bundled_spec() -> Spec:
    return _spec(json.dumps(sd15(), sort_keys=True))


@lru_cache(maxsize=None)
def _spec(config_json: str) -> Spec:
    cfg = _parsed(config_json)
    u, v, t = cfg["unet"], cfg["vae"], cfg["text_encoder"]
    vis, crop = cfg["safety_checker"]["vision_config"], cfg["feature_extractor"]["crop_size"]
    n = len(u["block_out_channels"])
    down = tuple(kind == _DOWN[0] for kind in u["down_block_types"])
    up = tuple(kind == _UP[1] for kind in u["up_block_types"])
    pattern = set(u["down_block_types"]) <= set(_DOWN) and set(u["up_block_types"]) <= set(_UP) and \
        down == (True,) * (n - 1) + (False,) and up == tuple(reversed(down))
    if not pattern or n < 2 or u.get("transformer_layers_per_block", 1) != 1 or len(v["block_out_channels"]) != 4:
        raise ValueError("the equation models SD1.5's block pattern: cross-attention in every UNet down block "
                         "but the deepest (mirrored up), one transformer layer per block, 4 VAE levels")
    return Spec(
        unet_channels=tuple(u["block_out_channels"]), unet_layers=u["layers_per_block"],
        unet_heads=u["attention_head_dim"], unet_in_channels=u["in_channels"], unet_out_channels=u["out_channels"],
        unet_down_attention=down, unet_up_attention=up,
        vae_channels=tuple(v["block_out_channels"]), vae_layers=v["layers_per_block"], vae_sample_size=v["sample_size"],
        vae_in_channels=v["in_channels"], vae_out_channels=v["out_channels"], latent_channels=v["latent_channels"],
        text_tokens=t["max_position_embeddings"], text_dim=t["hidden_size"], text_mlp=t["intermediate_size"],
        text_heads=t["num_attention_heads"],
        vision_tokens=(vis["image_size"] // vis["patch_size"]) ** 2 + 1, vision_dim=vis["hidden_size"],
        vision_mlp=vis["intermediate_size"], vision_heads=vis["num_attention_heads"], vision_input=crop,
        config_json=config_json)
