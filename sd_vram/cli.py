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
from pathlib import Path
from typing import NamedTuple

from sd_vram.formula import InputError, Options
from sd_vram.formula.options import VerbatimInputError
from sd_vram.formula.report import SEEDS
from sd_vram.formula.tokenizer import MAX_PROMPT_TOKENS
from sd_vram.option_flags import add_option_flags, as_flags, option_kwargs
from sd_vram.output import (format_compare, format_estimate, format_max_size, format_simulation, format_verdict,
                            truncation_warning)

PROG = "sd-vram"

# The four seed cases (width x height as image tools write it). Their prompts live in
# cases/catalogue.toml; without it the CLI knows only the sizes and the seed prompts' CLIP
# token counts (tests/test_tokenizer.py checks them), which is all the memory depends on.
SEED_CASES = {name: {"width": w, "height": h, "prompt_length": n} for name, w, h, n in SEEDS}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".avif"}


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
_MAX_SIDE_DIGITS = 9  # a side of a billion pixels is past any GPU; int() refuses 4,300 digits
_SIZE_LIKE_RE = re.compile(r"^[\s\d.+\-eE]*[xX*×][\s\d.+\-eE]*$|^[\s\d.+\-]+$")


def parse_size(text: str) -> tuple[int, int]:
    """'640x427' -> (640, 427) as (width, height); InputError for anything else."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InputError(f"malformed size {text!r}: expected WIDTHxHEIGHT with whole numbers, e.g. 640x427")
    for name, digits in (("width", m.group(1)), ("height", m.group(2))):
        if len(digits.lstrip("0")) > _MAX_SIDE_DIGITS:
            raise InputError(f"{name} has {len(digits.lstrip('0'))} digits: more than {_MAX_SIDE_DIGITS} is no image size")
    width, height = int(m.group(1)), int(m.group(2))
    for name, v in (("width", width), ("height", height)):
        if v < 8:
            raise InputError(f"{name} {v} is too small: an image needs at least 8 px a side (latents are 1/8 of it)")
    return width, height


# Binary units (KiB, MiB, GiB, TiB; K, M, G, T as nvidia-smi and `free` mean them) and decimal
# ones (kB, MB, GB, TB: 10^3 steps, as card boxes and disk makers write them).
_UNITS = {"b": (1, "bytes")}
for _i, _p in enumerate("kmgt", start=1):
    _UNITS[_p] = _UNITS[_p + "ib"] = _UNITS[_p + "i"] = (1 << (10 * _i), f"{_p.upper()}iB, 2^{10 * _i} B")
    _UNITS[_p + "b"] = (10 ** (3 * _i), f"{'k' if _p == 'k' else _p.upper()}B, 10^{3 * _i} B")
_BUDGET_RE = re.compile(r"^\s*(\d{1,15}(?:\.\d{0,9})?|\.\d{1,9})\s*([a-zA-Z]*)\s*$")
_MAX_BUDGET = 1 << 50   # 1 PiB: far beyond any GPU


BUDGET_FORMS = "8GiB or 8G (2^30 B), 8GB (10^9 B), 8192MiB, or bytes"
BUDGET_MEANS = ("the total PyTorch sees (torch.cuda.mem_get_info()[1], the 'total capacity' of an out-of-memory "
                "message, often a little below the card's nominal size), less what other programs hold on it "
                "(nvidia-smi)")


def parse_budget(text: str) -> tuple[int, str]:
    """'8GiB', '8 GiB', '8192MiB', '8G' (binary), '8GB' (decimal) or a byte count of at least
    1 MiB -> (bytes, how the unit was read)."""
    if text.strip().startswith("-"):
        raise InputError(f"the memory budget must be positive, got {text!r}")
    m = _BUDGET_RE.match(text)
    unit = m.group(2).lower() if m else ""
    if not m or (unit and unit not in _UNITS):
        raise InputError(f"malformed memory budget {text!r}: expected e.g. 8GiB, 8GB, 8192MiB or a number of bytes")
    if float(m.group(1)) == 0:
        raise InputError(f"the memory budget must be positive, got {text!r}")
    if not unit:
        if float(m.group(1)) < 1 << 20:
            raise InputError(f"memory budget {text!r} has no unit and would be {m.group(1)} bytes: "
                             f"write e.g. {m.group(1)}GiB or {m.group(1)}GB")
        unit = "b"
    scale, read_as = _UNITS[unit]
    value = int(float(m.group(1)) * scale)
    if value < 1:
        raise InputError(f"the memory budget must be positive, got {text!r}")
    if value > _MAX_BUDGET:
        raise InputError(f"a memory budget of {text!r} is beyond any GPU (more than 1 PiB)")
    return value, read_as


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


def _catalogue_path() -> Path | None:
    for folder in (Path.cwd(), Path(__file__).resolve().parent.parent):  # working folder, then the checkout
        path = folder / "cases" / "catalogue.toml"
        if path.is_file():
            return path
    # an installed sd-vram carries the catalogue as sd_vram.cases (pyproject.toml), a folder without __init__.py
    from importlib.util import find_spec

    spec = find_spec("sd_vram.cases")
    for folder in (spec and spec.submodule_search_locations) or ():
        path = Path(folder) / "catalogue.toml"
        if path.is_file():
            return path
    return None


class _NamedCase(NamedTuple):
    """A catalogue case as the CLI runs it."""

    case: object            # plugin.cases.Case
    own_options: dict       # the options the case sets itself
    images_dir: Path


def _load_catalogue() -> dict[str, _NamedCase]:
    """The catalogue's cases by lower-case name ({} without a catalogue); read and validated by
    plugin/cases.py, so a broken catalogue is an error, not an empty one."""
    path = _catalogue_path()
    if path is None:
        return {}
    from sd_vram.plugin import cases

    catalogue = cases.load_catalogue(path)
    # The CLI keeps diffusers' defaults where a case sets nothing: only the options its entry
    # sets, not the catalogue's [defaults] (the suite's short call).
    return {c.name.lower(): _NamedCase(c, dict(c.own_options), catalogue.images_dir) for c in catalogue.cases}


def _catalogue_case(name: str, catalogue: dict[str, _NamedCase]) -> _NamedCase | None:
    """A case by its catalogue name, or a seed by its short name (balloon -> balloon-396x380)."""
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

        width, height = image_size(text, complete=True)
        if width < 8 or height < 8:
            raise InputError(f"{text} is {width}x{height}: an image needs at least 8 px a side")
        return {"width": width, "height": height, "source": f"{text} ({width}x{height})", "file": text}
    name = text.strip().lower()
    catalogue = _load_catalogue()
    found = _catalogue_case(name, catalogue)
    if found is not None:
        case = found.case
        width, height, source = case.width, case.height, f"case {case.name}"
        image = case.image_path(found.images_dir)
        if image is not None:  # the suite uses the real image when it is there: its size wins
            from sd_vram.imagesize import image_size

            width, height = image_size(str(image))
            source += f" ({image.name})"
        out = {"width": width, "height": height, "source": f"{source}, {width}x{height}"}
        if case.prompt:
            out["prompt"] = case.prompt
        out["options"] = found.own_options
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


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

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


def with_environment(opts: dict) -> dict:
    """The allocator settings of this shell (PYTORCH_ALLOC_CONF or PYTORCH_CUDA_ALLOC_CONF), as the
    user's own call would read them, where neither --alloc-conf nor --expandable-segments is given."""
    from sd_vram.formula import allocconf

    env = allocconf.from_environment(os.environ)
    if not env or {"alloc_conf", "expandable_segments"} & opts.keys():
        return opts
    name = allocconf.environment_variable(os.environ)
    try:
        allocconf.parse(env)
    except allocconf.AllocConfError as e:
        raise VerbatimInputError(f"{name}={env} in the environment: {e}") from None
    print(f"{PROG}: note: {name}={env} from the environment applies (--alloc-conf '' for PyTorch's defaults)",
          file=sys.stderr)
    return {**opts, "alloc_conf": env}


def resolve_call(image: str | None, cli_options: dict) -> tuple[dict, dict]:
    """(the input as resolve_input reads it, the call's options: the case's, then the flags'). txt2img
    takes no image: IMAGE is the output's WIDTHxHEIGHT, and may be left out (512x512)."""
    if image is None:
        pipeline = cli_options.get("pipeline", "img2img")
        if pipeline != "txt2img":
            raise InputError(f"{pipeline} needs an IMAGE: WIDTHxHEIGHT, an image file or a case name "
                             "(only --pipeline txt2img may leave it out: 512x512)")
        case = {"width": None, "height": None, "source": "txt2img"}
    else:
        case = resolve_input(image)
    opts = with_environment({**case.get("options", {}), **cli_options})
    if opts.get("pipeline") == "txt2img" and "file" in case:
        raise InputError(f"txt2img takes no image ({case['file']}): give the output's WIDTHxHEIGHT, or none for 512x512")
    return case, opts


def cmd_estimate(args) -> int:
    from sd_vram.formula import equation  # the module attribute, so tests can substitute estimate

    case, opts = resolve_call(args.image, option_kwargs(args))
    options = Options(**opts)  # validates before the equation runs
    prompt = _prompt_kwargs(args, case)
    vram, read_as = parse_budget(args.vram) if args.vram is not None else (None, "")
    budget = {} if vram is None else {"vram": vram}
    est = equation.estimate(case["height"], case["width"], **prompt, **budget, **opts)
    fixes = (equation.suggestions(case["height"], case["width"], vram, **prompt, **opts)
             if est.boundary is not None and est.boundary.verdict != "fits" else [])
    ends = (equation.verdict_range(case["height"], case["width"], vram=vram, point=est, **prompt, **opts)
            if vram else None)
    warning = truncation_warning(est)
    if warning:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if args.json:
        import json

        d = est.to_dict()
        if vram is not None:
            d["boundary"]["vram_read_as"] = read_as
            d["boundary"]["verdict_range"] = list(ends) if ends else [est.boundary.verdict] * 2
            d["suggestions"] = [{"change": how, "peak_device_bytes": e.boundary.peak_device,
                                 "peak_allocated_bytes": e.peak_allocated} for how, e in fixes]
        if args.compare:
            d["compare"] = {r["name"]: r["bytes"] for r in compare_rows(est, options, prompt.get("prompt_length"))}
        print(json.dumps(d, indent=2))
        return 0
    if est.boundary is not None:
        print(format_verdict(est, read_as, fixes, ends))
        print()
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
    from sd_vram.formula.maxsize import NothingFits, search

    budget, read_as = parse_budget(args.vram)
    aspect = parse_aspect(args.aspect)
    opts = with_environment(option_kwargs(args))
    options = Options(**opts)
    try:
        found = search(budget, aspect=aspect, quantity=args.quantity, **opts)
    except NothingFits as e:     # an answer: on stdout, exit 1 (bad input is exit 2)
        if args.json:
            import json

            print(json.dumps({"width": None, "height": None, "nothing_fits": str(e), "aspect": list(aspect),
                              "quantity": args.quantity, "budget_bytes": budget, "budget_read_as": read_as,
                              "gpu_profile": options.gpu, "options": options.to_dict()}, indent=2))
        else:
            print(e)
        return 1
    fallback = None if found.fallback_height is None else {"width": found.fallback_width, "height": found.fallback_height}
    ends = None
    if args.quantity == "device":      # the answer's own verdict over the bounds (estimate --vram's "not certain")
        from sd_vram.formula import equation
        from sd_vram.formula.maxsize import call_options

        ends = equation.verdict_range(found.height, found.width, vram=budget,
                                      **call_options(found.height, found.width, opts))
    if args.json:
        import json

        print(json.dumps({"width": found.width, "height": found.height, "aspect": list(aspect),
                          "quantity": args.quantity, "budget_bytes": budget, "budget_read_as": read_as,
                          "peak_bytes": found.peak,
                          "next": {"width": found.next_width, "height": found.next_height,
                                   "peak_bytes": found.next_peak},
                          "with_fallbacks": fallback, "gpu_profile": options.gpu,
                          "verdict_range": list(ends) if ends else None,
                          "derived_not_measured": list(options.derived_settings),
                          "options": options.to_dict()}, indent=2))
        return 0
    print(format_max_size(found, aspect, args.quantity, budget, read_as, options, ends))
    return 0


def cmd_simulate(args) -> int:
    case, opts = resolve_call(args.image, option_kwargs(args))
    Options(**opts)
    prompt = _prompt_kwargs(args, case)
    try:
        from sd_vram.simulation import simulate
    except ImportError as e:
        missing = (getattr(e, "name", None) or "").split(".")[0]
        if missing and missing != "sd_vram":  # any of the sim extra's packages (torch, numpy, ...)
            raise CliError(f"the simulation needs the sim extra ({missing} is missing): pip install 'sd-vram[sim]'", 1)
        raise CliError(f"the simulation is not available in this install ({e})", 1)
    if args.timeline:
        _check_timeline(args.timeline)
    result = simulate(case["height"], case["width"], **prompt, **opts)
    d = result.to_dict()
    if args.timeline:
        result.plot_timeline(args.timeline)
    if args.json:
        import json

        print(json.dumps(d, indent=2, default=str))
        return 0
    print(format_simulation(d, case["source"]))
    if args.timeline:
        print(f"timeline written to {args.timeline}")
    return 0


def _check_timeline(path: str) -> None:
    """Before the simulation runs (it takes seconds to minutes): where the plot will go."""
    from sd_vram.plotfile import check_plot_path

    try:
        check_plot_path("--timeline", path)
    except ImportError:
        raise CliError("the timeline plot needs matplotlib: pip install 'sd-vram[sim]'", 1) from None


def cmd_compare(args) -> int:
    from sd_vram.plugin import compare as compare_mod

    return compare_mod.run(args, prog=PROG)


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------

def _add_prompt(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", metavar="TEXT", help="the prompt (counted with the exact CLIP tokenizer)")
    g.add_argument("--prompt-length", type=_non_negative_int, metavar="N", help="the prompt's CLIP token count instead")


def build_parser() -> argparse.ArgumentParser:
    seeds = ", ".join(SEED_CASES)
    parser = _Parser(prog=PROG, description="Peak GPU memory of Stable Diffusion v1.5 calls "
                                            "(diffusers img2img, txt2img, inpaint; FP16 by default).")
    parser.add_argument("--version", action="version", version=f"{PROG} " + _version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    image_help = (f"WIDTHxHEIGHT (640x427 is 640 wide), an image file, a seed case ({seeds}) "
                  "or a case name of cases/catalogue.toml; txt2img: the output's WIDTHxHEIGHT (default 512x512)")
    p = sub.add_parser("estimate", help="predict the peak memory of one call (no GPU, no torch)",
                       description="Predict the peak GPU memory of one pipeline call (img2img unless --pipeline) "
                                   "with the closed-form equation.")
    p.add_argument("image", metavar="IMAGE", nargs="?", help=image_help)
    _add_prompt(p)
    add_option_flags(p)
    p.add_argument("--vram", metavar="BUDGET", help=f"the card's memory: {BUDGET_FORMS}; {BUDGET_MEANS}; "
                   "answers fits / fits with fallbacks / out of memory at an operation first")
    p.add_argument("--json", action="store_true", help="print the estimate as one JSON object")
    p.add_argument("--compare", action="store_true", help="also show the baseline estimators for the same input")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("max-size", help="largest image that fits a memory budget",
                       description="Largest image (sides multiples of 8) whose predicted peak fits the budget.")
    p.add_argument("--vram", required=True, metavar="BUDGET", help=f"the card's memory: {BUDGET_FORMS}; {BUDGET_MEANS}")
    p.add_argument("--aspect", default="1:1", metavar="W:H", help="aspect ratio, width:height (default 1:1)")
    p.add_argument("--quantity", choices=["allocated", "reserved", "device"], default="device",
                   help="which peak must fit: device (the default): what NVML shows, with the call replayed "
                        "under the budget as PyTorch runs it (cached segments released before an out-of-memory); "
                        "allocated or reserved: torch's peak on a card without a limit")
    add_option_flags(p)
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=cmd_max_size)

    p = sub.add_parser("simulate", help="run the pipeline on fake CUDA tensors (needs sd-vram[sim])",
                       description="Replay the real diffusers pipeline on fake CUDA tensors through a model of the caching allocator.")
    p.add_argument("image", metavar="IMAGE", nargs="?", help=image_help)
    _add_prompt(p)
    add_option_flags(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--timeline", metavar="FILE.png", help="write the memory timeline plot to this file")
    p.set_defaults(func=cmd_simulate)

    from sd_vram.plugin import compare as compare_mod

    p = sub.add_parser("compare", help="compare archived GPU results across GPUs, against the current equation",
                       description="Archived GPU suite results (results/<gpu-model>/), GPUs side by side.")
    compare_mod.add_arguments(p)
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
    p.add_argument("--channels-last", action="store_true",
                   help="also run the call with the UNet and the VAE channels-last and measure its NHWC "
                        "convolutions (what --channels-last predictions use; about twice the time)")
    p.add_argument("--backend", choices=["cuda", "fake"], default="cuda", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_probe)
    return parser


def _version() -> str:
    from sd_vram import __version__

    return __version__


def _attach_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--prompt "-5 apples"` -> `--prompt=-5 apples`: argparse reads a value that starts with
    '-' (a prompt, -1e3) as an option and stops; attached with '=' it is the option's value.
    A value that is itself an option (`--prompt --json`) stays apart, for argparse to refuse."""
    options, takes_value = set(), set()
    for p in [parser, *(sub for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                        for sub in a.choices.values())]:
        for a in p._actions:
            options.update(a.option_strings)
            if a.option_strings and a.nargs is None and not isinstance(a, argparse._VersionAction):
                takes_value.update(a.option_strings)
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return out + argv[i:]
        full = {a} if a in options else {o for o in options if a.startswith("--") and len(a) > 2 and o.startswith(a)}
        full &= takes_value                      # the option, or the one it abbreviates
        if len(full) == 1 and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] not in options:
            out.append(f"{full.pop()}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv=None) -> int:
    """Entry point of the ``sd-vram`` console script; returns the exit status."""
    parser = build_parser()
    try:
        argv = _attach_values(parser, sys.argv[1:] if argv is None else list(argv))
        for a in argv:
            if re.match(r"^-\d", a) and not re.match(r"^-\d+(\.\d*)?$", a):
                raise InputError(f"{a!r} is negative: sizes and memory budgets must be positive")
        args = parser.parse_args(argv)
        return args.func(args)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.status
    except InputError as e:
        line = str(e).splitlines()[0] if str(e) else "bad input"
        print(f"{PROG}: error: {line if isinstance(e, VerbatimInputError) else as_flags(line)}", file=sys.stderr)
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
