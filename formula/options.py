"""The call's options that change peak memory, validated once for the equation and the simulation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
    expandable_segments: bool = False    # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise InputError(msg)

        need(_is_number(self.guidance_scale), f"guidance_scale must be a number, got {self.guidance_scale!r}")
        need(_is_int(self.num_images_per_prompt) and self.num_images_per_prompt >= 1,
             f"num_images_per_prompt must be a positive integer, got {self.num_images_per_prompt!r}")
        need(_is_number(self.strength) and 0 <= self.strength <= 1, f"strength must be in [0, 1], got {self.strength!r}")
        need(_is_int(self.num_inference_steps) and self.num_inference_steps >= 1,
             f"num_inference_steps must be a positive integer, got {self.num_inference_steps!r}")
        need(self.attention in ATTENTION_BACKENDS,
             f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}")
        need(self.attention_slicing in (None, "auto", "max") or (_is_int(self.attention_slicing) and self.attention_slicing >= 1),
             f"attention_slicing must be auto, max or a positive integer, got {self.attention_slicing!r}")
        need(isinstance(self.expandable_segments, bool), "expandable_segments must be True or False")
        need(self.output_type in OUTPUT_TYPES, f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {self.output_type!r}")

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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
