"""The text the ``sd-vram`` commands print: byte counts, tables, an estimate, a verdict under a
budget, the bounds, the estimators side by side, a max-size answer and a simulation's summary.

Imports only sd_vram.formula (Options, the tokenizer's limit and, lazily, the equation's
remedies); the commands in cli.py compute, this module words the result.
"""

from __future__ import annotations

from sd_vram.formula import Options
from sd_vram.formula.tokenizer import MAX_PROMPT_TOKENS


def fmt_bytes(n: float) -> str:
    """Binary units with the unit: 1.23 GiB, 456.7 MiB, 12.0 KiB, 512 B."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= 1 << 40:
        return f"{sign}{n / (1 << 40):,.2f} TiB"
    if n >= 1 << 30:
        return f"{sign}{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{sign}{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{sign}{n / (1 << 10):.1f} KiB"
    return f"{sign}{int(n)} B"


def exact(n: int) -> str:
    """Binary units and the exact byte count, for comparisons near a budget."""
    return f"{fmt_bytes(n)} ({n:,} B)"


def table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


LABELS = {
    "weights_unet": "UNet weights", "weights_vae": "VAE weights", "weights_text_encoder": "text encoder weights",
    "weights_safety_checker": "safety checker weights", "cublas_workspace": "cuBLAS workspace",
    "lora_weights": "LoRA adapter weights",
    "cudnn_workspace": "cuDNN workspace", "state": "state between stages (latents, embeddings, noise)",
}


def label(key: str) -> str:
    return LABELS.get(key, key.replace("_", " "))


def options_line(o: Options) -> str:
    cfg = f"CFG on, UNet batch {o.unet_batch}" if o.cfg else "CFG off"
    strength = [] if o.strength is None else [f"strength {o.strength:g}"]   # txt2img has none
    parts = [f"guidance {o.guidance_scale:g} ({cfg})", f"{o.num_images_per_prompt} image(s)",
             *strength, plural(o.num_inference_steps, "step"), f"attention {o.attention}"]
    if o.pipeline != "img2img":
        parts.insert(0, f"pipeline {o.pipeline}" + (f" ({o.inpaint_unet} UNet)" if o.pipeline == "inpaint" else ""))
        if o.padding_mask_crop is not None:
            parts.append(f"padding_mask_crop {o.padding_mask_crop}")
    if o.attention_slicing is not None:
        parts.append(f"attention slicing {o.attention_slicing}")
    if o.vae_slicing:
        parts.append("VAE slicing")
    if o.vae_tiling:
        parts.append("VAE tiling")
    parts.append("safety checker" if o.safety_checker else "no safety checker")
    parts.append(f"output {o.output_type}")
    if o.scheduler != Options().scheduler:
        parts.append(f"scheduler {o.scheduler} ({plural(o.unet_evaluations, 'UNet evaluation')})")
    if o.adapters:
        parts.append(f"LoRA {o.adapters.source}" + (" (fused)" if o.lora_fused else ""))
    if o.alloc_conf_text:
        parts.append("PYTORCH_CUDA_ALLOC_CONF=" + o.alloc_conf_text)
    if o.dtype != "fp16":
        parts.append(f"dtype {o.dtype}")
    if o.channels_last:
        parts.append("UNet and VAE channels_last")
    parts += [name for name, on in (("cuDNN off", not o.cudnn), ("cudnn.benchmark", o.cudnn_benchmark),
                                    ("cudnn.deterministic", o.cudnn_deterministic)) if on]
    return ", ".join(parts)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def headline(est, source: str, options: Options) -> str:
    """The answer in one line: the device peak (a range where not every term is measured)."""
    lo, hi = est.bounds["peak_device_bytes"] if est.bounds else (est.peak_device,) * 2
    spread = "" if lo == hi else f", between {fmt_bytes(lo)} and {_card_top(est) or fmt_bytes(hi)} (not all measured)"
    size = f"{est.width}x{est.height}"
    what = {"img2img": source, "txt2img": f"txt2img at {size}", "inpaint": f"inpaint of {source} at {size}"}
    return (f"sd-vram estimate: {what[options.pipeline]} needs {fmt_bytes(est.peak_device)} of GPU memory "
            f"(nvidia-smi){spread}; {fmt_bytes(est.peak_allocated)} allocated by PyTorch at the peak, in {est.peak_stage}")


def _card_top(est) -> str | None:
    """A range that runs to the whole card (cudnn.benchmark) on the default profile, which is no
    card in particular: said in words, not as that profile's memory."""
    if est.runtime_note and est.gpu_profile == "default" and est.boundary is None:
        return "the card's memory (give --vram)"
    return None


def format_estimate(est, source: str, options: Options) -> str:
    out = [headline(est, source, options)]
    size = f"{est.width}x{est.height}"
    if options.pipeline == "img2img":
        out.append(f"image on the GPU: {size} (width x height, each side rounded down to a multiple of 8)")
    else:   # txt2img and inpaint run at pipe(height=, width=), default 512x512
        out.append(f"{options.pipeline} at {size} (width x height: pipe(height=, width=), default 512x512)")
    if est.prompt_tokens is not None:
        out.append(f"prompt: {est.prompt_tokens} CLIP tokens ({min(est.prompt_tokens, MAX_PROMPT_TOKENS) + 2} of 77 positions with BOS/EOS)")
    out.append(f"options: {options_line(options)}")
    if est.derived_settings:
        out.append(f"derived from the sources, not yet measured on a GPU: {', '.join(est.derived_settings)}")
    out.append(f"GPU profile: {est.gpu_profile} (convolution workspaces: {est.conv_workspace})")
    out.append("")
    rows = []
    for name, s in est.stages.items():
        mark = "<- peak" if name == est.peak_stage else ""
        rows.append([name, fmt_bytes(s.allocated), fmt_bytes(s.reserved), s.operation or "", mark])
    out.append(table(rows, ["stage", "allocated peak", "reserved peak", "operation at the peak", "call peak"],
                      right={1, 2}))
    out.append("")
    out.append(f"breakdown at the peak ({est.peak_stage}):")
    alloc, res, dev = est.peak_allocated, est.peak_reserved, est.peak_device
    b = dict(est.breakdown)
    overhead = b.pop("allocator_overhead", res - alloc)
    context = b.pop("cuda_context", dev - res)
    rows = [[label(k), fmt_bytes(v)] for k, v in b.items()]
    rows.append(["= peak allocated (torch.cuda.max_memory_allocated)", fmt_bytes(alloc)])
    rows.append(["allocator overhead (reserved - allocated)", fmt_bytes(overhead)])
    rows.append(["= peak reserved (torch.cuda.max_memory_reserved)", fmt_bytes(res)])
    rows.append(["CUDA context and libraries (device - reserved)", fmt_bytes(context)])
    rows.append(["= peak device (nvidia-smi / NVML)", fmt_bytes(dev)])
    out.append(table(rows, ["component", "bytes"], right={1}))
    out.extend(format_bounds(est))
    return "\n".join(out)


def format_bounds(est) -> list[str]:
    """The range where not every term was measured on this GPU (DERIVATION.md, "Bounds")."""
    b = est.bounds
    note = [f"the peak depends on run-time state: {est.runtime_note}"] if est.runtime_note else []
    if note:
        return ["", *note, *format_range(b, _card_top(est))]
    if est.conv_workspace.startswith("native"):
        return ["cuDNN off: the convolutions' im2col columns are derived from PyTorch's source "
                "(ConvolutionMM2d.cu), not measured on a GPU", *format_range(b)]
    if not b or all(lo == hi for lo, hi in b.values()):
        if est.derived_settings:
            return [f"every hardware term (workspaces, CUDA context) measured for this call on {est.gpu_profile}'s "
                    "GPU; the settings named above are derived from the sources"]
        return [f"every term measured for this call on {est.gpu_profile}'s GPU: the figures are exact"]
    out = ["", f"not every term was measured on this GPU (profile {est.gpu_profile}, conv workspaces: "
               f"{est.conv_workspace}); the peak lies"]
    out.extend(format_range(b))
    out.append(probe_advice(est))
    return out


def probe_advice(est) -> str:
    """What measures the missing terms on the user's GPU, where anything does."""
    o = est.options
    if o.get("dtype", "fp16") != "fp16" or o.get("cudnn_deterministic"):
        return ("no probe measures this call's convolution engines yet (the probe runs fp16 with the default "
                "engines): its workspaces are derived")
    flag = " --channels-last" if o.get("channels_last") else ""
    return f"for the exact figure on your GPU run `sd-vram probe{flag}` (needs sd-vram[gpu]), then pass --gpu-profile NAME"


def format_range(b, top: str | None = None) -> list[str]:
    """One line per quantity: between lo and hi (or `top`, in words)."""
    return [f"  {quantity:<9} between {fmt_bytes(b[key][0])} and {top or fmt_bytes(b[key][1])}"
            for key, quantity in (("peak_allocated_bytes", "allocated"), ("peak_reserved_bytes", "reserved"),
                                  ("peak_device_bytes", "device"))]


def truncation_warning(est) -> str | None:
    """When the prompt is longer than CLIP keeps: what the pipeline drops."""
    if est.prompt_tokens is not None and (est.truncated or est.prompt_tokens > MAX_PROMPT_TOKENS):
        return (f"the prompt has {est.prompt_tokens} CLIP tokens; the pipeline keeps the first "
                f"{MAX_PROMPT_TOKENS} ({MAX_PROMPT_TOKENS + 2} with BOS/EOS) and drops the rest")
    return None


def format_compare(rows: list[dict], reference: int) -> str:
    cells = [[r["name"], fmt_bytes(r["bytes"]), f"{(r['bytes'] - reference) / reference:+.1%}", r["counts"]] for r in rows]
    return table(cells, ["estimator", "predicted peak", "vs device", "what it counts"], right={1, 2})


VERDICT_WORDS = {"fits": "fits", "fits-with-fallback": "fits only with cuDNN fallbacks", "oom": "out of memory"}


def uncertainty(ends: tuple[str, str], gpu) -> str:
    """The range of verdicts (equation.verdict_range) in words."""
    return (f"from {VERDICT_WORDS[ends[0]]} to {VERDICT_WORDS[ends[1]]} over the workspaces and CUDA contexts on "
            f"record (GPU profile {gpu} has not measured them all)")


def format_verdict(est, read_as: str, fixes, ends: tuple[str, str] | None = None) -> str:
    """The answer under a budget, first: fits, fits with fallbacks, or where it runs out; `ends`:
    the mildest and severest verdict over the bounds (equation.verdict_range), said where they differ."""
    from sd_vram.formula.equation import REMEDIES

    b = est.boundary
    of = f"of {fmt_bytes(b.vram)} (read as {read_as})"
    if b.verdict == "fits":
        lines = [f"fits: needs {fmt_bytes(b.peak_device)} {of}"]
        if b.peak_device < est.peak_device:
            lines.append(f"  the caching allocator releases its cached segments to make room (num_alloc_retries "
                         f"{b.retries}), as PyTorch does before it runs out; {fmt_bytes(est.peak_device)} on a "
                         "larger card")
    elif b.verdict == "fits-with-fallback":
        lo, hi = b.allocated_range
        ops = "; ".join(sorted({f"{st}: {op}" for st, op in b.fallbacks}))
        lines = [f"fits only with cuDNN fallbacks (slower) at {ops}",
                 f"  {fmt_bytes(lo)} to {fmt_bytes(hi)} allocated {of}: cuDNN runs those convolutions with a "
                 "smaller or no workspace (which engine is not measured)"]
    else:
        o = b.oom
        lines = [f"out of memory in {o.stage} at {o.operation}: tried to allocate {fmt_bytes(o.requested_bytes)}",
                 f"  {fmt_bytes(o.allocated_bytes)} allocated and {fmt_bytes(o.reserved_bytes)} reserved then, {of}",
                 f"  PyTorch would say: {o.message}"]
    if ends is not None and ends[0] != ends[1]:      # the verdict rests on unmeasured terms
        lines.insert(1, f"  not certain: {uncertainty(ends, est.gpu_profile)}; {probe_advice(est)}")
    if b.verdict != "fits":
        if fixes:
            lines.append("makes it fit at full speed, each alone:")
            lines += [f"  {how}: needs {fmt_bytes(e.boundary.peak_device)}" for how, e in fixes]
        else:
            lines.append("no single option of " + ", ".join(how for _, _, how in REMEDIES) +
                         " makes it fit at full speed")
    if b.verdict != "fits" or b.peak_device < est.peak_device:
        lines.append("  (derived from PyTorch's out-of-memory path and cuDNN's fallback; not yet measured on a GPU)")
    return "\n".join(lines)


def format_max_size(found, aspect: tuple[int, int], quantity: str, budget: int, read_as: str, options: Options,
                    ends: tuple[str, str] | None = None) -> str:
    """The largest image under a budget, the next step that does not fit, and the fallback range;
    `ends`: the verdict range of the answer itself (equation.verdict_range), said where it is not sure."""
    # quantity "device": the call replayed under the budget, cached segments released as PyTorch
    # does before it runs out (maxsize.py); allocated and reserved: the peaks on a larger card
    under = " under this budget (the allocator releasing cached segments as PyTorch does)" if quantity == "device" else ""
    what = "image" if options.pipeline == "img2img" else f"{options.pipeline} call"
    lines = [f"{found.width}x{found.height}",
             f"the largest {aspect[0]}:{aspect[1]} {what} (sides multiples of 8) whose predicted peak {quantity} memory "
             f"fits {fmt_bytes(budget)} ({budget:,} B, read as {read_as}) at full speed (GPU profile {options.gpu}):",
             f"  {found.width}x{found.height} needs {exact(found.peak)}{under}",
             f"  the next step, {found.next_width}x{found.next_height}, does not fit at full speed "
             f"(on a card without a limit its peak is {exact(found.next_peak)})"]
    if found.fallback_height is not None:
        lines.append(f"  up to {found.fallback_width}x{found.fallback_height} fits with cuDNN falling back to smaller "
                     "workspaces (slower; derived, not measured)")
    if ends is not None and ends[0] != ends[1]:
        lines.append(f"  not certain for {found.width}x{found.height}: {uncertainty(ends, options.gpu)}")
    if options.derived_settings:
        lines.append(f"derived from the sources, not yet measured on a GPU: {', '.join(options.derived_settings)}")
    return "\n".join(lines)


def format_simulation(result: dict, source: str) -> str:
    """A simulation's scalar results (result.to_dict()), one row each."""
    rows = [[label(k), fmt_bytes(v) if k.endswith("_bytes") and isinstance(v, (int, float)) else str(v)]
            for k, v in result.items() if not isinstance(v, (dict, list))]
    return "\n".join([f"sd-vram simulate: {source}", table(rows, ["quantity", "value"], right={1})])
