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

from dataclasses import dataclass
from functools import lru_cache
from math import prod

from . import activations as act
from . import architecture as arch
from . import gpu_profiles, kernels, pipelines, schedule, schedulers
from .allocconf import NATIVE, AllocConf
from .allocator import CachingAllocator, OutOfMemoryError, kSmallSize, round_size
from .options import XFORMERS, InputError, Options
from .result import OOM, VERDICTS, Boundary, Estimate, StagePeak
from .tokenizer import MAX_PROMPT_TOKENS, count_tokens

GB = 1e9  # the notebook's f reports decimal gigabytes

ORDER = ["safety_checker", "text_encoder", "unet", "vae"]  # pipe.to("cuda"): sorted component names


@lru_cache(maxsize=None)
def _resident(safety_checker: bool, cublas: int, cublaslt: int, conf: AllocConf = NATIVE,
              total_memory: int = 80 << 30, itemsize: int = arch.FP16, model: arch.Spec | None = None,
              lora: tuple[int, ...] = ()):
    """The allocator after pipe.to("cuda"), pipe.load_lora_weights (`lora`: the adapter
    tensors' bytes in the order they reach the GPU, lora.Lora.tensors) and the first matmul:
    weights in pipe.to()'s order, the adapters, then the cuBLAS and cuBLASLt workspaces.
    Returns (allocated bytes per model and workspace, the allocator state)."""
    alloc = CachingAllocator(total_memory=total_memory, conf=conf)
    out = {}
    for name in ORDER:
        if name == "safety_checker" and not safety_checker:
            continue
        out[f"weights_{name}"] = sum(alloc.malloc(prod(shape) * item).size
                                     for _, shape, item in arch.in_dtype(arch.model_tensors(name, model), itemsize))
    if lora:
        # fuse_lora's temporaries (B @ A, * scaling) are freed before the call: the GPU suite
        # then empties the cache, as it does before every case (DERIVATION.md, "LoRA adapters")
        out["lora_weights"] = sum(alloc.malloc(size).size for size in lora)
    out["cublas_workspace"] = alloc.malloc(cublas).size + (alloc.malloc(cublaslt).size if cublaslt else 0)
    return out, alloc.snapshot()  # resident blocks are never freed


def _lora_tensors(o: Options) -> list:
    """The adapter tensors as pipe.load_lora_weights puts them on the GPU (lora.py)."""
    return o.adapters.tensors() if o.adapters else []


def _resident_of(o: Options, profile, model: arch.Spec | None = None):
    """_resident for this call's options, GPU profile and architecture (Shape.model)."""
    lora = tuple(prod(shape) * item for _, shape, item in _lora_tensors(o))
    return _resident(o.safety_checker, profile.cublas_workspace_bytes, profile.cublaslt_workspace_bytes,
                     o.allocator, profile.total_memory, o.itemsize, model, lora)


def weights(safety_checker: bool = True, dtype: str = "fp16") -> dict[str, int]:
    """Allocated bytes of each model's weights (blocks as the allocator hands them out)."""
    resident, _ = _resident(safety_checker, 0, 0, itemsize=Options(dtype=dtype).itemsize)
    return {k.removeprefix("weights_"): v for k, v in resident.items() if k.startswith("weights_")}


def prompt_tokens(prompt, prompt_length) -> int | None:
    if prompt is not None and prompt_length is not None:
        raise InputError("give a prompt or a prompt length, not both")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be text, got {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (os.fsdecode)
            raise InputError("the prompt is not valid UTF-8 text") from None
        return count_tokens(prompt)
    if prompt_length is not None:
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 0:
            raise InputError(f"prompt length must be a whole number >= 0, got {prompt_length!r}")
        return prompt_length
    return None


def _backends(s: act.Shape, o: Options, profile) -> dict[str, str]:
    """The SDPA kernel of each model's attention (kernels.sdpa_backend) at its peak call:
    the UNet's self-attention at level 0, the VAE's mid-block, CLIP's 77 tokens."""
    m = s.model
    calls = {"unet": (s.B, m.unet_heads, s.h * s.w, m.unet_channels[0] // m.unet_heads),
             "vae": (1, 1, s.h * s.w, m.vae_channels[-1]),
             "clip": (1, m.text_heads, m.text_tokens, m.text_dim // m.text_heads)}
    out = {k: profile.sdpa_backend(o.sdpa_attention, kernels.SdpaCall(batch=b, heads=n, q_len=t, kv_len=t,
                                                                       d_qk=d, dtype=s.torch_dtype))
           for k, (b, n, t, d) in calls.items()}
    if o.attention == XFORMERS:
        out.update(_xformers_ops(calls, profile))
    return out


def _xformers_ops(calls: dict, profile) -> dict:
    """With enable_xformers_memory_efficient_attention(): the op xformers picks for the UNet's
    and the VAE's attention (kernels.xformers_forward_op; the processor passes q, k, v as
    batch x heads rows); CLIP keeps SDPA."""
    ops = {}
    for k in ("unet", "vae"):
        b, n, t, d = calls[k]
        op = kernels.xformers_forward_op(profile, d, batch_heads=b * n, q_len=t, kv_len=t)
        if op is None:
            raise InputError(f"xformers {kernels.XFORMERS_VERSION} has no forward operator for the {k}'s head dim "
                             f"{d} on compute capability {'.'.join(map(str, profile.compute_capability))}")
        ops[k] = op
    return ops


def _stage_candidates(s: act.Shape, o: Options, profile, ws=None) -> dict[str, list[act.Peak]]:
    """Candidate peak live sets per stage, with what the pipeline carries into each stage.
    `ws`: the convolutions' kernel-internal allocations (kernels.conv_kernels)."""
    be = _backends(s, o, profile)
    ws = kernels.conv_kernels(o, profile) if ws is None else ws
    prompt = act.prompt_state(s)
    # what the scheduler keeps: during the UNet's evaluations, and after the loop (schedulers.py)
    (during, held_during), (after, held_after) = schedulers.history(o.scheduler, o.unet_evaluations)
    kept = schedulers.get(o.scheduler).kept_what
    latents = act.latent_state(s, after, kept, held_after)
    in_unet = act.latent_state(s, during, kept, held_during)
    stages = {
        "text_encoder": act.text_encoder(s, be["clip"]),
        "vae_encode": [act.merge(prompt, p) for p in act.vae_encode(s, be["vae"], o.vae_tiling, ws)],
        "unet": [act.merge(prompt, in_unet, p) for p in act.unet(s, be["unet"], o.attention_slicing, ws)],
    }
    if o.adapters and not o.lora_fused:   # fused: the base layers alone run (peft: merged)
        text, unet = o.adapters.targets("text_encoder"), o.adapters.targets("unet")
        stages["text_encoder"] += act.lora_text_attention(s, text) + act.lora_text_mlp(s, text)
        stages["unet"] += [act.merge(prompt, in_unet, p)
                           for p in act.lora_unet_attention(s, unet) + act.lora_unet_feed_forward(s, unet)]
    if o.decodes:
        stages["vae_decode"] = [act.merge(prompt, latents, p)
                                for p in act.vae_decode(s, be["vae"], o.vae_slicing, o.vae_tiling, ws)]
        if o.safety_checker:
            stages["safety_checker"] = [act.merge(prompt, latents, p) for p in act.safety_checker(s, be["clip"])]
            stages["safety_checker"].append(act.merge(prompt, latents, act.postprocess(s)))
        else:
            stages["vae_decode"].append(act.merge(prompt, latents, act.postprocess(s)))
    if o.pipeline != "img2img":
        stages = pipelines.stage_candidates(stages, s, o, be, ws)
    if any(o.allocator.roundup_power2_divisions):
        # the allocator counts whole blocks: with roundup_power2_divisions every tensor's block
        # is its size rounded up to a division (allocator.round_size), allocated bytes too
        for cands in stages.values():
            for p in cands:
                p.terms = [(c, t, round_size(size, o.allocator)) for c, t, size in p.terms]
    return stages


CONV_WORKSPACE = kernels.ConvWorkspace.term   # the live-set term cuDNN can run without (activations.py)


class _Replay:
    """The call's allocations through one allocator model, stage by stage; under a capacity
    it follows PyTorch's OOM path (allocator.py) and cuDNN's workspace fallback
    (schedule.Schedule), and keeps where the call failed or fell back."""

    def __init__(self, alloc: CachingAllocator, ws, capacity: int | None):
        self.alloc, self.ws, self.capacity = alloc, ws, capacity   # ws: the profile's kernels.ConvWorkspace
        self.fallbacks: list[tuple[str, str]] = []   # (stage, convolution)
        self._live: list = []

    def hold(self, size: int, operation: str, workspace: bool = False, stage: str = "") -> None:
        """Allocate a tensor kept until release(); a workspace that cannot be had is dropped."""
        try:
            self._live.append(self.alloc.malloc(size))
        except OutOfMemoryError as e:
            if workspace and self.capacity is not None:
                self.fallbacks.append((stage, operation))
                return
            e.operation = operation
            raise

    def release(self) -> None:
        while self._live:
            self.alloc.free(self._live.pop())

    def stage(self, name: str, s: act.Shape, o: Options, candidates) -> None:
        """Allocate and free one stage's tensors in the allocator model, in order: the VAE's
        maps in code order (schedule.py, which passes through every VAE candidate live set),
        the other stages' candidate live sets largest first, workspaces last (a library takes
        its scratch inside the operation, after its inputs and output exist). Tensors of
        1 MiB or less live in 2 MiB small-pool segments and are left out."""
        ws = self.ws
        fallbacks = [] if self.capacity is not None else None
        try:
            for comp, tensor, size in candidates[0].terms:
                if comp == "state" and size > kSmallSize:
                    self.hold(size, tensor)
            if name in ("vae_encode", "vae_decode"):
                H, W = act.vae_tile(s, o.vae_tiling, latent=False)
                if name == "vae_encode":
                    schedule.vae_encoder(self.alloc, H, W, ws, fallbacks=fallbacks, itemsize=s.itemsize,
                                         model=s.model, layouts=s.layouts)
                else:
                    if not pipelines.encodes_before_unet(o):   # txt2img: nothing big cached before
                        schedule.vae_decoder_low_res(self.alloc, 1 if o.vae_slicing else s.n, H, W, ws,
                                                     fallbacks=fallbacks, itemsize=s.itemsize, model=s.model,
                                                     layouts=s.layouts)
                    schedule.vae_decoder(self.alloc, 1 if o.vae_slicing else s.n, H, W, ws,
                                         fallbacks=fallbacks, itemsize=s.itemsize, model=s.model, layouts=s.layouts)
                self.release()
                return
            self.release()
            if name == "unet" and (o.vae_tiling or not pipelines.encodes_before_unet(o)):
                # (txt2img: no VAE encoder ran, nothing big is cached: the same holds)
                # Tiled VAE passes leave only tile-sized blocks cached: the UNet's own order
                # decides. An evaluation ends freeing its skips in another order than it made
                # them, so the next one can start from other free blocks: replay evaluations
                # until they repeat.
                levels = [s.level(i) for i in range(len(s.model.unet_channels))]
                before = self.alloc.free_blocks()
                for _ in range(o.unet_evaluations):
                    schedule.unet(self.alloc, s.B, levels, ws, fallbacks=fallbacks, itemsize=s.itemsize,
                                  model=s.model, layouts=s.layouts)
                    after = self.alloc.free_blocks()
                    if after == before:
                        break
                    before = after
            for p in candidates:
                terms = sorted(p.terms, key=lambda t: (t[0] == "workspace", -t[2]))
                for comp, tensor, size in terms:
                    if size > kSmallSize:
                        self.hold(size, f"{p.operation}: {tensor}", tensor == CONV_WORKSPACE, name)
                self.release()
        finally:
            self.fallbacks += [(name, op) for op in fallbacks or ()]


def estimate(height=None, width=None, prompt=None, prompt_length=None, *, vram=None, limit="card", _floor=False,
             architecture: dict | None = None, **options) -> Estimate:
    """Peak GPU memory of pipe(prompt, image=<height x width image>, **options), model resident.

    pipeline="txt2img": height, width are the output's (default 512, as options height/width);
    pipeline="inpaint": the image's, and mask_size its mask's (the call runs at options
    height/width, default 512; DERIVATION.md, "Pipelines").

    vram: the card's memory in bytes as PyTorch sees it (torch.cuda.mem_get_info()[1], the "total
    capacity" of an out-of-memory message), less what other processes hold. With it, the call is
    replayed under that capacity as PyTorch would run it (DERIVATION.md section 11), and the
    estimate carries a verdict: "fits", "fits-with-fallback" or "oom". limit: "card" (a card of
    that size), or "fraction" (torch.cuda.set_per_process_memory_fraction allowing vram less
    the CUDA context on a larger card). _floor: the call without any convolution workspace,
    the floor cuDNN falls back to (max-size's bound). architecture: a config of
    formula/data/sd15.json's layout (default: that file), e.g. other UNet block_out_channels."""
    H, W, tokens, o, profile, s = _setup(height, width, prompt, prompt_length, options, architecture)
    if vram is not None:
        _check_vram(vram, profile)
    ws = kernels.no_conv_workspace(o) if _floor else kernels.conv_kernels(o, profile)
    call = _call(s, o, profile, ws)
    stages, peak_stage, peak_reserved = call.stages, call.peak_stage, call.peak_reserved
    peak = stages[peak_stage]
    breakdown = dict(peak.components)
    breakdown["allocator_overhead"] = peak_reserved - peak.allocated
    breakdown["cuda_context"] = profile.cuda_context
    rule = profile.conv_workspace_rule_nhwc if o.channels_last else profile.conv_workspace_rule
    source = "+".join(sorted(ws.used)) or "none"
    source = {"native": "native im2col (cuDNN off)", "rule": f"rule {rule}"}.get(source, source)
    if o.channels_last and not ws:      # no NHWC workspace probed, the "nhwc" rule set (none)
        source = f"rule {rule}: no workspace (NHWC engines, channels_last: derived, not measured)"
    if o.cudnn_deterministic:
        source += " (deterministic engines: derived, not measured)"
    est = Estimate(
        height=H, width=W, prompt_tokens=tokens,
        truncated=tokens is not None and tokens > MAX_PROMPT_TOKENS,
        peak_allocated=peak.allocated, peak_reserved=peak_reserved,
        peak_device=peak_reserved + profile.cuda_context, peak_stage=peak_stage,
        stages=stages, breakdown=breakdown, options=o.to_dict(), gpu_profile=profile.name,
        conv_workspace=source,
        bounds_of=lambda: _bounds(s, o, profile, ws, peak.allocated, peak_reserved, vram),
        runtime_note=kernels.BENCHMARK_NOTE if o.cudnn_benchmark else "",
        derived_settings=o.derived_settings,
    )
    if vram is not None:
        est.boundary = _boundary(est, vram, limit, s, o, profile, ws, call)
    return est


@dataclass
class _CallReplay:
    """One call through the allocator model: each stage's peak, and what a budget replays."""

    stages: dict
    peak_stage: str
    peak_reserved: int
    resident: int                # allocated bytes before the call (weights, cuBLAS workspaces)
    resident_state: tuple        # the allocator then (CachingAllocator.snapshot)
    candidates: dict             # each stage's candidate live sets


def _call(s: act.Shape, o: Options, profile, ws) -> _CallReplay:
    """The stage peaks of one call with these conv workspaces (kernels.ConvWorkspace)."""
    resident_parts, resident_state = _resident_of(o, profile, s.model)
    resident = sum(resident_parts.values())
    candidates = _stage_candidates(s, o, profile, ws)
    # Reserved memory only grows during a call: replay, stage by stage, what each stage
    # allocates and frees (the VAE in its code order, schedule.py; the other stages' small
    # working sets as their candidate live sets) through the allocator's pools.
    replay = _Replay(CachingAllocator.restore(resident_state), ws, None)
    stages: dict[str, StagePeak] = {}
    for name, cands in candidates.items():
        peak = max(cands, key=lambda p: p.total)
        replay.stage(name, s, o, cands)
        allocated = resident + peak.total
        components = dict(resident_parts)
        for k, v in peak.components().items():
            components[k] = components.get(k, 0) + v
        stages[name] = StagePeak(allocated=allocated, reserved=max(replay.alloc.reserved, allocated),
                                 components=components, operation=peak.operation)
    peak_stage = max(stages, key=lambda k: stages[k].allocated)
    return _CallReplay(stages, peak_stage, max(st.reserved for st in stages.values()), resident, resident_state,
                       candidates)


def _setup(height, width, prompt, prompt_length, options: dict, architecture: dict | None = None):
    """The validated inputs: (H, W, prompt tokens, options, GPU profile, shape)."""
    tokens = prompt_tokens(prompt, prompt_length)
    try:
        o = Options(**options)
    except TypeError as e:  # unknown keyword
        raise InputError(str(e).replace("__init__()", "estimate()")) from None
    H, W = pipelines.call_size(height, width, o)   # the image's size, or pipe(height, width)
    profile = gpu_profiles.get(o.gpu)
    try:
        model = arch.spec(architecture)
        if o.pipeline == "inpaint" and o.unet_in_channels != model.unet_in_channels:   # --inpaint-unet
            model = arch.spec({**model.config, "unet": {**model.config["unet"], "in_channels": o.unet_in_channels}})
    except ValueError as e:
        raise InputError(str(e)) from None
    pipelines.check_slice_size(o, model)
    return H, W, tokens, o, profile, act.Shape(H=H, W=W, n=o.num_images_per_prompt, B=o.unet_batch, cfg=o.cfg,
                                               dtype=o.dtype, model=model, layouts=kernels.Layouts.of(o, profile))


def peak_allocated(height=None, width=None, _floor=False, architecture: dict | None = None, **options) -> int:
    """estimate(...).peak_allocated without the allocator replay (max-size bisects it)."""
    _, _, _, o, profile, s = _setup(height, width, None, None, options, architecture)
    resident_parts, _ = _resident_of(o, profile, s.model)
    ws = kernels.no_conv_workspace(o) if _floor else kernels.conv_kernels(o, profile)
    candidates = _stage_candidates(s, o, profile, ws)
    return sum(resident_parts.values()) + max(p.total for cands in candidates.values() for p in cands)


def _loading_oom(o: Options, profile, capacity: int, limit: str, oom, spec: arch.Spec | None = None) -> Boundary:
    """The weight whose allocation fails in pipe.to("cuda") (or the cuBLAS workspace at the
    text encoder's first matmul), as `oom(stage, operation, error)` reports it."""
    alloc = CachingAllocator(total_memory=profile.total_memory, capacity=capacity, conf=o.allocator, limit=limit)
    tensors = [("setup", f"pipe.to('cuda'): {model} {name}", prod(shape) * item) for model in ORDER
               if model != "safety_checker" or o.safety_checker
               for name, shape, item in arch.in_dtype(arch.model_tensors(model, spec), o.itemsize)]
    tensors += [("setup", f"pipe.load_lora_weights: {name}", prod(shape) * item)
                for name, shape, item in _lora_tensors(o)]
    tensors += [("text_encoder", f"the first matmul: {what} workspace", size) for what, size in
                (("cuBLAS", profile.cublas_workspace_bytes), ("cuBLASLt", profile.cublaslt_workspace_bytes)) if size]
    for stage, what, size in tensors:
        try:
            alloc.malloc(size)
        except OutOfMemoryError as e:
            boundary = oom(stage, what, e)
            boundary.retries = alloc.stats.num_alloc_retries
            return boundary
    raise AssertionError("the resident state fits its capacity")  # _boundary checked it does not


def _check_vram(vram, profile) -> None:
    if isinstance(vram, bool) or not isinstance(vram, int) or vram <= 0:
        raise InputError(f"vram must be a positive number of bytes, got {vram!r}")
    if profile.name != "default" and vram > profile.total_memory:
        raise InputError(f"a budget of {vram:,} B is more than the {profile.gpu}'s {profile.total_memory:,} B "
                         f"(GPU profile {profile.name})")
    if vram <= profile.cuda_context:
        raise InputError(f"a budget of {vram:,} B leaves nothing beside the CUDA context and libraries "
                         f"({profile.cuda_context:,} B on GPU profile {profile.name})")


def _boundary(est: Estimate, vram: int, limit: str, s, o: Options, profile, ws, call: _CallReplay) -> Boundary:
    """The call under a capacity of vram less the CUDA context: PyTorch's OOM path."""
    if limit not in ("card", "fraction"):
        raise InputError(f"limit must be 'card' or 'fraction', got {limit!r}")
    context = profile.cuda_context
    capacity = vram - context
    gc = o.allocator.garbage_collection_threshold if limit == "fraction" else 0
    if est.peak_reserved <= capacity * (gc or 1):   # no segment request fails (nor collects garbage)
        return Boundary(vram=vram, capacity=capacity, verdict="fits", limit=limit, peak_device=est.peak_device)
    alloc = CachingAllocator.restore(call.resident_state, capacity, limit)
    replay = _Replay(alloc, ws, capacity)

    def oom(stage, operation, e):
        allowed = capacity if limit == "fraction" else None
        return Boundary(vram=vram, capacity=capacity, verdict="oom", limit=limit, retries=alloc.stats.num_alloc_retries,
                        fallbacks=replay.fallbacks, oom=OOM(
                            stage=stage, operation=operation, requested_bytes=e.requested,
                            allocated_bytes=e.allocated, reserved_bytes=e.reserved,
                            message=e.message(total=vram, used_outside=context, allowed=allowed)))

    if alloc.reserved > capacity:
        return _loading_oom(o, profile, capacity, limit, oom, s.model)
    for name, cands in call.candidates.items():
        try:
            replay.stage(name, s, o, cands)
        except OutOfMemoryError as e:
            return oom(name, getattr(e, "operation", ""), e)
    allocated_range = None
    if replay.fallbacks:
        # Which engine cuDNN falls back to is unmeasured: between none and the full workspace.
        fell_back = {stage for stage, _ in replay.fallbacks}
        floor = _stage_candidates(s, o, profile, kernels.no_conv_workspace(o))
        lo = max(est.stages[k].allocated if k not in fell_back else call.resident + max(p.total for p in floor[k])
                 for k in est.stages)
        allocated_range = (lo, min(est.peak_allocated, capacity))
    return Boundary(vram=vram, capacity=capacity, verdict="fits-with-fallback" if replay.fallbacks else "fits",
                    limit=limit, retries=alloc.stats.num_alloc_retries, fallbacks=replay.fallbacks,
                    peak_reserved=alloc.stats.peak_reserved, peak_device=alloc.stats.peak_reserved + context,
                    allocated_range=allocated_range)


# The equation's own accuracy where every hardware term is known: the bands a probed profile is
# held to on the GPU (issue 9: allocated within 1 %, reserved and device within 3 %). A range
# that claims to hold the measurement carries it (DERIVATION.md, "Bounds").
ACCURACY = {"allocated": 0.01, "reserved": 0.03}


def _context_range(profile) -> tuple[int, int]:
    """The CUDA context's [lo, hi]: the measured one, else the range on record (CONTEXT_RANGE)."""
    context = (profile.cuda_context,) * 2 if profile.cuda_context_measured else gpu_profiles.CONTEXT_RANGE
    return min(context[0], profile.cuda_context), max(context[1], profile.cuda_context)


def verdict_range(height=None, width=None, prompt=None, prompt_length=None, *, vram, limit="card",
                  architecture: dict | None = None, point: Estimate | None = None,
                  **options) -> tuple[str, str] | None:
    """(mildest, severest) of the verdicts under `vram` of the point and of the two ends of the
    bounds (DERIVATION.md, "Bounds"): the workspaces the profile did not measure none with the
    smallest CUDA context on record, and the heaviest workspaces on record with the largest
    context; None where the profile measured every term. The OOM path is not monotone in the
    workspaces (a failed workspace releases cached segments), so all three are taken. `point`: the
    call's estimate under the same budget, where the caller has it already."""
    kw = dict(prompt=prompt, prompt_length=prompt_length, vram=vram, limit=limit, architecture=architecture)
    point = point or estimate(height, width, **kw, **options)
    if all(lo == hi for lo, hi in point.bounds.values()):
        return None
    profile = gpu_profiles.get(Options(**options).gpu)
    lo_ctx, hi_ctx = _context_range(profile)
    seen = {point.boundary.verdict}
    for end, rules, context in (("best case", kernels.NO_CONV_WORKSPACE, lo_ctx),
                                ("worst case", kernels.HEAVIEST_CONV_RULE_SET, hi_ctx)):
        variant = profile.with_(name=f"{profile.name} ({end})", cuda_context=context, conv_workspace_rules=(),
                                conv_workspace_rule=rules, conv_workspace_rule_nhwc=rules,
                                total_memory=max(profile.total_memory, vram))
        seen.add(estimate(height, width, **kw, **{**options, "gpu": variant}).boundary.verdict)
    ordered = sorted(seen, key=VERDICTS.index)
    return ordered[0], ordered[-1]


def _bounds(s: act.Shape, o: Options, profile, ws, allocated: int, reserved: int,
            vram: int | None = None) -> dict[str, list[int]]:
    """[lo, hi] of each quantity (DERIVATION.md, "Bounds"). Where the profile measured every
    convolution workspace of the call and the CUDA context on its GPU, lo == hi == the point.
    Otherwise lo is the call without the workspaces it did not measure and with the smallest
    CUDA context on record, hi the call with the heaviest workspace rule set on record and the
    largest context, each widened by ACCURACY."""
    benchmark = o.cudnn_benchmark      # the search's workspace: anything the free memory allows
    # unprobed NHWC engines' workspaces: derived, taken as none (kernels.py section 4b)
    nhwc = o.channels_last and not ws
    derived = benchmark or nhwc or "rule" in ws.used or "native" in ws.used   # native columns: derived, not measured
    if not derived and profile.cuda_context_measured:
        return {"peak_allocated_bytes": [allocated] * 2, "peak_reserved_bytes": [reserved] * 2,
                "peak_device_bytes": [reserved + profile.cuda_context] * 2}
    span = {"allocated": [allocated, allocated], "reserved": [reserved, reserved]}
    if "rule" in ws.used or benchmark or nhwc:
        floor = kernels.no_conv_workspace(o) if benchmark else kernels.conv_kernels(o, profile, floor=True)
        for variant in (floor, kernels.conv_kernels(o, profile, heaviest=True)):
            c = _call(s, o, profile, variant)
            for key, v in (("allocated", c.stages[c.peak_stage].allocated), ("reserved", c.peak_reserved)):
                span[key] = [min(span[key][0], v), max(span[key][1], v)]
    for key, band in ACCURACY.items():
        span[key] = [int(span[key][0] * (1 - band)), -int(-span[key][1] * (1 + band) // 1)]
    lo_ctx, hi_ctx = _context_range(profile)
    if benchmark:      # get_plans_from_find may take every byte free at the search: the whole card
        card = vram or profile.total_memory
        for key in span:
            span[key][1] = max(span[key][1], card - lo_ctx)
        # and it empties the allocator's cache after each search: reserved can fall to allocated
        span["reserved"][0] = min(span["reserved"][0], span["allocated"][0])
        return {"peak_allocated_bytes": span["allocated"], "peak_reserved_bytes": span["reserved"],
                "peak_device_bytes": [span["reserved"][0] + lo_ctx, max(span["reserved"][1], card)]}
    return {"peak_allocated_bytes": span["allocated"], "peak_reserved_bytes": span["reserved"],
            "peak_device_bytes": [span["reserved"][0] + lo_ctx, span["reserved"][1] + hi_ctx]}


# Options that lower the peak, cheapest first: no cost, then a slower or approximate call.
REMEDIES = (
    ("expandable_segments", True, "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"),
    ("safety_checker", False, "safety_checker=None"),
    ("vae_slicing", True, "pipe.enable_vae_slicing()"),
    ("vae_tiling", True, "pipe.enable_vae_tiling()"),
    ("attention_slicing", "auto", "pipe.enable_attention_slicing()"),
)


def suggestions(height, width, vram, prompt=None, prompt_length=None, limit="card", **options) -> list[tuple[str, Estimate]]:
    """The remedies (REMEDIES) that make the call fit `vram` at full speed, each alone, with
    its estimate; a remedy already in effect, or that changes nothing, is left out."""
    base = Options(**options)
    out = []
    for field, value, how in REMEDIES:
        if field == "expandable_segments":
            if base.allocator.expandable_segments:
                continue
            # appended, so it wins over an earlier expandable_segments:False, as in PyTorch
            change = {"alloc_conf": ",".join(filter(None, (base.alloc_conf, "expandable_segments:True"))),
                      "expandable_segments": False}
        elif getattr(base, field) == value or (field == "vae_slicing" and base.num_images_per_prompt == 1):
            continue
        else:
            change = {field: value}
        est = estimate(height, width, prompt, prompt_length, vram=vram, limit=limit, **{**options, **change})
        if est.boundary.verdict == "fits":
            out.append((how, est))
    return out


def f(h, w, prompt_length=77, **kwargs) -> dict:
    """The seed notebook's signature: f(h, w, prompt_length) -> {"bytes", "GB", "breakdown"}.

    Takes height and width in pixels like the notebook; the prompt length changes nothing
    (the pipeline pads every prompt to 77 tokens) and is accepted for compatibility."""
    est = estimate(h, w, prompt_length=prompt_length, **kwargs)
    return {"bytes": est.peak_allocated, "GB": est.peak_allocated / GB, "breakdown": dict(est.breakdown)}
