"""What each diffusers pipeline runs, at what size, and what it carries (DERIVATION.md, "Pipelines").

The three SD1.5 pipelines share the models and most of the equation's terms (activations.py);
they differ in the call's size, in which stages run and in the small tensors each carries:

- img2img (StableDiffusionImg2ImgPipeline): the image's size rounded down to 8, the image
  uploaded and VAE-encoded, int(n * strength) + 1 of PNDM's n + 1 timesteps;
- txt2img (StableDiffusionPipeline): pipe(height, width), default unet.config.sample_size x
  vae_scale_factor = 512; latents from randn_tensor on the device; no image, no VAE encode;
  every timestep runs;
- inpaint (StableDiffusionInpaintPipeline): pipe(height, width), default 512 like txt2img,
  NOT the image's size: preprocess resizes the image and the mask to it. The VAE encodes the
  image (the 4-channel UNet blends its latents back each step; the 9-channel UNet only when
  strength < 1) and the masked image (always); the mask and the masked-image latents are
  kept for the loop. Default strength 1.0.
"""

from __future__ import annotations

from . import activations as act
from .architecture import sd15
from .options import InputError, Options

VAE_SCALE_FACTOR = 2 ** (len(sd15()["vae"]["block_out_channels"]) - 1)    # 8
DEFAULT_SIZE = sd15()["unet"]["sample_size"] * VAE_SCALE_FACTOR             # 512


def _side(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InputError(f"{what} must be a whole number of pixels, got {value!r}")
    if value < 8:
        raise InputError(f"{what} must be at least 8 pixels, got {value}")
    return value


def call_size(height, width, o: Options) -> tuple[int, int]:
    """(H, W) the pipeline works at. height, width: estimate()'s arguments, the image's size
    (img2img, inpaint) or the output's (txt2img, where o.pipe_height/o.pipe_width say the same)."""
    if o.pipeline == "img2img":
        H, W = _side(height, "height"), _side(width, "width")
        return H - H % 8, W - W % 8  # get_default_height_width: x - x % vae_scale_factor
    if o.pipeline == "txt2img":
        sizes = []
        for what, given, option in (("height", height, o.pipe_height), ("width", width, o.pipe_width)):
            if given is not None and option is not None and _side(given, what) != option:
                raise InputError(f"txt2img {what} given twice: {given} and pipe_{what}={option}")
            side = _side(given, what) if given is not None else option or DEFAULT_SIZE
            if side % VAE_SCALE_FACTOR:
                raise InputError(f"txt2img {what} must be a multiple of 8 (StableDiffusionPipeline.check_inputs "
                                 f"raises otherwise), got {side}: use {side - side % 8}")
            sizes.append(side)
        return sizes[0], sizes[1]
    # inpaint: the image and the mask are inputs; the call runs at pipe(height=, width=) (default 512)
    if height is None or width is None:
        raise InputError("inpaint needs the image's height and width (an image file or WIDTHxHEIGHT)")
    image = (_side(height, "height"), _side(width, "width"))
    if o.mask_size is None:
        raise InputError("inpaint needs a mask_image: give its size (--mask FILE or WIDTHxHEIGHT; "
                         "Python: mask_size=(height, width))")
    if tuple(o.mask_size) != image:
        (mh, mw), (ih, iw) = o.mask_size, image
        raise InputError(f"the mask is {mw}x{mh} but the image is {iw}x{ih}: give the mask of this image, at its size "
                         "(diffusers would resize any mask to pipe(height, width); sd-vram takes a mismatch for a wrong file)")
    return o.pipe_height or DEFAULT_SIZE, o.pipe_width or DEFAULT_SIZE


def encodes_image(o: Options) -> bool:
    """The inpaint pipeline VAE-encodes the image itself in prepare_latents when the 4-channel
    UNet needs image_latents for blending (return_image_latents) or strength < 1 noises them."""
    return o.unet_in_channels == 4 or o.strength < 1


def encodes_before_unet(o: Options) -> bool:
    """The VAE encoder runs before the UNet (img2img, inpaint): its full-resolution blocks are
    cached when the UNet starts and hold all its tensors (DERIVATION.md section 8); txt2img's
    UNet starts from the resident segments alone, so its own order decides its segments."""
    return o.pipeline != "txt2img"


def text_encoder_txt2img(s: act.Shape, backend: str) -> list[act.Peak]:
    """txt2img's text_encoder stage: the CLIP layers, then prepare_latents' randn_tensor on the
    device and latents * init_noise_sigma (a new tensor; the noise dies at the rebinding)."""
    cands = act.text_encoder(s, backend)[:-1]             # the last one is img2img's image upload
    end = act.merge(act.prompt_state(s), act.Peak("prepare_latents: randn_tensor * init_noise_sigma"))
    end.add("state", "randn latents", s.bytes(s.n, 4, s.h, s.w))
    end.add("state", "latents * init_noise_sigma", s.bytes(s.n, 4, s.h, s.w))
    return cands + [end]


def stage_candidates(stages: dict, s: act.Shape, o: Options, backends: dict, ws) -> dict:
    """img2img's stage candidates (equation._stage_candidates) turned into this pipeline's;
    backends: each model's SDPA backend (equation._backends)."""
    if o.pipeline == "txt2img":
        out = dict(stages)
        del out["vae_encode"]
        out["text_encoder"] = text_encoder_txt2img(s, backends["clip"])
        return out
    if o.pipeline == "inpaint":
        return _inpaint(stages, s, o)
    return stages


def inpaint_state(s: act.Shape, o: Options) -> act.Peak:
    """What the inpaint loop carries besides img2img's latents (the PNDM history is the same):
    prepare_latents' noise (return_noise) and, for the 4-channel UNet, image_latents (the
    encoded image repeated n times, blended back each step); prepare_mask_latents' mask
    (interpolated to the latents' size on the host, uploaded, repeated n times and cat x2 with
    CFG) and masked_image_latents (likewise, 4 channels)."""
    p = act.Peak("inpaint state")
    p.add("state", "noise (prepare_latents, return_noise)", s.bytes(s.n, 4, s.h, s.w))
    if o.unet_in_channels == 4:
        p.add("state", "image_latents (repeat n)", s.bytes(s.n, 4, s.h, s.w))
    p.add("state", "mask (cat x2 with CFG)", s.bytes(s.B, 1, s.h, s.w))
    p.add("state", "masked_image_latents (cat x2 with CFG)", s.bytes(s.B, 4, s.h, s.w))
    return p


def _inpaint(stages: dict, s: act.Shape, o: Options) -> dict:
    """The inpaint pipeline's stages from img2img's: the same text encoder (the image upload in
    prepare_latents, or with the 9-channel UNet at strength 1 the masked image's in
    prepare_mask_latents, ends it), the VAE encoder on a (1, 3, H, W) image once or twice (the
    second pass, on the masked image, also holds latents, noise and image_latents: its live
    sets are the larger), then the UNet, the decoder and the safety checker with the inpaint
    state held. The 9-channel UNet's input is cat([latent_model_input, mask,
    masked_image_latents], dim=1): (B, 9, h, w) instead of (B, 4, h, w)."""
    held = inpaint_state(s, o)
    second_encode = act.Peak("second VAE encode: the first one's outputs")
    second_encode.add("state", "latents, noise", s.bytes(s.n, 4, s.h, s.w), 2)
    if encodes_image(o) and o.unet_in_channels == 4:
        second_encode.add("state", "image_latents (repeat n)", s.bytes(s.n, 4, s.h, s.w))
    mask = act.Peak("mask on the device")
    mask.add("state", "mask (uploaded)", s.bytes(1, 1, s.h, s.w))
    out = {}
    for name, cands in stages.items():
        if name == "vae_encode":
            out[name] = [act.merge(second_encode, mask, p) for p in cands]
        elif name == "text_encoder":
            out[name] = cands
        else:
            out[name] = [act.merge(held, p) for p in cands]
    return out   # the 9-channel UNet's wider input: activations.unet reads Shape.model.unet_in_channels


def check_slice_size(o, model) -> None:
    """UNet2DConditionModel.set_attention_slice (pipe.enable_attention_slicing(N)) raises "size N
    has to be smaller or equal to <heads>" for a slice size above an attention layer's heads."""
    if isinstance(o.attention_slicing, int) and o.attention_slicing > model.unet_heads:
        raise InputError(f"attention_slicing {o.attention_slicing}: the UNet's attention has {model.unet_heads} heads, "
                         f"and diffusers refuses a slice size above that (1 to {model.unet_heads}, auto or max)")
