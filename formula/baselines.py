"""The estimators sd-vram is compared against, implemented from their published formulas.

Each estimator is a pure function ``(height, width, prompt_length, options) -> bytes`` that
predicts the peak GPU memory of one SD1.5 img2img call the way its source would. They exist
for the ``--compare`` table and the accuracy report; none of them is used by the equation.

Every estimator sees the image the pipeline sees: height and width rounded down to a
multiple of 8 (diffusers' VaeImageProcessor, ComfyUI's vae_encode_crop_pixels).

Weights are the exact parameter counts of stable-diffusion-v1-5 (docs DESIGN.md, "Exact
parameter counts") stored in fp16, plus the int64 position_ids buffers, except where a
baseline has its own rounded figures (the seed notebook).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from .options import InputError, Options

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
FP16 = 2  # bytes per element; ComfyUI's dtype_size(float16), InvokeAI's element_size

# Exact parameter counts (DESIGN.md) and the int64 buffers that load with them.
PARAMS = {
    "unet": 859_520_964,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "safety_checker": 303_981_588,
}
INT64_BUFFERS = {"text_encoder": 77, "safety_checker": 257}  # position_ids


def weight_bytes(component: str) -> int:
    """fp16 bytes of one component as it sits on the GPU (parameters + int64 buffers)."""
    return FP16 * PARAMS[component] + 8 * INT64_BUFFERS.get(component, 0)


def _pixels(height, width) -> tuple[int, int]:
    """The pipeline's image size: each side rounded down to a multiple of 8."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 8:
            raise InputError(f"{name} must be an integer of at least 8 pixels, got {v!r}")
    return height - height % 8, width - width % 8


def _options(options) -> Options:
    if options is None:
        return Options()
    if isinstance(options, dict):
        return Options(**options)
    return options


# ---------------------------------------------------------------------------------------------
# 1. The seed notebook's f(h, w, prompt_length)
# ---------------------------------------------------------------------------------------------

NOTEBOOK_PARAMS = 860e6 + 123e6 + 35e6   # its rounded UNet + text encoder + "35M" VAE
NOTEBOOK_SAFETY = 1.12                   # its final multiplier
UNET_CHANNELS = (320, 640, 1280, 1280)   # block_out_channels, one per level
UNET_HEADS = 8
CLIP_HIDDEN, CLIP_LAYERS = 768, 12
VAE_BUFFER_CHANNELS = 64


def seed_notebook(height: int, width: int, prompt_length: int = 77, options=None) -> int:
    """The seed notebook's ``f(h, w, prompt_length)``.

    Source: the project's seed notebook, as DESIGN.md ("Estimators to beat") describes it:
    weights 2 x (860M + 123M + 35M), the sum of UNet feature maps at four levels, a
    per-level attention buffer including n^2, CLIP activations, a 64 x H x W VAE buffer,
    all x 1.12. The notebook itself is not available; this is the most faithful reading of
    that description, with every term in fp16 (2 bytes, as its weight term):

    - latent h = H/8, w = W/8; level i (0..3) has n_i = (h/2^i)(w/2^i) positions (real
      numbers, no ceil) and c_i = 320, 640, 1280, 1280 channels;
    - feature maps: sum_i 2 c_i n_i;
    - attention buffer: sum_i 2 (8 n_i^2 + 3 c_i n_i): 8 heads' n x n score matrices plus
      Q, K and V, at all four levels;
    - CLIP activations: 2 x prompt_length x 768 x 12 layers;
    - VAE buffer: 2 x 64 x H x W.

    Ignores ``options`` altogether: it has no CFG batch, no safety checker, no allocator,
    no cuDNN/cuBLAS workspaces, and charges the n^2 term that fused attention never
    allocates.
    """
    if not isinstance(prompt_length, int) or isinstance(prompt_length, bool) or prompt_length < 0:
        raise InputError(f"prompt_length must be a non-negative integer, got {prompt_length!r}")
    H, W = _pixels(height, width)
    h, w = H / 8, W / 8
    weights = FP16 * NOTEBOOK_PARAMS
    levels = [(c, (h / 2**i) * (w / 2**i)) for i, c in enumerate(UNET_CHANNELS)]
    feature_maps = sum(FP16 * c * n for c, n in levels)
    attention = sum(FP16 * (UNET_HEADS * n * n + 3 * c * n) for c, n in levels)
    clip = FP16 * prompt_length * CLIP_HIDDEN * CLIP_LAYERS
    vae = FP16 * VAE_BUFFER_CHANNELS * H * W
    return int(NOTEBOOK_SAFETY * (weights + feature_maps + attention + clip + vae))


# ---------------------------------------------------------------------------------------------
# 2. ComfyUI
# ---------------------------------------------------------------------------------------------

COMFY_MEMORY_USAGE_FACTOR = 1.0          # comfy/supported_models.py: SD15.memory_usage_factor
COMFY_EXTRA_RESERVED = 400 * MiB         # comfy/model_management.py: EXTRA_RESERVED_VRAM (Linux)
COMFY_MIN_INFERENCE = 0.8 * GiB + COMFY_EXTRA_RESERVED   # minimum_inference_memory()


def comfyui_unet_working_memory(height: int, width: int, options=None) -> float:
    """comfy/model_base.py BaseModel.memory_required for the sampler's CFG batch, in bytes.

    area = batch x (H/8) x (W/8) with batch = 2 x images (comfy/sampler_helpers.py
    _prepare_sampling passes ``[noise_shape[0] * 2] + noise_shape[1:]``, always doubled);
    with xformers or PyTorch flash attention: area x dtype_size x 0.01 x factor MiB;
    otherwise (no fused attention): area x 0.15 x factor MiB.
    """
    o = _options(options)
    H, W = _pixels(height, width)
    area = 2 * o.num_images_per_prompt * (H // 8) * (W // 8)
    if o.attention == "math":  # the branch for no xformers / no PyTorch flash attention
        return area * 0.15 * COMFY_MEMORY_USAGE_FACTOR * MiB
    return area * FP16 * 0.01 * COMFY_MEMORY_USAGE_FACTOR * MiB


def comfyui_vae_decode_memory(height: int, width: int) -> float:
    """comfy/sd.py VAE.memory_used_decode: 2178 x h x w x 64 x dtype_size over the latent (h, w)."""
    H, W = _pixels(height, width)
    return 2178 * (H // 8) * (W // 8) * 64 * FP16


def comfyui_vae_encode_memory(height: int, width: int) -> float:
    """comfy/sd.py VAE.memory_used_encode: 1767 x H x W x dtype_size over the pixel image."""
    H, W = _pixels(height, width)
    return 1767 * H * W * FP16


def comfyui(height: int, width: int, prompt_length: int = 77, options=None) -> int:
    """ComfyUI's admission rule with the SD1.5 UNet, CLIP and VAE resident.

    Sources (comfyanonymous/ComfyUI):
    - comfy/model_base.py, BaseModel.memory_required: UNet working memory
      ``area * dtype_size(dtype) * 0.01 * memory_usage_factor * 1024 * 1024`` with fused
      attention, ``area * 0.15 * memory_usage_factor * 1024 * 1024`` without;
      comfy/supported_models.py SD15.memory_usage_factor = 1.0;
      comfy/sampler_helpers.py: the area is taken at batch ``noise_shape[0] * 2``.
    - comfy/sd.py, VAE.__init__: ``memory_used_decode = 2178 * shape[2] * shape[3] * 64 *
      dtype_size`` (latent shape) and ``memory_used_encode = 1767 * shape[2] * shape[3] *
      dtype_size`` (pixel shape), per image (decode/encode size their batches from it).
    - comfy/model_management.py: ``EXTRA_RESERVED_VRAM = 400 MiB`` (Linux; 600 on Windows),
      ``minimum_inference_memory() = 0.8 GiB + extra_reserved_memory()``, and
      load_models_gpu: ``extra_mem = max(minimum_inference_memory(), memory_required +
      extra_reserved_memory())``, then frees room for the models' weights plus extra_mem.

    So each stage needs the resident weights plus max(minimum_inference_memory, its working
    memory + 400 MiB); the prediction is the largest stage: weights(UNet, CLIP, VAE) +
    max over UNet / VAE encode / VAE decode. Left out: the 1.1 x weights headroom
    load_models_gpu asks for only while a model is being loaded, and the safety checker,
    which ComfyUI does not have. dtype_size is 2 (the fp16 pipeline modelled here; ComfyUI
    itself would run this VAE in bf16 or fp32). Tiling does not change it: ComfyUI's tiled
    decode sizes memory from the full shape too.
    """
    o = _options(options)
    weights = weight_bytes("unet") + weight_bytes("text_encoder") + weight_bytes("vae")
    working = [comfyui_unet_working_memory(height, width, o), comfyui_vae_encode_memory(height, width)]
    if o.decodes:
        working.append(comfyui_vae_decode_memory(height, width))
    extra = max(max(COMFY_MIN_INFERENCE, wm + COMFY_EXTRA_RESERVED) for wm in working)
    return int(weights + extra)


# ---------------------------------------------------------------------------------------------
# 3. InvokeAI
# ---------------------------------------------------------------------------------------------

INVOKE_DEVICE_WORKING_MEM = 3 * GiB      # config_default.py: device_working_mem_gb = 3; GB = 2**30
INVOKE_VAE_TILE = 512                    # AutoencoderKL.tile_sample_min_size for SD1.5 (sample_size 512)


def invokeai_vae_working_memory(operation: str, height: int, width: int, tiled: bool = False) -> float:
    """invokeai/backend/util/vae_working_memory.py estimate_vae_working_memory_sd15_sdxl (fp16).

    ``h * w * element_size * scaling_constant`` with scaling_constant 2200 (decode) or 1100
    (encode), "determined experimentally"; tiled: the tile's h = w = tile_size, x 1.25.
    """
    H, W = _pixels(height, width)
    constant = 2200 if operation == "decode" else 1100
    if tiled:
        return INVOKE_VAE_TILE * INVOKE_VAE_TILE * FP16 * constant * 1.25
    return H * W * FP16 * constant


def invokeai(height: int, width: int, prompt_length: int = 77, options=None) -> int:
    """InvokeAI's model cache rule: resident weights plus the larger of the default working
    memory and the operation's estimate.

    Sources (invoke-ai/InvokeAI):
    - invokeai/backend/util/vae_working_memory.py, estimate_vae_working_memory_sd15_sdxl:
      ``working_memory = h * w * element_size * scaling_constant``, scaling_constant 2200
      for decode and 1100 for encode (pixel h, w), x 1.25 on a tile when tiling.
    - invokeai/backend/model_manager/load/model_cache/model_cache.py, _get_vram_available:
      ``working_mem_bytes = max(working_mem_bytes or working_mem_bytes_default,
      working_mem_bytes_default)`` with the default ``device_working_mem_gb`` = 3 (GB = 2**30)
      from invokeai/app/services/config/config_default.py. The UNet (denoise) passes no
      estimate, so it gets the default.

    Prediction: weights(UNet, CLIP, VAE) + max(3 GiB, VAE encode, VAE decode). The safety
    checker is not counted (InvokeAI's NSFW checker is separate from the pipeline).
    """
    o = _options(options)
    weights = weight_bytes("unet") + weight_bytes("text_encoder") + weight_bytes("vae")
    working = [INVOKE_DEVICE_WORKING_MEM, invokeai_vae_working_memory("encode", height, width, o.vae_tiling)]
    if o.decodes:
        working.append(invokeai_vae_working_memory("decode", height, width, o.vae_tiling))
    return int(weights + max(working))


# ---------------------------------------------------------------------------------------------
# 4. Hugging Face accelerate / diffusers pipeline-size calculator
# ---------------------------------------------------------------------------------------------

ACCELERATE_INFERENCE_OVERHEAD = 1.20


def hf_accelerate(height: int, width: int, prompt_length: int = 77, options=None) -> int:
    """Hugging Face's estimate: the pipeline's weights, plus up to 20 % for inference.

    Sources: ``accelerate estimate-memory`` (docs: usage_guides/model_size_estimator) sizes
    a model from its parameters in the chosen dtype; the diffusers "Pipeline Memory
    Calculator" Space (huggingface.co/spaces/diffusers/compute-pipeline-size) sums every
    component and says "when performing inference, expect to add up to an additional 20%
    to this as found by EleutherAI". Prediction: 1.2 x fp16 weights of the UNet, VAE,
    text encoder and (when loaded) the safety checker. Independent of the image size.
    """
    o = _options(options)
    _pixels(height, width)
    parts = ["unet", "vae", "text_encoder"] + (["safety_checker"] if o.safety_checker else [])
    return int(ACCELERATE_INFERENCE_OVERHEAD * sum(weight_bytes(p) for p in parts))


class Baseline(NamedTuple):
    name: str
    fn: Callable[..., int]
    counts: str      # what it counts, one line for the --compare table


BASELINES: tuple[Baseline, ...] = (
    Baseline("seed notebook f", seed_notebook,
             "rounded weights, UNet maps, n^2 attention, CLIP, 64xHxW VAE; x1.12"),
    Baseline("ComfyUI", comfyui,
             "weights + max(0.8 GiB, UNet/VAE working memory) + 400 MiB reserve"),
    Baseline("InvokeAI", invokeai,
             "weights + max(3 GiB default, VAE encode/decode working memory)"),
    Baseline("HF accelerate", hf_accelerate,
             "fp16 weights of all loaded models + 20%"),
)


def all_baselines(height: int, width: int, prompt_length: int = 77, options=None) -> dict[str, int]:
    """Every baseline's prediction for one input, by name."""
    o = _options(options)
    return {b.name: b.fn(height, width, prompt_length, o) for b in BASELINES}
