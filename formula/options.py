"""The call's options that change peak memory, validated once for the equation and the simulation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from . import allocconf, schedulers

SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
XFORMERS = "xformers"   # pipe.enable_xformers_memory_efficient_attention() (kernels.py section 4)
ATTENTION_BACKENDS = SDPA_BACKENDS + (XFORMERS,)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The diffusers pipeline of the call (DERIVATION.md, "Pipelines"): StableDiffusionImg2ImgPipeline,
# StableDiffusionPipeline, StableDiffusionInpaintPipeline; and the inpaint pipeline's UNet: SD1.5's
# own (4 input channels) or the inpainting checkpoint's (9: latents, mask, masked-image latents).
PIPELINES = ("img2img", "txt2img", "inpaint")
INPAINT_UNETS = {"standard": 4, "inpainting": 9}
# strength's default in each pipeline's __call__ (txt2img has none: every timestep runs)
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0, "txt2img": None}
# The pipeline's torch_dtype: element size of weights and activations, torch's name for it.
DTYPE_ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
DTYPE_TORCH_NAME = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
DTYPES = tuple(DTYPE_ITEMSIZE)


class InputError(ValueError):
    """Bad user input: the CLI prints it as one line, never a traceback."""


class VerbatimInputError(InputError):
    """Bad input in another program's own words (PyTorch's PYTORCH_CUDA_ALLOC_CONF parser): the CLI
    prints it as it is, without naming its flags."""


@dataclass(frozen=True)
class Options:
    """Options of `pipe(prompt, image=..., ...)` and of the setup that change memory.

    Defaults are diffusers' defaults for StableDiffusionImg2ImgPipeline.__call__ (pipeline
    "img2img"), or for the pipeline chosen (strength, height, width).
    """

    guidance_scale: float = 7.5          # > 1 turns classifier-free guidance on (UNet batch x2)
    num_images_per_prompt: int = 1
    strength: float | None = None        # None: the pipeline's default (DEFAULT_STRENGTH)
    num_inference_steps: int = 50
    attention: str = "auto"              # SDPA backend: auto (as PyTorch picks), cudnn, flash, efficient, math;
                                         # or xformers: the UNet and VAE through xformers, CLIP on SDPA auto
    attention_slicing: int | str | None = None   # pipe.enable_attention_slicing(x): None, "auto", "max" or an int
    vae_slicing: bool = False            # pipe.enable_vae_slicing()
    vae_tiling: bool = False             # pipe.enable_vae_tiling()
    safety_checker: bool = True          # loaded (True) or safety_checker=None
    output_type: str = "pil"             # "latent" skips the VAE decode and the safety checker
    gpu: str = "default"                 # GPU profile: a name (probed, then bundled) or a file; gpu_profiles.py
    expandable_segments: bool = False    # shorthand: alloc_conf + ",expandable_segments:True"
    alloc_conf: str = ""                 # PYTORCH_CUDA_ALLOC_CONF, parsed as PyTorch does (allocconf.py)
    cudnn: bool = True                   # torch.backends.cudnn.enabled (False: PyTorch's native convolutions)
    cudnn_benchmark: bool = False        # torch.backends.cudnn.benchmark (the peak depends on run-time state)
    cudnn_deterministic: bool = False    # torch.backends.cudnn.deterministic (deterministic engines only)
    scheduler: str = schedulers.DEFAULT  # pipe.scheduler = X.from_config(pipe.scheduler.config); schedulers.py
    pipeline: str = "img2img"            # PIPELINES
    pipe_height: int | None = None       # pipe(height=...) of txt2img / inpaint; None: unet sample_size x 8 = 512
    pipe_width: int | None = None        # pipe(width=...)
    mask_size: tuple | None = None       # inpaint: (height, width) of mask_image; must be the image's
    inpaint_unet: str = "standard"       # inpaint: INPAINT_UNETS
    padding_mask_crop: int | None = None # inpaint: pipe(padding_mask_crop=...) (host-side crop; needs output pil)
    dtype: str = "fp16"                  # the pipeline's torch_dtype: fp16, bf16 or fp32
    lora: str | None = None              # pipe.load_lora_weights(...): "RANK[:TARGETS]" or a .safetensors file (lora.py)
    lora_fused: bool = False             # then pipe.fuse_lora()
    channels_last: bool = False          # pipe.unet / pipe.vae .to(memory_format=torch.channels_last) before pipe.to("cuda")

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise InputError(msg)

        self._check_pipeline(need)
        need(_is_number(self.guidance_scale), f"guidance_scale must be a finite number, got {self.guidance_scale!r}")
        need(_is_int(self.num_images_per_prompt) and self.num_images_per_prompt >= 1,
             f"num_images_per_prompt must be a positive integer, got {self.num_images_per_prompt!r}")
        need(self.strength is None or (_is_number(self.strength) and 0 <= self.strength <= 1), f"strength must be in [0, 1], got {self.strength!r}")
        need(_is_int(self.num_inference_steps) and self.num_inference_steps >= 1,
             f"num_inference_steps must be a positive integer, got {self.num_inference_steps!r}")
        need(self.attention in ATTENTION_BACKENDS,
             f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}")
        need(self.attention_slicing in (None, "auto", "max") or (_is_int(self.attention_slicing) and self.attention_slicing >= 1),
             f"attention_slicing must be auto, max or a positive integer, got {self.attention_slicing!r}")
        for name in ("vae_slicing", "vae_tiling", "safety_checker", "expandable_segments", "cudnn",
                     "cudnn_benchmark", "cudnn_deterministic", "channels_last"):
            value = getattr(self, name)
            need(isinstance(value, bool), f"{name} must be True or False, got {value!r}")
        from .gpu_profiles import GPUProfile   # here: gpu_profiles imports this module

        need(isinstance(self.gpu, (str, GPUProfile)), f"gpu must be a GPU profile name or file, got {self.gpu!r}")
        need(isinstance(self.alloc_conf, str), f"alloc_conf must be text, got {self.alloc_conf!r}")
        try:
            conf = allocconf.parse(self.alloc_conf)
        except allocconf.AllocConfError as e:
            raise VerbatimInputError(str(e)) from None
        need(not (self.expandable_segments and "expandable_segments" in self.alloc_conf and not conf.expandable_segments),
             f"expandable_segments=True conflicts with alloc_conf {self.alloc_conf!r}: give one of them")
        object.__setattr__(self, "_conf", replace(conf, expandable_segments=conf.expandable_segments
                                                  or self.expandable_segments))
        object.__setattr__(self, "expandable_segments", self._conf.expandable_segments)   # what the call runs with
        for name in ("cudnn_benchmark", "cudnn_deterministic"):
            need(self.cudnn or not getattr(self, name),
                 f"{name} needs cuDNN: with cudnn=False (torch.backends.cudnn.enabled = False) PyTorch runs its "
                 "native convolutions, which have no engines to search or filter")
        need(self.cudnn or not self.channels_last,
             "channels_last with cudnn=False is not modelled (PyTorch's native convolutions copy every "
             "channels-last input and filter back to NCHW)")
        need(self.output_type in OUTPUT_TYPES, f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {self.output_type!r}")
        need(self.scheduler in schedulers.NAMES,
             f"scheduler must be one of {', '.join(schedulers.NAMES)}, got {self.scheduler!r}")
        most = schedulers.get(self.scheduler).max_steps
        need(most is None or self.num_inference_steps <= most,
             f"scheduler {self.scheduler} takes at most {most} steps (num_train_timesteps), got {self.num_inference_steps}")
        need(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        need(not (self.attention == XFORMERS and self.dtype == "fp32"),
             "attention xformers with dtype fp32 is not modelled (its live sets are written for 2-byte tensors)")
        object.__setattr__(self, "_lora", None)
        need(isinstance(self.lora_fused, bool), f"lora_fused must be True or False, got {self.lora_fused!r}")
        if self.lora is not None:
            from .lora import parse   # here: lora.py imports this module

            object.__setattr__(self, "_lora", parse(self.lora))
        need(self.lora is not None or not self.lora_fused, "lora_fused needs a LoRA (lora=RANK[:TARGETS] or a file)")
        need(self.lora is None or self.dtype == "fp16",
             f"a LoRA with dtype {self.dtype} is not modelled (the adapters are derived for fp16 pipelines)")
        need(self.unet_evaluations >= 1,
             f"strength {1 if self.strength is None else self.strength:g} x {self.num_inference_steps} "
             f"step{'' if self.num_inference_steps == 1 else 's'} leaves no denoising step: diffusers 0.42.1 "
             "then decodes an empty batch and fails "
             + ("(use strength 1 or at least 2 steps)" if self.scheduler == "pndm"
                else f"(with {self.scheduler}, use a strength of at least 1/{self.num_inference_steps})"))

    def _check_pipeline(self, need) -> None:
        """The pipeline options (DERIVATION.md, "Pipelines"); resolves strength's default."""
        p = self.pipeline
        need(p in PIPELINES, f"pipeline must be one of {', '.join(PIPELINES)}, got {p!r}")
        need(p != "txt2img" or self.strength is None,
             "strength does not apply to txt2img: StableDiffusionPipeline.__call__ runs every timestep from noise")
        if self.strength is None:
            object.__setattr__(self, "strength", DEFAULT_STRENGTH[p])
        for name in ("pipe_height", "pipe_width"):
            v = getattr(self, name)
            need(v is None or p != "img2img", f"{name} is not an img2img option: the image's size decides "
                 "(StableDiffusionImg2ImgPipeline.__call__ has no height or width)")
            need(v is None or (_is_int(v) and v >= 8 and v % 8 == 0),
                 f"{name} must be a multiple of 8 pixels (diffusers' check_inputs raises otherwise), got {v!r}")
        if isinstance(self.mask_size, list):   # from JSON or TOML
            object.__setattr__(self, "mask_size", tuple(self.mask_size))
        m = self.mask_size
        need(m is None or p == "inpaint", f"a mask applies only to the inpaint pipeline, not {p}")
        need(m is None or (isinstance(m, tuple) and len(m) == 2 and all(_is_int(x) and x >= 1 for x in m)),
             f"mask_size must be (height, width) in whole pixels, got {m!r}")
        need(self.inpaint_unet in INPAINT_UNETS,
             f"inpaint_unet must be one of {', '.join(INPAINT_UNETS)}, got {self.inpaint_unet!r}")
        need(self.inpaint_unet == "standard" or p == "inpaint", f"inpaint_unet applies only to the inpaint pipeline, not {p}")
        c = self.padding_mask_crop
        need(c is None or p == "inpaint", f"padding_mask_crop applies only to the inpaint pipeline, not {p}")
        need(c is None or (_is_int(c) and c >= 0), f"padding_mask_crop must be a whole number of pixels >= 0, got {c!r}")
        need(c is None or self.output_type == "pil", "padding_mask_crop needs output_type pil "
             "(StableDiffusionInpaintPipeline.check_inputs raises otherwise)")

    @property
    def unet_evaluations(self) -> int:
        return unet_evaluations(self.num_inference_steps, 1.0 if self.strength is None else self.strength,
                                self.scheduler)

    @property
    def sdpa_attention(self) -> str:
        """The SDPA backend request for what still calls F.scaled_dot_product_attention: with
        xformers, transformers' CLIP models (they have no set_use_memory_efficient_attention_xformers)
        keep PyTorch's own choice."""
        return "auto" if self.attention == XFORMERS else self.attention

    @property
    def unet_in_channels(self) -> int:
        return INPAINT_UNETS[self.inpaint_unet] if self.pipeline == "inpaint" else 4

    @property
    def allocator(self) -> allocconf.AllocConf:
        """The caching allocator's settings: alloc_conf, with the expandable_segments shorthand."""
        return self._conf

    @property
    def alloc_conf_text(self) -> str:
        """PYTORCH_CUDA_ALLOC_CONF as the call runs with it ("" for PyTorch's defaults)."""
        if self.expandable_segments and "expandable_segments" not in self.alloc_conf:
            return ",".join(p for p in (self.alloc_conf, "expandable_segments:True") if p)
        return self.alloc_conf

    @property
    def derived_settings(self) -> tuple[str, ...]:
        """The settings in effect whose code paths are derived from the sources and not yet measured
        on a GPU (their catalogue cases wait for a GPU run; tests/test_profiles.py holds this against
        the archives). Sizes, counts and strengths between measured ones are the equation's own."""
        conf = self.allocator
        return tuple(name for name, on in (
            (f"dtype {self.dtype}", self.dtype != "fp16"),
            (self.pipeline, self.pipeline != "img2img"),
            (f"attention {self.attention}", self.attention not in ("auto", "math", "efficient")),
            (f"attention slicing {self.attention_slicing}", self.attention_slicing not in (None, "auto")),
            (f"output {self.output_type}", self.output_type not in ("pil", "latent")),
            (f"scheduler {self.scheduler}", self.scheduler != schedulers.DEFAULT),
            ("LoRA", self.lora is not None),
            ("channels_last", self.channels_last),
            ("cuDNN off", not self.cudnn),
            ("cudnn.benchmark", self.cudnn_benchmark),
            ("cudnn.deterministic", self.cudnn_deterministic),
            ("PYTORCH_CUDA_ALLOC_CONF " + self.alloc_conf_text,
             conf != allocconf.AllocConf(expandable_segments=conf.expandable_segments, ignored=conf.ignored)),
        ) if on)

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

    @property
    def itemsize(self) -> int:
        """Bytes per element of the pipeline's floating tensors."""
        return DTYPE_ITEMSIZE[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)


def unet_evaluations(num_inference_steps: int, strength: float, scheduler: str = schedulers.DEFAULT) -> int:
    """UNet evaluations of one img2img call, as diffusers 0.42.1 counts them (schedulers.py).

    PNDMScheduler (skip_prk_steps) makes n + 1 timesteps for n >= 2 steps (it repeats the
    second to last; the progress bar shows n) and 1 for n = 1; the others make n. get_timesteps
    keeps the last init = min(int(n * strength), n) steps: it drops the first n - init
    timesteps, so with PNDM strength 0 still runs one evaluation when n >= 2, and none when
    n = 1 and strength < 1; with the others int(n * strength) = 0 runs none.
    """
    return schedulers.unet_evaluations(num_inference_steps, strength, scheduler)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    """A finite int or float (NaN and infinity are no call's value, and JSON cannot carry them)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
