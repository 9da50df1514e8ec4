"""The call's options that change peak memory, validated once for the equation and the simulation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from . import allocconf

ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class InputError(ValueError):
    """Bad user input: the CLI prints it as one line, never a traceback."""


@dataclass(frozen=True)
class Options:
    """Options of `pipe(prompt, image=..., ...)` and of the setup that change memory.

    Defaults are diffusers' defaults for StableDiffusionImg2ImgPipeline.__call__.
    """

    guidance_scale: float = 7.5          # > 1 turns classifier-free guidance on (UNet batch x2)
    num_images_per_prompt: int = 1
    strength: float = 0.8
    num_inference_steps: int = 50
    attention: str = "auto"              # SDPA backend: auto (as PyTorch picks), cudnn, flash, efficient, math
    attention_slicing: int | str | None = None   # pipe.enable_attention_slicing(x): None, "auto", "max" or an int
    vae_slicing: bool = False            # pipe.enable_vae_slicing()
    vae_tiling: bool = False             # pipe.enable_vae_tiling()
    safety_checker: bool = True          # loaded (True) or safety_checker=None
    output_type: str = "pil"             # "latent" skips the VAE decode and the safety checker
    gpu: str = "default"                 # GPU profile: a name (probed, then bundled) or a file; gpu_profiles.py
    expandable_segments: bool = False    # shorthand: alloc_conf + ",expandable_segments:True"
    alloc_conf: str = ""                 # PYTORCH_CUDA_ALLOC_CONF, parsed as PyTorch does (allocconf.py)
    lora: str | None = None              # pipe.load_lora_weights(...): "RANK[:TARGETS]" or a .safetensors file (lora.py)
    lora_fused: bool = False             # then pipe.fuse_lora()

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise InputError(msg)

        need(_is_number(self.guidance_scale), f"guidance_scale must be a finite number, got {self.guidance_scale!r}")
        need(_is_int(self.num_images_per_prompt) and self.num_images_per_prompt >= 1,
             f"num_images_per_prompt must be a positive integer, got {self.num_images_per_prompt!r}")
        need(_is_number(self.strength) and 0 <= self.strength <= 1, f"strength must be in [0, 1], got {self.strength!r}")
        need(_is_int(self.num_inference_steps) and self.num_inference_steps >= 1,
             f"num_inference_steps must be a positive integer, got {self.num_inference_steps!r}")
        need(self.attention in ATTENTION_BACKENDS,
             f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}")
        need(self.attention_slicing in (None, "auto", "max") or (_is_int(self.attention_slicing) and self.attention_slicing >= 1),
             f"attention_slicing must be auto, max or a positive integer, got {self.attention_slicing!r}")
        for name in ("vae_slicing", "vae_tiling", "safety_checker", "expandable_segments"):
            value = getattr(self, name)
            need(isinstance(value, bool), f"{name} must be True or False, got {value!r}")
        from .gpu_profiles import GPUProfile   # here: gpu_profiles imports this module

        need(isinstance(self.gpu, (str, GPUProfile)), f"gpu must be a GPU profile name or file, got {self.gpu!r}")
        need(isinstance(self.alloc_conf, str), f"alloc_conf must be text, got {self.alloc_conf!r}")
        try:
            conf = allocconf.parse(self.alloc_conf)
        except allocconf.AllocConfError as e:
            raise InputError(str(e)) from None
        object.__setattr__(self, "_conf", replace(conf, expandable_segments=conf.expandable_segments
                                                  or self.expandable_segments))
        need(self.output_type in OUTPUT_TYPES, f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {self.output_type!r}")
        object.__setattr__(self, "_lora", None)
        need(isinstance(self.lora_fused, bool), f"lora_fused must be True or False, got {self.lora_fused!r}")
        if self.lora is not None:
            from .lora import parse   # here: lora.py imports this module

            object.__setattr__(self, "_lora", parse(self.lora))
        need(self.lora is not None or not self.lora_fused, "lora_fused needs a LoRA (lora=RANK[:TARGETS] or a file)")
        need(self.unet_evaluations >= 1,
             f"strength {self.strength:g} x {self.num_inference_steps} step leaves no denoising step: diffusers 0.42.1 "
             "then decodes an empty batch and fails (use strength 1 or at least 2 steps)")

    @property
    def unet_evaluations(self) -> int:
        return unet_evaluations(self.num_inference_steps, self.strength)

    @property
    def allocator(self) -> allocconf.AllocConf:
        """The caching allocator's settings: alloc_conf, with the expandable_segments shorthand."""
        return self._conf

    @property
    def adapters(self):
        """The LoRA adapters (lora.Lora) of the lora option, or None."""
        return self._lora

    @property
    def cfg(self) -> bool:
        """diffusers: do_classifier_free_guidance = guidance_scale > 1."""
        return self.guidance_scale > 1

    @property
    def unet_batch(self) -> int:
        return self.num_images_per_prompt * (2 if self.cfg else 1)

    @property
    def decodes(self) -> bool:
        return self.output_type != "latent"

    def to_dict(self) -> dict:
        return asdict(self)


def unet_evaluations(num_inference_steps: int, strength: float) -> int:
    """UNet evaluations of one img2img call, as diffusers 0.42.1 counts them.

    PNDMScheduler (skip_prk_steps) makes n + 1 timesteps for n >= 2 steps (it repeats the
    second to last; the progress bar shows n) and 1 for n = 1. get_timesteps keeps the last
    init = min(int(n * strength), n) steps: it drops the first n - init timesteps, so
    strength 0 still runs one evaluation when n >= 2, and none when n = 1 and strength < 1.
    """
    n = num_inference_steps
    timesteps = n + 1 if n >= 2 else n
    return timesteps - (n - min(int(n * strength), n))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    """A finite int or float (NaN and infinity are no call's value, and JSON cannot carry them)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
