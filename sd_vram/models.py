"""Build the SD1.5 img2img pipeline from the bundled config, with random weights.

Memory does not depend on weight values, so a pipeline built here on the meta device (no
host memory), on fake CUDA, or on a real GPU with random fp16 weights allocates exactly the
tensors the published checkpoint does. Real weights are loaded only where the user points
at them (`load_pipeline(path_or_id)`).
"""

from __future__ import annotations

import contextlib
import json
from functools import lru_cache
from importlib import resources

import torch


@lru_cache(maxsize=1)
def sd15_config() -> dict:
    """The bundled SD1.5 architecture (formula/data/sd15.json)."""
    text = resources.files("sd_vram.formula").joinpath("data/sd15.json").read_text()
    return json.loads(text)


def _strip(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


# Each builder takes a config of sd15.json's layout (default: the bundled one), so a model of a
# modified architecture is a config change (the equation reads the same config:
# sd_vram.formula.architecture.spec).
def build_unet(config: dict | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**_strip((config or sd15_config())["unet"]))


def build_vae(config: dict | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**_strip((config or sd15_config())["vae"]))


def build_text_encoder(config: dict | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**(config or sd15_config())["text_encoder"]))


def build_safety_checker(config: dict | None = None):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    cfg = (config or sd15_config())["safety_checker"]
    return StableDiffusionSafetyChecker(
        CLIPConfig(text_config=cfg["text_config"], vision_config=cfg["vision_config"],
                   projection_dim=cfg["projection_dim"])
    )


def build_scheduler(config: dict | None = None):
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config((config or sd15_config())["scheduler"])


# diffusers exposes LMSDiscreteScheduler as a dummy that raises without scipy; its module still
# defines the class (it needs scipy.integrate only in get_lms_coefficient)
_SCHEDULER_MODULES = {"LMSDiscreteScheduler": "diffusers.schedulers.scheduling_lms_discrete"}


def scheduler_class(name: str):
    """The diffusers class of a scheduler option (formula/schedulers.py names them)."""
    import importlib

    from sd_vram.formula import schedulers

    cls = schedulers.get(name).diffusers_class
    return getattr(importlib.import_module(_SCHEDULER_MODULES.get(cls, "diffusers")), cls)


def switch_scheduler(scheduler, name: str):
    """What users write: X.from_config(pipe.scheduler.config), X the class of `name`."""
    return scheduler_class(name).from_config(scheduler.config)


def build_feature_extractor(config: dict | None = None):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(**(config or sd15_config())["feature_extractor"])


def build_tokenizer():
    """The exact SD1.5 CLIP tokenizer, rebuilt offline from the bundled BPE merges."""
    from transformers import CLIPTokenizer

    from sd_vram.formula.tokenizer import write_vocab_files

    vocab_file, merges_file = write_vocab_files()
    return CLIPTokenizer(vocab_file, merges_file, model_max_length=77)


@contextlib.contextmanager
def quiet_libraries():
    """transformers' and diffusers' notices while the pipeline is built (the torchvision-less
    CLIPImageProcessor fallback, an empty list of fp32 modules on .to(fp16)) say nothing about
    memory: they stay off stderr. Errors still show."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = tlog.get_verbosity(), dlog.get_verbosity()
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(levels[0])
        dlog.set_verbosity(levels[1])


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of an Options.dtype name (fp16, bf16, fp32)."""
    from sd_vram.formula.options import DTYPE_TORCH_NAME

    return getattr(torch, DTYPE_TORCH_NAME[name])


def build_pipeline(device="meta", dtype=torch.float16, safety_checker: bool = True, seed: int = 0,
                   config: dict | None = None, channels_last: bool = False):
    """StableDiffusionImg2ImgPipeline from the bundled config (or `config`, of its layout)
    with random weights.

    device="meta" builds without memory (for the simulation, which moves it to fake CUDA);
    a CUDA device gets random weights drawn on the GPU itself (fast, no host copy).
    channels_last: the UNet's and the VAE's weights in torch.channels_last before they reach
    the device (Options.channels_last).
    """
    with quiet_libraries():
        return _build_pipeline(device, dtype, safety_checker, seed, config, channels_last)


def to_channels_last(*modules) -> None:
    """``module.to(memory_format=torch.channels_last)``: every 4-D weight re-strided (a copy each)."""
    for m in modules:
        m.to(memory_format=torch.channels_last)


def is_channels_last(t: torch.Tensor) -> bool:
    """Tensor.suggest_memory_format() == channels_last, from the strides alone: a channels-last
    (C_out, C_in, 1, 1) filter is contiguous too, and a contiguous one is channels-last-contiguous,
    so neither is_contiguous test tells them apart."""
    from torch._prims_common import suggest_memory_format

    return t.dim() == 4 and suggest_memory_format(t) == torch.channels_last


def runs_nhwc(weight: torch.Tensor) -> bool:
    """cudnn_conv_suggest_memory_format's NHWC for a channels-last filter (not float64)."""
    return is_channels_last(weight) and weight.dtype != torch.float64


def copies_to_nhwc(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """_convolution's ``input.contiguous(channels_last)`` copies x: the conv runs NHWC (runs_nhwc)
    and x is not channels-last-contiguous."""
    return runs_nhwc(weight) and not x.is_contiguous(memory_format=torch.channels_last)


def _build_pipeline(device, dtype, safety_checker: bool, seed: int, config: dict | None = None,
                    channels_last: bool = False):
    from diffusers import StableDiffusionImg2ImgPipeline

    with torch.device("meta"):
        unet, vae, text_encoder = build_unet(config), build_vae(config), build_text_encoder(config)
        checker = build_safety_checker(config) if safety_checker else None
    # The order pipe.to("cuda") moves a loaded pipeline's models in (sorted component names:
    # safety_checker, text_encoder, unet, vae), so the weights pack into allocator segments
    # as they do with real weights.
    modules = [m for m in (checker, text_encoder, unet, vae) if m is not None]
    for m in modules:
        m.to(dtype)  # on meta: no memory; the GPU then gets fp16 tensors only, as from_pretrained
    if channels_last:   # on meta too: to_empty's empty_like keeps the strides
        to_channels_last(unet, vae)
    if str(device) != "meta":
        gen = torch.Generator(device=device).manual_seed(seed)
        for m in modules:
            m.to_empty(device=device)
            _randomize(m, gen)
    for m in modules:
        m.eval().requires_grad_(False)
    return StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer(), unet=unet,
        scheduler=build_scheduler(config), safety_checker=checker,
        feature_extractor=build_feature_extractor(config), requires_safety_checker=safety_checker,
    )


@torch.no_grad()
def _randomize(module, gen):
    """Small random floats (and the int64 position ids a real checkpoint holds)."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point():
            t.normal_(0.0, 0.02, generator=gen)
        elif name.endswith("position_ids"):
            t.copy_(torch.arange(t.shape[-1], device=t.device).expand_as(t))
    # The safety checker flags an image when a cosine similarity exceeds a concept's threshold.
    # Random thresholds would flag almost every image and add a zeros_like(image) that a real
    # checkpoint on a benign image never allocates; thresholds above 1 (cosines are <= 1)
    # keep the random checker on the real checkpoint's usual path.
    for name in ("concept_embeds_weights", "special_care_embeds_weights"):
        if hasattr(module, name):
            getattr(module, name).fill_(2.0)


@contextlib.contextmanager
def unet_in_channels(unet, channels: int, seed: int = 0):
    """The UNet with `channels` input channels while the block runs: the inpainting checkpoint's
    UNet (9: latents, mask, masked-image latents) differs from SD1.5's only in conv_in
    (UNet2DConditionModel.__init__ reads in_channels for conv_in alone). A conv_in of that many
    input channels replaces the current one, with config.in_channels; on a real device it gets
    random weights there and the old one waits on the CPU (so the device holds one conv_in,
    as with the checkpoint loaded). Restored afterwards."""
    conv = unet.conv_in
    if conv.in_channels == channels:
        yield
        return
    from diffusers.configuration_utils import FrozenDict

    device = conv.weight.device
    new = torch.nn.Conv2d(channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                          device=device, dtype=conv.weight.dtype).requires_grad_(False)
    if is_channels_last(conv.weight):
        to_channels_last(new)   # the UNet's memory format (Options.channels_last)
    real = device.type != "meta"
    if real:
        conv.to("cpu")
        _randomize(new, torch.Generator(device=device).manual_seed(seed))
    old_config = unet._internal_dict
    unet._modules["conv_in"] = new
    unet._internal_dict = FrozenDict({**old_config, "in_channels": channels})
    try:
        yield
    finally:
        unet._modules["conv_in"] = conv
        unet._internal_dict = old_config
        if real:
            del new
            conv.to(device)


def load_pipeline(model: str, device="cuda", dtype=torch.float16, safety_checker: bool = True,
                  channels_last: bool = False):
    """The user's own weights: a local diffusers folder or a hub id (as the issue's snippet);
    channels_last: the UNet and the VAE converted on the host, before the move."""
    from diffusers import AutoPipelineForImage2Image

    kwargs = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    pipe = AutoPipelineForImage2Image.from_pretrained(model, torch_dtype=dtype, **kwargs)
    if channels_last:
        to_channels_last(pipe.unet, pipe.vae)
    return pipe.to(device)
