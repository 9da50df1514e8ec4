"""The pipeline option flags of ``sd-vram estimate``, ``max-size`` and ``simulate``: one row per field
of formula/options.Options (flag, help, argparse type or choices), and the two ways through it,
flags onto a parser and parsed flags back into Options fields.

A field of Options without a row here fails tests/test_cli.py, which names the missing flag.
Imports only sd_vram.formula.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from sd_vram.formula.options import ATTENTION_BACKENDS, OUTPUT_TYPES, Options

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
        OptionFlag("strength", "--strength", f"img2img strength in [0, 1] (default {d.strength:g})",
                   {"type": float, "metavar": "S"}),
        OptionFlag("num_inference_steps", "--steps", f"num_inference_steps (default {d.num_inference_steps})",
                   {"type": int, "metavar": "N"}),
        OptionFlag("attention", "--attention", "SDPA backend: auto picks as PyTorch does on the GPU (default auto)",
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
                   "roundup_power2_divisions, garbage_collection_threshold (under --vram); derived from "
                   "CUDACachingAllocator.cpp, not yet measured on a GPU", {"metavar": "CONF"}),
        OptionFlag("lora", "--lora",
                   "pipe.load_lora_weights(...) before the call: RANK[:TARGETS] (TARGETS a comma list of "
                   "to_q,to_k,to_v,to_out.0 (UNet, the default) and q_proj,k_proj,v_proj,out_proj (text "
                   "encoder)) or a .safetensors LoRA file (its header: peft or diffusers keys); derived from "
                   "diffusers and peft, not yet measured on a GPU", {"metavar": "RANK[:TARGETS]|FILE"}),
        OptionFlag("lora_fused", "--lora-fused", "then pipe.fuse_lora() (needs --lora)", switch=True),
        OptionFlag("gpu", "--gpu-profile",
                   "GPU profile for workspaces and the CUDA context: a name (probed profiles first, then "
                   f"bundled: {', '.join(sorted(gpu_profiles.profiles()))}) or a profile file (default: default)",
                   {"metavar": "NAME|FILE"}),
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
    """The Options fields given on the command line (the rest keep Options' defaults).
    An empty text where the field's default is empty text (--alloc-conf "") counts as not given."""
    defaults, kw = Options(), {}
    for f in option_flags():
        v = getattr(args, f.dest, None)
        if f.switch is not None:
            if v:
                kw[f.field] = f.switch
        elif v is not None and not (v == "" and getattr(defaults, f.field) == ""):
            kw[f.field] = v
    return kw
