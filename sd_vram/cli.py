"""The ``sd-vram`` command line: estimate, max-size, simulate, compare.

    sd-vram estimate 640x427 --prompt "a hot air balloon"      # WIDTHxHEIGHT
    sd-vram estimate photo.jpg --json                          # size read from the file's header
    sd-vram estimate balloon --compare                         # a seed case, beside the baselines
    sd-vram max-size --vram 8GiB --aspect 3:2
    sd-vram simulate 640x427 --timeline timeline.png           # needs sd-vram[sim]
    sd-vram compare results/

The estimate path imports neither torch nor diffusers: it answers in milliseconds.
Every bad input ends in one line on stderr (``sd-vram: error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import fields
from pathlib import Path

from sd_vram.formula import InputError, Options

PROG = "sd-vram"
MAX_PROMPT_TOKENS = 75  # CLIP's 77 positions less BOS and EOS

# The four seed cases (width x height as image tools write it). Their prompts live in
# cases/catalogue.toml; without it the CLI knows only the sizes and the seed prompts' CLIP
# token counts (tests/test_tokenizer.py checks them), which is all the memory depends on.
SEED_CASES = {
    "balloon": {"width": 640, "height": 427, "prompt_length": 53},
    "groceries": {"width": 800, "height": 533, "prompt_length": 64},
    "bench": {"width": 3840, "height": 2560, "prompt_length": 62},
    "truck": {"width": 4032, "height": 3024, "prompt_length": 41},
}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".avif"}
_OPTION_FIELDS = {f.name for f in fields(Options)}
_DEFAULTS = Options()


class CliError(Exception):
    """A one-line error for the user; ``status`` is the exit code."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line instead of usage + message."""

    def error(self, message):  # noqa: D401 - argparse API
        raise CliError(message.replace("\n", " "), 2)


# --------------------------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
_SIZE_LIKE_RE = re.compile(r"^[\s\d.+\-eE]*[xX*×][\s\d.+\-eE]*$|^[\s\d.+\-]+$")


def parse_size(text: str) -> tuple[int, int]:
    """'640x427' -> (640, 427) as (width, height); InputError for anything else."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InputError(f"malformed size {text!r}: expected WIDTHxHEIGHT with whole numbers, e.g. 640x427")
    width, height = int(m.group(1)), int(m.group(2))
    for name, v in (("width", width), ("height", height)):
        if v < 8:
            raise InputError(f"{name} {v} is too small: an image needs at least 8 px a side (latents are 1/8 of it)")
    return width, height


_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}
_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_budget(text: str) -> int:
    """'8GiB', '8 GiB', '8192MiB', '8G', '7.5GB' or plain bytes -> bytes (binary units:
    G, GB and GiB all mean 2**30, as GPU vendors' '8 GB' cards hold 8 GiB)."""
    m = _BUDGET_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"malformed memory budget {text!r}: expected e.g. 8GiB, 8192MiB, 8G or a number of bytes")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise InputError(f"the memory budget must be positive, got {text!r}")
    return int(value)


def parse_aspect(text: str) -> tuple[int, int]:
    """'3:2' -> (3, 2); both sides positive whole numbers."""
    m = re.match(r"^\s*(\d+)\s*[:/xX]\s*(\d+)\s*$", text)
    if not m:
        raise InputError(f"malformed aspect {text!r}: expected W:H with whole numbers, e.g. 3:2")
    w, h = int(m.group(1)), int(m.group(2))
    if w == 0 or h == 0:
        raise InputError(f"aspect {text!r} has a zero side: both W and H must be positive")
    return w, h


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"a prompt length cannot be negative, got {v}")
    return v


def _slicing(text: str):
    if text in ("auto", "max"):
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, max or a positive slice size, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"the slice size must be positive, got {v}")
    return v


def _catalogue_path() -> Path | None:
    for folder in (Path.cwd(), Path(__file__).resolve().parent.parent):  # working folder, then the checkout
        path = folder / "cases" / "catalogue.toml"
        if path.is_file():
            return path
    return None


def _load_catalogue() -> dict[str, dict]:
    """Cases of cases/catalogue.toml by name ({} when it is absent or unreadable)."""
    path = _catalogue_path()
    if path is None:
        return {}
    try:
        import tomllib
    except ImportError:  # Python 3.10: the built-in table is enough
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    found: dict[str, dict] = {}
    defaults = data.get("defaults") if isinstance(data.get("defaults"), dict) else {}

    def walk(node):  # any table with a name, width and height is a case
        if isinstance(node, dict):
            if {"name", "width", "height"} <= node.keys():
                case = {**node, "_images": path.parent / "images"}
                if "prompt" not in case and defaults.get("prompt"):  # the catalogue's default prompt
                    case["prompt"] = defaults["prompt"]
                found[str(node["name"]).lower()] = case
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(data)
    return found


def _catalogue_case(name: str, catalogue: dict[str, dict]) -> dict | None:
    """A case by its catalogue name, or a seed by its short name (balloon -> balloon-640x427)."""
    if name in catalogue:
        return catalogue[name]
    if name in SEED_CASES:
        seed = SEED_CASES[name]
        full = f"{name}-{seed['width']}x{seed['height']}"
        if full in catalogue:
            return catalogue[full]
        starts = [c for n, c in catalogue.items() if n.startswith(name + "-")]
        if len(starts) == 1:
            return starts[0]
    return None


def resolve_input(text: str) -> dict:
    """WIDTHxHEIGHT, an image file or a case name -> {width, height, source, prompt?, options?}."""
    if _SIZE_RE.match(text):
        width, height = parse_size(text)
        return {"width": width, "height": height, "source": text}
    if text and os.path.exists(text):
        from sd_vram.imagesize import image_size

        width, height = image_size(text)
        if width < 8 or height < 8:
            raise InputError(f"{text} is {width}x{height}: an image needs at least 8 px a side")
        return {"width": width, "height": height, "source": f"{text} ({width}x{height})"}
    name = text.strip().lower()
    catalogue = _load_catalogue()
    case = _catalogue_case(name, catalogue)
    if case is not None:
        width, height, source = int(case["width"]), int(case["height"]), f"case {case['name']}"
        image = case.get("image") and case["_images"] / str(case["image"])
        if image and image.is_file():  # the suite uses the real image when it is there: its size wins
            from sd_vram.imagesize import image_size

            width, height = image_size(str(image))
            source += f" ({image.name})"
        out = {"width": width, "height": height, "source": f"{source}, {width}x{height}"}
        if case.get("prompt"):
            out["prompt"] = str(case["prompt"])
        opts = case.get("options")
        out["options"] = {k: v for k, v in opts.items() if k in _OPTION_FIELDS} if isinstance(opts, dict) else {}
        return out
    if name in SEED_CASES:
        return {**SEED_CASES[name], "source": f"seed case {name}"}
    if _SIZE_LIKE_RE.match(text) or re.search(r"\d\s*[xX*×]|[xX*×]\s*\d", text):
        parse_size(text)  # raises with the malformed-size message
    if "/" in text or os.sep in text or Path(text).suffix.lower() in _IMAGE_SUFFIXES:
        raise InputError(f"no such image file: {text}")
    more = f", or a case of {_catalogue_path()}" if catalogue else ""
    raise InputError(f"{text!r} is not WIDTHxHEIGHT (e.g. 640x427), an existing image file, "
                     f"a seed case ({', '.join(SEED_CASES)}){more}")


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    """Binary units with the unit: 1.23 GiB, 456.7 MiB, 12.0 KiB, 512 B."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= 1 << 30:
        return f"{sign}{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{sign}{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{sign}{n / (1 << 10):.1f} KiB"
    return f"{sign}{int(n)} B"


def _exact(n: int) -> str:
    """Binary units and the exact byte count, for comparisons near a budget."""
    return f"{fmt_bytes(n)} ({n:,} B)"


def _table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


_LABELS = {
    "weights_unet": "UNet weights", "weights_vae": "VAE weights", "weights_text_encoder": "text encoder weights",
    "weights_safety_checker": "safety checker weights", "cublas_workspace": "cuBLAS workspace",
    "cudnn_workspace": "cuDNN workspace", "state": "state between stages (latents, embeddings, noise)",
}


def _label(key: str) -> str:
    return _LABELS.get(key, key.replace("_", " "))


def _options_line(o: Options) -> str:
    cfg = f"CFG on, UNet batch {o.unet_batch}" if o.cfg else "CFG off"
    parts = [f"guidance {o.guidance_scale:g} ({cfg})", f"{o.num_images_per_prompt} image(s)",
             f"strength {o.strength:g}", f"{o.num_inference_steps} steps", f"attention {o.attention}"]
    if o.attention_slicing is not None:
        parts.append(f"attention slicing {o.attention_slicing}")
    if o.vae_slicing:
        parts.append("VAE slicing")
    if o.vae_tiling:
        parts.append("VAE tiling")
    parts.append("safety checker" if o.safety_checker else "no safety checker")
    parts.append(f"output {o.output_type}")
    return ", ".join(parts)


def format_estimate(est, source: str, options: Options) -> str:
    out = [f"sd-vram estimate: {source}"]
    size = f"{est.width}x{est.height}"
    out.append(f"image on the GPU: {size} (width x height, each side rounded down to a multiple of 8)")
    if est.prompt_tokens is not None:
        out.append(f"prompt: {est.prompt_tokens} CLIP tokens ({min(est.prompt_tokens, MAX_PROMPT_TOKENS) + 2} of 77 positions with BOS/EOS)")
    out.append(f"options: {_options_line(options)}")
    out.append(f"GPU profile: {est.gpu_profile} (convolution workspaces: {est.conv_workspace})")
    out.append("")
    rows = []
    for name, s in est.stages.items():
        mark = "<- peak" if name == est.peak_stage else ""
        rows.append([name, fmt_bytes(s.allocated), fmt_bytes(s.reserved), s.operation or "", mark])
    out.append(_table(rows, ["stage", "allocated peak", "reserved peak", "operation at the peak", ""], right={1, 2}))
    out.append("")
    out.append(f"breakdown at the peak ({est.peak_stage}):")
    alloc, res, dev = est.peak_allocated, est.peak_reserved, est.peak_device
    b = dict(est.breakdown)
    overhead = b.pop("allocator_overhead", res - alloc)
    context = b.pop("cuda_context", dev - res)
    rows = [[_label(k), fmt_bytes(v)] for k, v in b.items()]
    rows.append(["= peak allocated (torch.cuda.max_memory_allocated)", fmt_bytes(alloc)])
    rows.append(["allocator overhead (reserved - allocated)", fmt_bytes(overhead)])
    rows.append(["= peak reserved (torch.cuda.max_memory_reserved)", fmt_bytes(res)])
    rows.append(["CUDA context and libraries (device - reserved)", fmt_bytes(context)])
    rows.append(["= peak device (nvidia-smi / NVML)", fmt_bytes(dev)])
    out.append(_table(rows, ["component", "bytes"], right={1}))
    out.extend(format_bounds(est))
    return "\n".join(out)


def format_bounds(est) -> list[str]:
    """The range where not every term was measured on this GPU (DERIVATION.md, "Bounds")."""
    b = est.bounds
    if not b or all(lo == hi for lo, hi in b.values()):
        return [f"every term measured for this call on {est.gpu_profile}'s GPU: the figures are exact"]
    out = ["", f"not every term was measured on this GPU (profile {est.gpu_profile}, conv workspaces: "
               f"{est.conv_workspace}); the peak lies"]
    for key, label in (("peak_allocated_bytes", "allocated"), ("peak_reserved_bytes", "reserved"),
                       ("peak_device_bytes", "device")):
        lo, hi = b[key]
        out.append(f"  {label:<9} between {fmt_bytes(lo)} and {fmt_bytes(hi)}")
    out.append("for the exact figure on your GPU run `sd-vram probe` (needs sd-vram[gpu]), then pass "
               "--gpu-profile NAME")
    return out


def _truncation_warning(est) -> str | None:
    if est.prompt_tokens is not None and (est.truncated or est.prompt_tokens > MAX_PROMPT_TOKENS):
        return (f"{PROG}: warning: the prompt has {est.prompt_tokens} CLIP tokens; the pipeline keeps the first "
                f"{MAX_PROMPT_TOKENS} ({MAX_PROMPT_TOKENS + 2} with BOS/EOS) and drops the rest")
    return None


def _baseline_prompt_length(est, prompt_length) -> int:
    """Tokens with BOS/EOS as the text encoder sees them (77 when the prompt is unknown)."""
    tokens = est.prompt_tokens if est.prompt_tokens is not None else prompt_length
    return 77 if tokens is None else min(tokens, MAX_PROMPT_TOKENS) + 2


def compare_rows(est, options: Options, prompt_length) -> list[dict]:
    from sd_vram.formula import baselines

    rows = [
        {"name": "sd-vram device", "bytes": est.peak_device,
         "counts": "every stage's live tensors, workspaces, allocator, CUDA context (NVML)"},
        {"name": "sd-vram reserved", "bytes": est.peak_reserved,
         "counts": "the same without the CUDA context (torch max_memory_reserved)"},
        {"name": "sd-vram allocated", "bytes": est.peak_allocated,
         "counts": "live tensors only (torch max_memory_allocated)"},
    ]
    pl = _baseline_prompt_length(est, prompt_length)
    for b in baselines.BASELINES:
        rows.append({"name": b.name, "bytes": b.fn(est.height, est.width, pl, options), "counts": b.counts})
    return rows


def format_compare(rows: list[dict], reference: int) -> str:
    table = [[r["name"], fmt_bytes(r["bytes"]), f"{(r['bytes'] - reference) / reference:+.1%}", r["counts"]] for r in rows]
    return _table(table, ["estimator", "predicted peak", "vs device", "what it counts"], right={1, 2})


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

def _option_kwargs(args) -> dict:
    """The Options fields given on the command line (the rest keep Options' defaults)."""
    kw = {}
    for name in ("guidance_scale", "num_images_per_prompt", "strength", "attention",
                 "attention_slicing", "output_type"):
        v = getattr(args, name, None)
        if v is not None:
            kw[name] = v
    if getattr(args, "steps", None) is not None:
        kw["num_inference_steps"] = args.steps
    if getattr(args, "vae_slicing", False):
        kw["vae_slicing"] = True
    if getattr(args, "vae_tiling", False):
        kw["vae_tiling"] = True
    if getattr(args, "no_safety_checker", False):
        kw["safety_checker"] = False
    if getattr(args, "expandable_segments", False):
        kw["expandable_segments"] = True
    if getattr(args, "gpu_profile", None) is not None:
        kw["gpu"] = args.gpu_profile
    return kw


def _prompt_kwargs(args, case: dict) -> dict:
    if args.prompt is not None:
        return {"prompt": args.prompt}
    if args.prompt_length is not None:
        return {"prompt_length": args.prompt_length}
    if "prompt" in case:
        return {"prompt": case["prompt"]}
    if "prompt_length" in case:
        return {"prompt_length": case["prompt_length"]}
    return {}


def cmd_estimate(args) -> int:
    from sd_vram.formula import equation  # the module attribute, so tests can substitute estimate

    case = resolve_input(args.image)
    opts = {**case.get("options", {}), **_option_kwargs(args)}
    options = Options(**opts)  # validates before the equation runs
    prompt = _prompt_kwargs(args, case)
    est = equation.estimate(case["height"], case["width"], **prompt, **opts)
    warning = _truncation_warning(est)
    if warning:
        print(warning, file=sys.stderr)
    if args.json:
        import json

        d = est.to_dict()
        if args.compare:
            d["compare"] = {r["name"]: r["bytes"] for r in compare_rows(est, options, prompt.get("prompt_length"))}
        print(json.dumps(d, indent=2))
        return 0
    print(format_estimate(est, case["source"], options))
    if args.compare:
        print()
        print(f"estimators for the same input ({est.width}x{est.height}):")
        print(format_compare(compare_rows(est, options, prompt.get("prompt_length")), est.peak_device))
    return 0


def cmd_probe(args) -> int:
    from sd_vram.plugin import probe  # the command's logic; torch is imported only there

    return probe.run(args, resolve_input)


def cmd_max_size(args) -> int:
    from sd_vram.formula import equation
    from sd_vram.formula.maxsize import max_size, width_for

    budget = parse_budget(args.vram)
    aspect = parse_aspect(args.aspect)
    opts = _option_kwargs(args)
    Options(**opts)
    width, height = max_size(budget, aspect=aspect, quantity=args.quantity, **opts)
    attr = {"allocated": "peak_allocated", "reserved": "peak_reserved", "device": "peak_device"}[args.quantity]
    peak = getattr(equation.estimate(height, width, **opts), attr)
    nh = height + 8
    nw = width_for(nh, aspect)
    next_peak = getattr(equation.estimate(nh, nw, **opts), attr)
    if args.json:
        import json

        print(json.dumps({"width": width, "height": height, "aspect": list(aspect), "quantity": args.quantity,
                          "budget_bytes": budget, "peak_bytes": peak,
                          "next": {"width": nw, "height": nh, "peak_bytes": next_peak}}, indent=2))
        return 0
    print(f"{width}x{height}")
    print(f"the largest {aspect[0]}:{aspect[1]} image (sides multiples of 8) whose predicted peak {args.quantity} memory "
          f"fits {_exact(budget)}:")
    print(f"  {width}x{height} needs {_exact(peak)}")
    print(f"  the next step, {nw}x{nh}, needs {_exact(next_peak)}")
    return 0


def cmd_simulate(args) -> int:
    case = resolve_input(args.image)
    opts = {**case.get("options", {}), **_option_kwargs(args)}
    Options(**opts)
    prompt = _prompt_kwargs(args, case)
    try:
        from sd_vram.simulation import simulate
    except ImportError as e:
        missing = getattr(e, "name", None) or ""
        if missing.split(".")[0] in ("torch", "diffusers", "transformers", "accelerate"):
            raise CliError(f"the simulation needs torch and diffusers ({missing} is missing): pip install 'sd-vram[sim]'", 1)
        raise CliError(f"the simulation is not available in this install ({e})", 1)
    result = simulate(case["height"], case["width"], **prompt, **opts)
    d = result.to_dict()
    if args.timeline:
        result.plot_timeline(args.timeline)
    if args.json:
        import json

        print(json.dumps(d, indent=2, default=str))
        return 0
    print(f"sd-vram simulate: {case['source']}")
    rows = [[_label(k), fmt_bytes(v) if k.endswith("_bytes") and isinstance(v, (int, float)) else str(v)]
            for k, v in d.items() if not isinstance(v, (dict, list))]
    print(_table(rows, ["quantity", "value"], right={1}))
    if args.timeline:
        print(f"timeline written to {args.timeline}")
    return 0


def cmd_compare(args) -> int:
    try:
        from sd_vram.plugin import compare as compare_mod
    except ImportError as e:
        raise CliError(f"comparing archived results is not available in this install ({e})", 1)
    for p in args.paths:
        if not os.path.exists(p):
            raise InputError(f"no such results folder or file: {p}")
    if hasattr(compare_mod, "main"):
        argv = list(args.paths) + (["--png", args.png] if args.png else []) + (
            ["--gpu-profile", args.gpu_profile] if args.gpu_profile else [])
        return int(compare_mod.main(argv) or 0)
    if hasattr(compare_mod, "compare"):
        out = compare_mod.compare(args.paths, png=args.png)
        if out is not None:
            print(out)
        return 0
    raise CliError("sd_vram.plugin.compare offers neither main() nor compare()", 1)


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------

def _add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline options (defaults are diffusers')")
    g.add_argument("--guidance-scale", type=float, metavar="X",
                   help=f"classifier-free guidance scale; > 1 doubles the UNet batch (default {_DEFAULTS.guidance_scale:g})")
    g.add_argument("--num-images-per-prompt", type=int, metavar="N",
                   help=f"images per prompt (default {_DEFAULTS.num_images_per_prompt})")
    g.add_argument("--strength", type=float, metavar="S", help=f"img2img strength in [0, 1] (default {_DEFAULTS.strength:g})")
    g.add_argument("--steps", type=int, metavar="N",
                   help=f"num_inference_steps (default {_DEFAULTS.num_inference_steps})")
    g.add_argument("--attention", choices=["auto", "cudnn", "flash", "efficient", "math"],
                   help="SDPA backend: auto picks as PyTorch does on the GPU (default auto)")
    g.add_argument("--attention-slicing", type=_slicing, metavar="{auto,max,N}",
                   help="pipe.enable_attention_slicing(...) (default off)")
    g.add_argument("--vae-slicing", action="store_true", help="pipe.enable_vae_slicing()")
    g.add_argument("--vae-tiling", action="store_true", help="pipe.enable_vae_tiling()")
    g.add_argument("--no-safety-checker", action="store_true", help="load the pipeline with safety_checker=None")
    g.add_argument("--output-type", choices=["pil", "np", "pt", "latent"],
                   help="latent skips the VAE decode and the safety checker (default pil)")
    g.add_argument("--expandable-segments", action="store_true",
                   help="the process runs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    g.add_argument("--gpu-profile", metavar="NAME|FILE",
                   help="GPU profile for workspaces and the CUDA context: a name (probed profiles first, "
                        "then bundled) or a profile file (default: default)")


def _add_prompt(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", metavar="TEXT", help="the prompt (counted with the exact CLIP tokenizer)")
    g.add_argument("--prompt-length", type=_non_negative_int, metavar="N", help="the prompt's CLIP token count instead")


def build_parser() -> argparse.ArgumentParser:
    seeds = ", ".join(SEED_CASES)
    parser = _Parser(prog=PROG, description="Peak GPU memory of Stable Diffusion v1.5 img2img (diffusers, FP16).")
    parser.add_argument("--version", action="version", version=f"{PROG} " + _version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    image_help = (f"WIDTHxHEIGHT (640x427 is 640 wide), an image file, a seed case ({seeds}) "
                  "or a case name of cases/catalogue.toml")
    p = sub.add_parser("estimate", help="predict the peak memory of one call (no GPU, no torch)",
                       description="Predict the peak GPU memory of one img2img call with the closed-form equation.")
    p.add_argument("image", metavar="IMAGE", help=image_help)
    _add_prompt(p)
    _add_options(p)
    p.add_argument("--json", action="store_true", help="print the estimate as one JSON object")
    p.add_argument("--compare", action="store_true", help="also show the baseline estimators for the same input")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("max-size", help="largest image that fits a memory budget",
                       description="Largest image (sides multiples of 8) whose predicted peak fits the budget.")
    p.add_argument("--vram", required=True, metavar="BUDGET", help="budget: 8GiB, 8 GiB, 8192MiB, 8G (= GiB) or bytes")
    p.add_argument("--aspect", default="1:1", metavar="W:H", help="aspect ratio, width:height (default 1:1)")
    p.add_argument("--quantity", choices=["allocated", "reserved", "device"], default="device",
                   help="which peak must fit: torch allocated, torch reserved, or the device as NVML sees it (default device)")
    _add_options(p)
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=cmd_max_size)

    p = sub.add_parser("simulate", help="run the pipeline on fake CUDA tensors (needs sd-vram[sim])",
                       description="Replay the real diffusers pipeline on fake CUDA tensors through a model of the caching allocator.")
    p.add_argument("image", metavar="IMAGE", help=image_help)
    _add_prompt(p)
    _add_options(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--timeline", metavar="FILE.png", help="write the memory timeline plot to this file")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("compare", help="compare archived GPU results across GPUs",
                       description="Compare archived GPU suite results (results/<gpu-model>/).")
    p.add_argument("paths", nargs="+", metavar="RESULTS", help="results folders or files")
    p.add_argument("--png", metavar="FILE", help="also write a plot to this file")
    p.add_argument("--gpu-profile", metavar="NAME|FILE",
                   help="predict with this GPU profile (a name or a file) instead of the archived predictions")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("probe", help="measure this GPU's workspaces and context into a profile (needs sd-vram[gpu])",
                       description="Measure on this GPU and stack the CUDA context, the cuBLAS workspaces, every "
                                   "convolution's cuDNN workspace and the SDPA backends of the call, with random "
                                   "weights, and save them as a GPU profile.")
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="sizes to measure at: WIDTHxHEIGHT or image files (default: the four seed images "
                        "and a ladder of squares up to what fits this GPU)")
    p.add_argument("--out", metavar="FILE", help="write the profile here (default: the user profile folder)")
    p.add_argument("--name", metavar="NAME", help="the profile's name (default: the GPU and a stack digest)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--backend", choices=["cuda", "fake"], default="cuda", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_probe)
    return parser


def _version() -> str:
    from sd_vram import __version__

    return __version__


def main(argv=None) -> int:
    """Entry point of the ``sd-vram`` console script; returns the exit status."""
    parser = build_parser()
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        for a in argv:
            if re.match(r"^-\d", a) and not re.match(r"^-\d+(\.\d*)?$", a):
                raise InputError(f"{a!r} is negative: sizes and memory budgets must be positive")
        args = parser.parse_args(argv)
        return args.func(args)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.status
    except InputError as e:
        print(f"{PROG}: error: {str(e).splitlines()[0] if str(e) else 'bad input'}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # piped into head
        return 0
    except Exception as e:  # never a traceback for the user; SD_VRAM_DEBUG=1 shows it
        if os.environ.get("SD_VRAM_DEBUG"):
            raise
        msg = " ".join(str(e).split())
        what = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
        print(f"{PROG}: error: {what} (set SD_VRAM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
