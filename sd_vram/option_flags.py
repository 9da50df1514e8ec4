"""The pipeline option flags of ``sd-vram estimate``, ``max-size`` and ``simulate``: one row per field
of formula/options.Options (flag, help, argparse type or choices), and the two ways through it,
flags onto a parser and parsed flags back into Options fields.

A field of Options without a row here fails tests/test_cli.py, which names the missing flag.
Imports sd_vram.formula (and, to read --mask, sd_vram.imagesize and sd_vram.cli's parse_size).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from sd_vram.formula.options import ATTENTION_BACKENDS, DTYPES, INPAINT_UNETS, OUTPUT_TYPES, PIPELINES, InputError, Options
from sd_vram.formula.schedulers import NAMES as SCHEDULER_NAMES

GROUP_TITLE = "pipeline options (defaults are diffusers')"


@dataclass(frozen=True)
class OptionFlag:
    """One command-line flag for one Options field."""

    field: str                      # the Options field it sets
    flag: str                       # --guidance-scale
    help: str
    argparse: dict = field(default_factory=dict)   # type, choices, metavar of a flag that takes a value
    switch: bool | None = None      # a flag without a value: the field's value when it is given

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


def attention_slicing(text: str):
    """--attention-slicing: auto, max or a positive slice size."""
    if text in ("auto", "max"):
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, max or a positive slice size, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"the slice size must be positive, got {v}")
    return v


def mask_size(text: str) -> tuple[int, int]:
    """--mask: an image file (its size, read from the header as for the image) or WIDTHxHEIGHT
    -> (height, width), the order of Options.mask_size."""
    import os

    from sd_vram.imagesize import image_size

    try:
        if os.path.exists(text):
            width, height = image_size(text, complete=True)
        elif any(c.isdigit() for c in text):
            from sd_vram.cli import parse_size

            width, height = parse_size(text)
        else:
            raise InputError("no such mask file (or give WIDTHxHEIGHT)")
    except InputError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e}") from None
    return height, width


def inpaint_unet(text: str) -> str:
    """--inpaint-unet: standard, inpainting, or a diffusers model folder whose unet/config.json
    says which (in_channels 4 or 9)."""
    import json
    import os

    if text in INPAINT_UNETS:
        return text
    config = os.path.join(text, "unet", "config.json")
    if not os.path.isfile(config):
        raise argparse.ArgumentTypeError(f"expected {' or '.join(INPAINT_UNETS)} or a model folder with "
                                         f"unet/config.json, got {text!r}")
    try:
        channels = json.loads(open(config, encoding="utf-8").read())["in_channels"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"{config}: no in_channels ({type(e).__name__})") from None
    for name, c in INPAINT_UNETS.items():
        if channels == c:
            return name
    raise argparse.ArgumentTypeError(f"{config}: in_channels {channels!r}: the inpaint pipeline takes a UNet of "
                                     f"{' or '.join(map(str, INPAINT_UNETS.values()))} input channels")


def option_flags() -> tuple[OptionFlag, ...]:
    """The flags in the order --help lists them."""
    from sd_vram.formula import gpu_profiles

    d = Options()
    return (
        OptionFlag("guidance_scale", "--guidance-scale",
                   f"classifier-free guidance scale; > 1 doubles the UNet batch (default {d.guidance_scale:g})",
                   {"type": float, "metavar": "X"}),
        OptionFlag("num_images_per_prompt", "--num-images-per-prompt",
                   f"images per prompt (default {d.num_images_per_prompt})", {"type": int, "metavar": "N"}),
        OptionFlag("strength", "--strength", f"img2img / inpaint strength in [0, 1] (default {d.strength:g}; "
                   "inpaint 1; txt2img has none)", {"type": float, "metavar": "S"}),
        OptionFlag("num_inference_steps", "--steps", f"num_inference_steps (default {d.num_inference_steps})",
                   {"type": int, "metavar": "N"}),
        OptionFlag("attention", "--attention",
                   "SDPA backend: auto picks as PyTorch does on the GPU (default auto); xformers: "
                   "pipe.enable_xformers_memory_efficient_attention() (xformers 0.0.35) for the UNet and VAE, "
                   "CLIP stays on SDPA auto; derived from the xformers and diffusers sources, not measured on a GPU",
                   {"choices": ATTENTION_BACKENDS}),
        OptionFlag("attention_slicing", "--attention-slicing", "pipe.enable_attention_slicing(...) (default off)",
                   {"type": attention_slicing, "metavar": "{auto,max,N}"}),
        OptionFlag("vae_slicing", "--vae-slicing", "pipe.enable_vae_slicing()", switch=True),
        OptionFlag("vae_tiling", "--vae-tiling", "pipe.enable_vae_tiling()", switch=True),
        OptionFlag("safety_checker", "--no-safety-checker", "load the pipeline with safety_checker=None", switch=False),
        OptionFlag("output_type", "--output-type", "latent skips the VAE decode and the safety checker (default pil)",
                   {"choices": OUTPUT_TYPES}),
        OptionFlag("expandable_segments", "--expandable-segments",
                   "shorthand for --alloc-conf expandable_segments:True", switch=True),
        OptionFlag("alloc_conf", "--alloc-conf",
                   "PYTORCH_CUDA_ALLOC_CONF as PyTorch parses it: expandable_segments, max_split_size_mb, "
                   "roundup_power2_divisions, garbage_collection_threshold (which acts only under "
                   "torch.cuda.set_per_process_memory_fraction: Python estimate(vram=..., limit='fraction')); "
                   "derived from CUDACachingAllocator.cpp, not yet measured on a GPU (expandable_segments is: "
                   "on the H200)", {"metavar": "CONF"}),
        OptionFlag("cudnn", "--no-cudnn",
                   "torch.backends.cudnn.enabled = False: PyTorch's native convolutions and their im2col "
                   "column buffers (from ConvolutionMM2d.cu: derived, not measured on a GPU)", switch=False),
        OptionFlag("cudnn_benchmark", "--cudnn-benchmark",
                   "torch.backends.cudnn.benchmark = True: the search's workspace depends on the memory free "
                   "at run time, so the answer is a range (from Conv_v8.cpp: derived, not measured on a GPU)",
                   switch=True),
        OptionFlag("cudnn_deterministic", "--cudnn-deterministic",
                   "torch.backends.cudnn.deterministic = True: deterministic engines only; their workspaces "
                   "are derived, not measured on a GPU (the answer is a range)", switch=True),
        OptionFlag("pipeline", "--pipeline", "the diffusers pipeline: img2img (StableDiffusionImg2ImgPipeline), "
                   "txt2img (StableDiffusionPipeline: estimate's and simulate's IMAGE is the output's "
                   "WIDTHxHEIGHT, default 512x512), "
                   "inpaint (StableDiffusionInpaintPipeline: needs --mask) (default img2img); txt2img and inpaint are "
                   "derived from diffusers' code, not measured on a GPU", {"choices": PIPELINES}),
        OptionFlag("pipe_height", "--height", "txt2img / inpaint: pipe(height=...), a multiple of 8 (default 512: "
                   "unet sample_size x 8; inpaint resizes the image to it)", {"type": int, "metavar": "PX"}),
        OptionFlag("pipe_width", "--width", "txt2img / inpaint: pipe(width=...) (default 512)", {"type": int, "metavar": "PX"}),
        OptionFlag("mask_size", "--mask", "inpaint: the mask_image, a file or WIDTHxHEIGHT; the image's size",
                   {"type": mask_size, "metavar": "FILE|WxH"}),
        OptionFlag("inpaint_unet", "--inpaint-unet", "inpaint: the UNet, standard (SD1.5, 4 input channels, latents "
                   "blended with the mask) or inpainting (9: noise, mask, masked-image latents), or a model folder "
                   "to read it from (default standard); derived, not measured on a GPU", {"type": inpaint_unet, "metavar": "{standard,inpainting,DIR}"}),
        OptionFlag("padding_mask_crop", "--padding-mask-crop", "inpaint: pipe(padding_mask_crop=N): crop to the "
                   "mask's region, on the host (needs --output-type pil)", {"type": int, "metavar": "N"}),
        OptionFlag("dtype", "--dtype",
                   "the pipeline's torch_dtype (default fp16). bf16 keeps fp16's sizes; fp32 doubles weights and "
                   "activations. Convolution workspaces and SDPA backends outside fp16 are derived, not measured on "
                   "a GPU", {"choices": DTYPES}),
        OptionFlag("lora", "--lora",
                   "pipe.load_lora_weights(...) before the call: RANK[:TARGETS] (TARGETS a comma list of "
                   "to_q,to_k,to_v,to_out.0 (UNet attention, the default), ff.net.0.proj,ff.net.2 (UNet "
                   "feed-forward), q_proj,k_proj,v_proj,out_proj,fc1,fc2 (text encoder)) or a .safetensors "
                   "LoRA file (its header: peft or diffusers keys); derived from "
                   "diffusers and peft, not yet measured on a GPU", {"metavar": "RANK[:TARGETS]|FILE"}),
        OptionFlag("lora_fused", "--lora-fused", "then pipe.fuse_lora() (needs --lora)", switch=True),
        OptionFlag("channels_last", "--channels-last",
                   "pipe.unet and pipe.vae .to(memory_format=torch.channels_last) before pipe.to('cuda'): NHWC "
                   "convolutions and the layout copies around GroupNorm; derived from the PyTorch sources and a "
                   "256-px probe, not measured on a GPU: NHWC workspaces are taken as none unless the profile "
                   "comes from `sd-vram probe --channels-last` (converting on the GPU also leaves the old "
                   "weights' blocks cached: not modelled)", switch=True),
        OptionFlag("gpu", "--gpu-profile",
                   "GPU profile for workspaces and the CUDA context: a name (probed profiles first, then "
                   f"bundled: {', '.join(sorted(gpu_profiles.profiles()))}) or a profile file (default: default)",
                   {"metavar": "NAME|FILE"}),
        OptionFlag("scheduler", "--scheduler",
                   "pipe.scheduler = X.from_config(pipe.scheduler.config): its UNet evaluations for --steps and "
                   "--strength and the latents it keeps between steps; derived from diffusers' scheduler sources, "
                   f"not measured on a GPU except pndm (default {d.scheduler})",
                   {"metavar": "{" + ",".join(SCHEDULER_NAMES) + "}"}),
    )


def missing_flags(flags=None) -> list[str]:
    """Options fields that no flag sets (tests/test_cli.py keeps this empty)."""
    covered = {f.field for f in (flags or option_flags())}
    return [f.name for f in fields(Options) if f.name not in covered]


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(GROUP_TITLE)
    for f in option_flags():
        if f.switch is None:
            g.add_argument(f.flag, help=f.help, **f.argparse)
        else:
            g.add_argument(f.flag, action="store_true", help=f.help)


def option_kwargs(args: argparse.Namespace) -> dict:
    """The Options fields given on the command line (the rest keep Options' defaults). An empty
    text is given too: --alloc-conf "" asks for PyTorch's defaults over the shell's setting."""
    kw = {}
    for f in option_flags():
        v = getattr(args, f.dest, None)
        if f.switch is not None:
            if v:
                kw[f.field] = f.switch
        elif v is not None:
            kw[f.field] = v
    return kw


def as_flags(message: str) -> str:
    """An Options error in the command line's words: ``pipe_height`` -> ``--height``,
    ``cudnn=False`` -> ``--no-cudnn``, ``lora=RANK`` -> ``--lora RANK``. Quoted values and paths
    are left as they are; a one-word field is rewritten only in its ``field=`` form or where it
    opens the message (``pipeline`` is also a word of the prose), a switch only where it means
    the flag."""
    import re

    message = re.sub(r";\s*Python: [^()]*(\([^()]*\))?[^()]*", "", message)   # a hint for the Python API alone
    parts = re.split(r"('[^']*'|\"[^\"]*\"|\S*/\S*)", message)              # quoted values and paths: kept
    before, after, bare = r"(?<![\w.-])", r"(?![\w.:/-])", r"(?![\w=.:/-])"
    for f in option_flags():
        for i in range(0, len(parts), 2):
            text = parts[i]
            if f.switch is not None:
                text = re.sub(rf"{before}{f.field}={f.switch}{after}", f.flag, text)
                if f.switch and "_" in f.field:
                    text = re.sub(rf"{before}{f.field}{bare}", f.flag, text)
            else:
                text = re.sub(rf"{before}{f.field}=(?=[\w(])", f"{f.flag} ", text)
                if "_" in f.field:
                    text = re.sub(rf"{before}{f.field}{bare}", f.flag, text)
                elif i == 0:            # a one-word field where it opens the message: "strength must be"
                    text = re.sub(rf"^{f.field}(?= )", f.flag, text)
            parts[i] = text
    return "".join(parts)
