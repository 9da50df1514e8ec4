"""GPU-free simulation of peak GPU memory of SD1.5 img2img (diffusers, FP16).

``simulate(height, width, ...)`` runs the real StableDiffusionImg2ImgPipeline.__call__ on
fake CUDA tensors and replays every storage allocation and free through the equation's own
model of PyTorch's CUDA caching allocator (sd_vram.formula.allocator).

What the folder owns, one job a module:
- resident.py: the device state the GPU suite measures a call from (its probes' cuBLAS
  workspaces, the weights in the order they reach the GPU, the suite's earlier model moves);
- patches.py: substitutes for diffusers' and transformers' host-side work (input image,
  ``Tensor.to``/``.numpy``, feature extractor, safety checker) that keep the device-side ops;
- kernel_hooks.py: allocations made inside CUDA kernels (cuDNN convolution workspaces,
  host-to-device staging copies, the math path's and layer_norm's temporaries);
- sdpa.py: the attention kernel the GPU would pick, and the allocations inside it;
- memo.py: the UNet's later evaluations replayed from its first;
- recorder.py: the record of every allocation and free, by stage, module and operator;
- call.py: the call itself (run_call, simulate_events, record_call);
- result.py: the replay and its peaks (SimResult); profile.py: the GPU profile argument.

Imports: torch, diffusers and transformers (the sim extra, loaded by simulate(), not by
importing this package), sd_vram.formula (allocator, kernel table, GPU profiles, options),
sd_vram.models and sd_vram.stages. Never sd_vram.plugin or sd_vram.cli.
"""

from __future__ import annotations

from sd_vram.formula.allocator import CachingAllocator, get_allocation_size, replay, round_size
from .profile import DEFAULT_PROFILE, GPUProfile, get_profile
from .result import LiveTensor, SimResult, StageSim

__all__ = ["simulate", "SimResult", "StageSim", "LiveTensor", "GPUProfile", "DEFAULT_PROFILE",
           "get_profile", "CachingAllocator", "replay", "round_size", "get_allocation_size"]


def simulate(height: int | None = None, width: int | None = None, prompt: str | None = None, prompt_length: int | None = None,
             *, profile: GPUProfile | None = None, steps="auto", history=(), vram: int | None = None,
             architecture: dict | None = None, **options) -> SimResult:
    """Simulate one img2img call on an image of height x width pixels (pipeline="txt2img":
    the output's size; "inpaint": the image's, the call at options height/width, as
    sd_vram.formula.estimate reads them).

    options: fields of sd_vram.formula.options.Options (guidance_scale, strength,
    num_inference_steps, attention, attention_slicing, vae_slicing, vae_tiling,
    safety_checker, output_type, gpu, num_images_per_prompt, expandable_segments: replay as
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True).
    profile: a GPUProfile (overrides options["gpu"], a formula profile name).
    steps: "auto" (the fewest UNet evaluations that reach the same peak), "full", or an int.
    history: the GPU suite's earlier model moves before this call, e.g. ("-safety_checker",
    "+safety_checker") after a case without the safety checker (resident.resident_setup).
    vram: the card's memory in bytes: the replay runs under vram less the profile's CUDA
    context, with PyTorch's OOM path (SimResult.fallbacks, num_alloc_retries, oom).
    architecture: a config of formula/data/sd15.json's layout to build the models from
    (default: that file), as the equation's estimate(architecture=...) takes it.
    The call starts from the state the GPU suite measures from: cuBLAS/cuBLASLt workspaces
    kept from its probes, the weights as sd_vram.models.build_pipeline("cuda") allocates them.
    """
    from sd_vram.formula.options import InputError, Options

    from sd_vram.formula import architecture as arch
    from sd_vram.formula import pipelines

    opts = Options(**options)
    try:
        model = arch.spec(architecture)
    except ValueError as e:
        raise InputError(str(e)) from None
    pipelines.check_slice_size(opts, model)
    if opts.pipeline != "img2img":   # the call's size: pipe(height, width) (formula/pipelines.py)
        height, width = pipelines.call_size(height, width, opts)
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 8:
            raise InputError(f"{name} must be an integer >= 8, got {v!r}")
    if steps not in ("auto", "full") and not (isinstance(steps, int) and steps >= 1):
        raise InputError(f"steps must be 'auto', 'full' or a positive integer, got {steps!r}")
    h, w = height - height % 8, width - width % 8
    prof = profile or get_profile(opts.gpu)

    from .call import simulate_events
    from .result import build_result

    recorder, start, end, info = simulate_events(h, w, prompt, prompt_length, options=opts,
                                                 profile=prof, steps=steps, history=tuple(history),
                                                 architecture=architecture)
    capacity = None if vram is None else vram - prof.cuda_context
    return build_result(recorder, start, end, info, height=h, width=w, options=opts, profile=prof,
                        expandable_segments=opts.expandable_segments, capacity=capacity)
