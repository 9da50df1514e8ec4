"""The peak-VRAM equation (DERIVATION.md writes it out term by term).

    peak_allocated = W + K + max over stages s of A_s(H, W, options)
    peak_reserved  = the resident segments + the segments the call adds
    peak_device    = peak_reserved + C  (CUDA context and library handles, per GPU profile)

W: the weights as the caching allocator's blocks; K: the cuBLAS and cuBLASLt workspaces kept
from the first matmul; A_s: the tensors alive at stage s's peak operation (activations.py),
the largest of the stage's candidate peak points; the segments come from replaying the
stages' allocations in order through the allocator's rules (allocator.py, schedule.py);
C: measured per GPU (gpu_profiles.py).
"""

from __future__ import annotations

from functools import lru_cache
from math import prod

from . import activations as act
from . import architecture as arch
from . import gpu_profiles, kernels, schedule
from .allocator import SMALL_SIZE, Segments
from .options import InputError, Options
from .result import Estimate, StagePeak
from .tokenizer import MAX_PROMPT_TOKENS, count_tokens

GB = 1e9  # the notebook's f reports decimal gigabytes

# Head dims of the attention calls that the backend choice depends on.
HEAD_DIM = {"unet": 40, "vae": 512, "clip": 64}


ORDER = ["safety_checker", "text_encoder", "unet", "vae"]  # pipe.to("cuda"): sorted component names


@lru_cache(maxsize=None)
def _resident(safety_checker: bool, cublas: int, cublaslt: int, expandable: bool = False):
    """The allocator after pipe.to("cuda") and the first matmul: weights in pipe.to()'s
    order, then the cuBLAS and cuBLASLt workspaces. Returns (allocated bytes per model and
    workspace, the allocator state)."""
    seg = Segments(expandable)
    out = {}
    for name in ORDER:
        if name == "safety_checker" and not safety_checker:
            continue
        out[f"weights_{name}"] = sum(seg.alloc(prod(shape) * item) for _, shape, item in arch.MODELS[name]())
    out["cublas_workspace"] = seg.alloc(cublas) + (seg.alloc(cublaslt) if cublaslt else 0)
    return out, seg.snapshot()  # resident blocks are never freed


def weights(safety_checker: bool = True) -> dict[str, int]:
    """Allocated bytes of each model's weights (blocks as the allocator hands them out)."""
    resident, _ = _resident(safety_checker, 0, 0)
    return {k.removeprefix("weights_"): v for k, v in resident.items() if k.startswith("weights_")}


def _size(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InputError(f"{what} must be a whole number of pixels, got {value!r}")
    if value < 8:
        raise InputError(f"{what} must be at least 8 pixels, got {value}")
    return value - value % 8  # diffusers: x - x % vae_scale_factor


def prompt_tokens(prompt, prompt_length) -> int | None:
    if prompt is not None and prompt_length is not None:
        raise InputError("give a prompt or a prompt length, not both")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be text, got {type(prompt).__name__}")
        return count_tokens(prompt)
    if prompt_length is not None:
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 0:
            raise InputError(f"prompt length must be a whole number >= 0, got {prompt_length!r}")
        return prompt_length
    return None


def _backends(s: act.Shape, o: Options, profile) -> dict[str, str]:
    """The SDPA kernel of each model's attention (kernels.sdpa_backend) at its peak call:
    the UNet's self-attention at level 0, the VAE's mid-block, CLIP's 77 tokens."""
    calls = {"unet": (s.B, act.UNET_HEADS, s.h * s.w), "vae": (1, 1, s.h * s.w), "clip": (1, 12, 77)}
    return {k: profile.sdpa_backend(o.attention, kernels.SdpaCall(batch=b, heads=n, q_len=t, kv_len=t,
                                                                   d_qk=HEAD_DIM[k]))
            for k, (b, n, t) in calls.items()}


def _stage_candidates(s: act.Shape, o: Options, profile, ws=None) -> dict[str, list[act.Peak]]:
    """Candidate peak live sets per stage, with what the pipeline carries into each stage.
    `ws`: the convolution workspaces (profile.conv_workspace())."""
    be = _backends(s, o, profile)
    ws = profile.conv_workspace() if ws is None else ws
    prompt = act.prompt_state(s)
    history = min(4, max(1, _unet_evaluations(o)))  # PNDM keeps the last 4 model outputs
    latents = act.latent_state(s, history)
    stages = {
        "text_encoder": act.text_encoder(s, be["clip"]),
        "vae_encode": [act.merge(prompt, p) for p in act.vae_encode(s, be["vae"], o.vae_tiling, ws)],
        "unet": [act.merge(prompt, latents, p) for p in act.unet(s, be["unet"], o.attention_slicing, ws)],
    }
    if o.decodes:
        stages["vae_decode"] = [act.merge(prompt, latents, p)
                                for p in act.vae_decode(s, be["vae"], o.vae_slicing, o.vae_tiling, ws)]
        if o.safety_checker:
            stages["safety_checker"] = [act.merge(prompt, latents, p) for p in act.safety_checker(s, be["clip"])]
            stages["safety_checker"].append(act.merge(prompt, latents, act.postprocess(s)))
        else:
            stages["vae_decode"].append(act.merge(prompt, latents, act.postprocess(s)))
    return stages


def _replay_stage(seg: Segments, name: str, s: act.Shape, o: Options, ws, candidates) -> None:
    """Allocate and free one stage's tensors in the allocator model, in order: the VAE's
    maps in code order (schedule.py, which passes through every VAE candidate live set),
    the other stages' candidate live sets largest first. Tensors of 1 MiB or less live in
    2 MiB small-pool segments and are left out."""
    for comp, _, size in candidates[0].terms:
        if comp == "state" and size > SMALL_SIZE:
            seg.alloc(size)
    if name in ("vae_encode", "vae_decode"):
        H, W = act.vae_tile(s, o.vae_tiling, latent=False)
        if name == "vae_encode":
            schedule.vae_encoder(seg, H, W, ws)
        else:
            schedule.vae_decoder(seg, 1 if o.vae_slicing else s.n, H, W, ws)
        seg.free_all()
        return
    seg.free_all()
    if name == "unet" and o.vae_tiling:
        # Tiled VAE passes leave only tile-sized blocks cached: the UNet's own order decides.
        # An evaluation ends freeing its skips in another order than it made them, so the
        # next one can start from other free blocks: replay evaluations until they repeat.
        levels = [s.level(i) for i in range(4)]
        before = seg.snapshot()
        for _ in range(_unet_evaluations(o)):
            schedule.unet(seg, s.B, levels, ws)
            after = seg.snapshot()
            if after == before:
                break
            before = after
    for p in candidates:
        for _, _, size in sorted(p.terms, key=lambda t: -t[2]):
            if size <= SMALL_SIZE:
                break
            seg.alloc(size)
        seg.free_all()


def _unet_evaluations(o: Options) -> int:
    """img2img runs int(steps * strength) steps; PNDM (skip_prk_steps) evaluates the UNet one
    extra time on its first step (the progress bar shows one fewer)."""
    steps = min(int(o.num_inference_steps * o.strength), o.num_inference_steps)
    return steps + 1 if steps > 1 else steps


def estimate(height, width, prompt=None, prompt_length=None, **options) -> Estimate:
    """Peak GPU memory of pipe(prompt, image=<height x width image>, **options), model resident."""
    H, W = _size(height, "height"), _size(width, "width")
    tokens = prompt_tokens(prompt, prompt_length)
    try:
        o = Options(**options)
    except TypeError as e:  # unknown keyword
        raise InputError(str(e).replace("__init__()", "estimate()")) from None
    if int(o.num_inference_steps * o.strength) < 1:
        raise InputError(f"strength {o.strength} x {o.num_inference_steps} steps leaves no denoising step "
                         "(diffusers raises ValueError)")
    profile = gpu_profiles.get(o.gpu)
    s = act.Shape(H=H, W=W, n=o.num_images_per_prompt, B=o.unet_batch, cfg=o.cfg)
    ws = profile.conv_workspace()
    stages, peak_stage, peak_reserved = _call(s, o, profile, ws)
    peak = stages[peak_stage]
    breakdown = dict(peak.components)
    breakdown["allocator_overhead"] = peak_reserved - peak.allocated
    breakdown["cuda_context"] = profile.cuda_context
    source = "+".join(sorted(ws.used)) or "none"
    return Estimate(
        height=H, width=W, prompt_tokens=tokens,
        truncated=tokens is not None and tokens > MAX_PROMPT_TOKENS,
        peak_allocated=peak.allocated, peak_reserved=peak_reserved,
        peak_device=peak_reserved + profile.cuda_context, peak_stage=peak_stage,
        stages=stages, breakdown=breakdown, options=o.to_dict(), gpu_profile=profile.name,
        conv_workspace=source if source != "rule" else f"rule {profile.conv_workspace_rule}",
        bounds=_bounds(s, o, profile, ws, peak.allocated, peak_reserved),
    )


def _call(s: act.Shape, o: Options, profile, ws):
    """(stage peaks, the peak stage, peak reserved) of one call with these conv workspaces."""
    resident_parts, resident_state = _resident(o.safety_checker, profile.cublas_workspace_bytes,
                                               profile.cublaslt_workspace_bytes, o.expandable_segments)
    resident = sum(resident_parts.values())

    # Reserved memory only grows during a call: replay, stage by stage, what each stage
    # allocates and frees (the VAE in its code order, schedule.py; the other stages' small
    # working sets as their candidate live sets) through the allocator's pools.
    seg = Segments.from_snapshot(resident_state)
    stages: dict[str, StagePeak] = {}
    for name, candidates in _stage_candidates(s, o, profile, ws).items():
        peak = max(candidates, key=lambda p: p.total)
        _replay_stage(seg, name, s, o, ws, candidates)
        allocated = resident + peak.total
        components = dict(resident_parts)
        for k, v in peak.components().items():
            components[k] = components.get(k, 0) + v
        stages[name] = StagePeak(allocated=allocated, reserved=max(seg.reserved, allocated),
                                 components=components, operation=peak.operation)

    peak_stage = max(stages, key=lambda k: stages[k].allocated)
    return stages, peak_stage, max(st.reserved for st in stages.values())


# The equation's own accuracy where every hardware term is known: the bands a probed profile is
# held to on the GPU (issue 9: allocated within 1 %, reserved and device within 3 %). A range
# that claims to hold the measurement carries it (DERIVATION.md, "Bounds").
ACCURACY = {"allocated": 0.01, "reserved": 0.03}


def _bounds(s: act.Shape, o: Options, profile, ws, allocated: int, reserved: int) -> dict[str, list[int]]:
    """[lo, hi] of each quantity (DERIVATION.md, "Bounds"). Where the profile measured every
    convolution workspace of the call and the CUDA context on its GPU, lo == hi == the point.
    Otherwise lo is the call without the workspaces it did not measure and with the smallest
    CUDA context on record, hi the call with the heaviest workspace rule set on record and the
    largest context, each widened by ACCURACY."""
    if "rule" not in ws.used and profile.cuda_context_measured:
        return {"peak_allocated_bytes": [allocated] * 2, "peak_reserved_bytes": [reserved] * 2,
                "peak_device_bytes": [reserved + profile.cuda_context] * 2}
    span = {"allocated": [allocated, allocated], "reserved": [reserved, reserved]}
    if "rule" in ws.used:
        for variant in (profile.conv_workspace(floor=True), profile.conv_workspace(heaviest=True)):
            stages, peak_stage, r = _call(s, o, profile, variant)
            for key, v in (("allocated", stages[peak_stage].allocated), ("reserved", r)):
                span[key] = [min(span[key][0], v), max(span[key][1], v)]
    for key, band in ACCURACY.items():
        span[key] = [int(span[key][0] * (1 - band)), -int(-span[key][1] * (1 + band) // 1)]
    context = (profile.cuda_context,) * 2 if profile.cuda_context_measured else gpu_profiles.CONTEXT_RANGE
    lo_ctx, hi_ctx = min(context[0], profile.cuda_context), max(context[1], profile.cuda_context)
    return {"peak_allocated_bytes": span["allocated"], "peak_reserved_bytes": span["reserved"],
            "peak_device_bytes": [span["reserved"][0] + lo_ctx, span["reserved"][1] + hi_ctx]}


def f(h, w, prompt_length=77, **kwargs) -> dict:
    """The seed notebook's signature: f(h, w, prompt_length) -> {"bytes", "GB", "breakdown"}.

    Takes height and width in pixels like the notebook; the prompt length changes nothing
    (the pipeline pads every prompt to 77 tokens) and is accepted for compatibility."""
    est = estimate(h, w, prompt_length=prompt_length, **kwargs)
    return {"bytes": est.peak_allocated, "GB": est.peak_allocated / GB, "breakdown": dict(est.breakdown)}
