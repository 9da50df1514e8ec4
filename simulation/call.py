"""One simulated call: the real diffusers StableDiffusionImg2ImgPipeline.__call__ on fake CUDA fp16 tensors.

simulate_events rebuilds the device state the GPU suite measures from (resident.py), then
run_call runs the call under FakeTensorMode with a MemoryRecorder (recorder.py) on top. The
call's substitutions each keep the device-side operations of the real call:

- host-only work, and CUDA devices a CPU-only torch cannot parse (patches.py): the input
  image, ``Tensor.to``/``.cuda``/``.numpy``, numpy_to_pil and the feature extractor, the
  safety checker's thresholds, a fresh scheduler of the call's kind per call;
- F.scaled_dot_product_attention picks the backend the GPU would (sdpa.py); with
  attention="xformers" diffusers' enable_xformers_memory_efficient_attention() runs on a
  stand-in xformers (fake_xformers.py);
- scalar reads (``.item()``, ``bool()``) of small tensors use values computed on the CPU
  alongside (recorder.py shadows), e.g. the PNDM scheduler's ``prev_timestep >= 0``;
- denoising steps: after the UNet evaluation where the scheduler's history reaches its
  steady size (``steps="auto"``: formula/schedulers.steady_state_evals, 6 evaluations for
  PNDM, whose ets list then holds 4 noise predictions), the remaining steps are skipped
  through the pipeline's own ``interrupt`` flag. Every later step allocates the same tensors
  and the scheduler keeps as many, so the peak is the same (tests prove it). The UNet's
  evaluations after the first replay its recorded stream (memo.py).

Kernel-internal allocations the meta kernels do not show are added as synthetic events
(kernel_hooks.py; the attention kernels' in sdpa.py). record_call runs the same call on
another device type, on fake or (CPU) real tensors (tests/test_simulation_faithful.py).
"""

from __future__ import annotations

import contextlib
import time
import warnings

import torch

from sd_vram.formula import schedulers
from sd_vram.formula.gpu_profiles import GPUProfile
from sd_vram.formula.options import XFORMERS
from sd_vram.models import unet_in_channels

from .fake_xformers import FakeXformers, enable_xformers, patched_xformers
from .kernel_hooks import kernel_allocations
from .lora import loaded_lora
from .memo import ForwardMemo
from .patches import patch_attr, patched_tensor_methods, pipeline_substitutes, set_safety_thresholds
from .pipelines import call_inputs, host_scalars, mask_substitute, pipeline_for
from .profile import get_profile
from .recorder import MemoryRecorder
from .resident import WeightSwap, config_json, load_weights, meta_pipeline, module_order, resident_setup
from .sdpa import SDPAPatcher, patched_sdpa

STEADY_STATE_EVALS = schedulers.steady_state_evals("pndm")   # 6: PNDM's ets holds 4 from evaluation 6


def steady_state_evals(options) -> int:
    """The UNet evaluations steps="auto" runs: its scheduler's steady state."""
    return schedulers.steady_state_evals(options.scheduler)


def _prompt_for(prompt, prompt_length):
    if prompt is not None:
        return prompt
    n = 10 if prompt_length is None else int(prompt_length)
    # "photo" is one CLIP BPE token; no device tensor depends on the prompt (padding to 77)
    return " ".join(["photo"] * max(n, 0))


@contextlib.contextmanager
def _memory_options(pipe, options, xformers: FakeXformers | None = None):
    """The call's xformers attention (before slicing: the later call wins, as on the GPU),
    attention slicing and VAE slicing/tiling on `pipe`, restored afterwards (the meta
    pipeline is shared)."""
    with contextlib.ExitStack() as es:
        unet_procs = dict(pipe.unet.attn_processors)
        vae_procs = dict(pipe.vae.attn_processors)
        es.callback(pipe.vae.set_attn_processor, vae_procs)
        es.callback(pipe.unet.set_attn_processor, unet_procs)
        if xformers is not None:
            es.enter_context(patched_xformers(xformers))
            enable_xformers(pipe, xformers)
        if options.attention_slicing is not None:
            pipe.enable_attention_slicing(options.attention_slicing)
        old_slicing, old_tiling = getattr(pipe.vae, "use_slicing", False), getattr(pipe.vae, "use_tiling", False)
        es.callback(setattr, pipe.vae, "use_slicing", old_slicing)
        es.callback(setattr, pipe.vae, "use_tiling", old_tiling)
        if options.vae_slicing:
            pipe.vae.enable_slicing()
        if options.vae_tiling:
            pipe.vae.enable_tiling()
        yield


def run_call(pipe, recorder: MemoryRecorder, *, height: int, width: int, prompt: str,
             options, device_type: str, profile: GPUProfile | None = None, fake: bool = True,
             max_unet_evals: int | str | None = "auto", sdpa: bool = True,
             memo_unet: bool = True):
    """Run pipe.__call__ under the recorder with the substitutions of the module docstring.

    The caller has already entered FakeTensorMode (fake=True) and put the weights on the
    device. max_unet_evals: "auto" (steady_state_evals), a number, or None (all). Returns
    (call_start_index, call_end_index, info) over recorder.events.
    """

    from sd_vram.stages import stage_hooks

    info = {"unet_evals": 0, "sdpa": {}}
    if max_unet_evals == "auto":
        max_unet_evals = steady_state_evals(options)
    pipe = pipeline_for(pipe, options.pipeline)   # txt2img, inpaint: the same components (pipelines.py)
    es = contextlib.ExitStack()
    with es:
        es.enter_context(pipeline_substitutes(pipe, height, width, options.scheduler))
        es.enter_context(mask_substitute(pipe, height, width))
        es.enter_context(host_scalars())
        es.enter_context(patched_tensor_methods(recorder, fake, device_type))

        xformers = None
        if options.attention == XFORMERS:
            xformers = FakeXformers(profile or get_profile(None), recorder)
        es.enter_context(_memory_options(pipe, options, xformers))
        set_safety_thresholds(pipe, recorder, fake)

        patcher = None
        if sdpa and device_type == "cuda":
            profile = profile or get_profile(None)
            patcher = SDPAPatcher(profile, options.sdpa_attention, recorder, device_type)
            es.enter_context(patched_sdpa(patcher))
            es.enter_context(kernel_allocations(recorder, profile, device_type, options))

        def on_step_end(p, i, t, kwargs):
            info["unet_evals"] += 1
            if max_unet_evals is not None and info["unet_evals"] >= max_unet_evals:
                p._interrupt = True
            return {}

        if memo_unet:
            memo = ForwardMemo(recorder, pipe.unet, device_type)
            es.enter_context(patch_attr(pipe.unet, "forward", memo, use_dict=True))
            info["memo"] = memo

        es.enter_context(stage_hooks(pipe, recorder.set_stage))
        # num_images_per_prompt > 1: diffusers warns that it repeats the one image (FutureWarning,
        # the real call's own behaviour, nothing about memory); keep it off the user's stderr
        es.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=r"You have passed \d+ text prompts", category=FutureWarning)
        start = len(recorder.events)
        with recorder:
            out = pipe(prompt, **call_inputs(options, height, width),
                       num_inference_steps=options.num_inference_steps,
                       guidance_scale=options.guidance_scale,
                       num_images_per_prompt=options.num_images_per_prompt,
                       output_type=options.output_type, callback_on_step_end=on_step_end,
                       callback_on_step_end_tensor_inputs=[])
            end = len(recorder.events)
        del out
        if patcher is not None:
            info["sdpa"] = dict(patcher.choices)
        if xformers is not None:
            info["sdpa"] = {**info["sdpa"], **xformers.choices}
        if memo_unet:
            info["unet_replays"] = info.pop("memo").replays
    return start, end, info


def simulate_events(height: int, width: int, prompt=None, prompt_length=None, *, options,
                    profile: GPUProfile, steps="auto", history=(), memo_unet: bool = True,
                    architecture: dict | None = None):
    """Run the fake CUDA call from the GPU suite's resident state (resident_setup); return
    (recorder, start, end, info). architecture: the config the models are built from
    (default: the bundled sd15.json)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # the suite builds the pipeline with its safety checker and sets it to None for a case
    # without one; a history that unloads it needs the model built too
    built_with_checker = bool(options.safety_checker) or any(h == "-safety_checker" for h in history)
    pipe = meta_pipeline(built_with_checker, options.dtype, config_json(architecture), options.channels_last)
    max_evals = None if steps == "full" else (steady_state_evals(options) if steps == "auto" else int(steps))
    recorder = MemoryRecorder("cuda")
    recorder.name_modules({n: m for n, m in module_order(pipe)})
    swap = WeightSwap()
    t0 = time.perf_counter()
    pipeline_for(pipe, options.pipeline)   # from_pipe moves modules (.to): before the weights are swapped
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with unet_in_channels(pipe.unet, options.unet_in_channels), fake_mode, contextlib.ExitStack() as es:
            loaded = resident_setup(pipe, recorder, swap, profile, history)
            if pipe.safety_checker is not None and (not options.safety_checker or "safety_checker" not in loaded):
                if options.safety_checker:
                    raise ValueError("the history leaves the safety checker off the device")
                es.enter_context(patch_attr(pipe, "safety_checker", None, use_dict=True))
            es.enter_context(loaded_lora(pipe, recorder, options))
            start, end, info = run_call(pipe, recorder, height=height, width=width,
                                        prompt=_prompt_for(prompt, prompt_length), options=options,
                                        device_type="cuda", profile=profile, fake=True,
                                        max_unet_evals=max_evals, memo_unet=memo_unet)
    finally:
        swap.restore()
    info["seconds"] = time.perf_counter() - t0
    info["weights_end"] = start
    return recorder, start, end, info


def record_call(height: int, width: int, *, device_type: str = "cuda", fake: bool = True,
                options=None, profile: GPUProfile | None = None, max_unet_evals="auto",
                memo_unet: bool = True, dtype: torch.dtype = torch.float16, prompt: str = "a photo"):
    """Record one call on `device_type`, on fake tensors or (fake=False, CPU) real ones.

    The real CPU run gets uninitialised weights (torch.empty: memory does not depend on
    values, and untouched pages cost no RAM); both runs use the same substitutions.
    Returns (recorder, call_start, call_end, info).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sd_vram.formula.options import Options

    options = options or Options()
    if options.adapters is not None:   # loaded_lora works on the fake device only
        raise ValueError("record_call does not load LoRA adapters (simulate does)")
    pipe = meta_pipeline(bool(options.safety_checker), channels_last=options.channels_last)
    recorder = MemoryRecorder(device_type, shadows=fake)
    recorder.name_modules({n: m for n, m in module_order(pipe)})
    swap = WeightSwap()

    def make(like, dt):
        if not like.is_floating_point():   # position_ids: the values a checkpoint holds
            return torch.arange(like.shape[-1], dtype=dt, device=device_type).expand(like.shape).contiguous()
        return torch.empty_strided(like.shape, like.stride(), dtype=dtype, device=device_type)

    pipeline_for(pipe, options.pipeline)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    try:
        with unet_in_channels(pipe.unet, options.unet_in_channels), mode:
            load_weights(pipe, recorder, device_type, swap, make=make)
            start, end, info = run_call(pipe, recorder, height=height, width=width, prompt=prompt,
                                        options=options, device_type=device_type, profile=profile,
                                        fake=fake, max_unet_evals=max_unet_evals, memo_unet=memo_unet)
    finally:
        swap.restore()
    return recorder, start, end, info
