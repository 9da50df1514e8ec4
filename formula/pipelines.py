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
        raise InputError(f"the mask is {mw}x{mh} but the image is {iw}x{ih}: inpaint needs a mask of the image's size")
    return o.pipe_height or DEFAULT_SIZE, o.pipe_width or DEFAULT_SIZE


def encodes_image(o: Options) -> bool:
    """The inpaint pipeline VAE-encodes the image itself in prepare_latents when the 4-channel
    UNet needs image_latents for blending (return_image_latents) or strength < 1 noises them."""
    return o.unet_in_channels == 4 or o.strength < 1


def text_encoder_txt2img(s: act.Shape, backend: str) -> list[act.Peak]:
    """txt2img's text_encoder stage: the CLIP layers, then prepare_latents' randn_tensor on the
    device and latents * init_noise_sigma (a new tensor; the noise dies at the rebinding)."""
    cands = act.text_encoder(s, backend)[:-1]             # the last one is img2img's image upload
    end = act.merge(act.prompt_state(s), act.Peak("prepare_latents: randn_tensor * init_noise_sigma"))
    end.add("state", "randn latents", act.nbytes(s.n, 4, s.h, s.w))
    end.add("state", "latents * init_noise_sigma", act.nbytes(s.n, 4, s.h, s.w))
    return cands + [end]


def stage_candidates(stages: dict, s: act.Shape, o: Options, backends: dict, ws) -> dict:
    """img2img's stage candidates (equation._stage_candidates) turned into this pipeline's;
    backends: each model's SDPA backend (equation._backends)."""
    if o.pipeline == "txt2img":
        out = dict(stages)
        del out["vae_encode"]
        out["text_encoder"] = text_encoder_txt2img(s, backends["clip"])
        return out
    return stages
