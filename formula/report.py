"""Tables for DERIVATION.md and the README, regenerated from the code.

    python -m sd_vram.formula.report seeds            # the four seed cases
    python -m sd_vram.formula.report sweep            # squares 64 .. 4096
    python -m sd_vram.formula.report terms 512x512    # every term of every stage at one size
    python -m sd_vram.formula.report weights          # weights per model
    python -m sd_vram.formula.report validation results/H200   # archived GPU runs against the equation
    python -m sd_vram.formula.report --update FILE    # rewrite the <!-- report: ... --> blocks

A document embeds a table between `<!-- report: ARGS -->` and `<!-- /report -->`;
tests/test_docs.py checks that every block equals what the command prints now.
"""

from __future__ import annotations

import re
import sys

from . import activations as act
from . import gpu_profiles
from .equation import _stage_candidates, estimate, weights
from .options import Options

MiB = 1 << 20

SEEDS = [  # the four provided images: name, width, height, CLIP tokens of its prompt (cases/catalogue.toml)
    ("balloon", 396, 380, 53),
    ("groceries", 800, 534, 64),
    ("bench", 2048, 2048, 62),
    ("truck", 1800, 1200, 41),
]


def mib(n: int) -> str:
    return f"{n / MiB:,.1f}"


def _row(name, e) -> str:
    return (f"| {name} | {e.width}x{e.height} | {mib(e.peak_allocated)} | {mib(e.peak_reserved)} "
            f"| {mib(e.peak_device)} | {e.peak_stage} |")


HEADER = ("| case | image (WxH, rounded) | peak allocated MiB | peak reserved MiB | nvidia-smi MiB | peak stage |\n"
          "|---|---|---:|---:|---:|---|")


def seeds(**options) -> str:
    rows = [_row(f"{name} ({tokens} tokens)", estimate(h, w, prompt_length=tokens, **options))
            for name, w, h, tokens in SEEDS]
    return "\n".join([HEADER, *rows])


def sweep(**options) -> str:
    rows = [_row(f"{s}x{s}", estimate(s, s, **options)) for s in (64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)]
    return "\n".join([HEADER, *rows])


def weights_table() -> str:
    from math import prod

    from . import architecture as arch
    from .allocator import CachingAllocator, round_size

    def pack(sizes, expandable=False):
        a = CachingAllocator(expandable)
        allocated = sum(a.malloc(n).size for n in sizes)
        return allocated, a.reserved

    lines = ["| model | parameters | tensors | bytes (fp16, each rounded to 512 B) | allocator blocks |",
             "|---|---:|---:|---:|---:|"]
    sizes = []
    for name in ("safety_checker", "text_encoder", "unet", "vae"):
        tensors = arch.MODELS[name]()
        sizes += [prod(shape) * item for _, shape, item in tensors]
        lines.append(f"| {name} | {arch.numel(tensors):,} | {len(tensors)} | "
                     f"{sum(round_size(prod(sh) * it) for _, sh, it in tensors):,} | {weights(True)[name]:,} |")
    native, expandable = pack(sizes), pack(sizes, expandable=True)
    lines.append(f"| all, in pipe.to('cuda') order | | | {expandable[0]:,} (expandable segments) | {native[0]:,} |")
    lines.append(f"| reserved after loading | | | {expandable[1]:,} (expandable segments) | {native[1]:,} |")
    return "\n".join(lines)


def terms(size: str, **options) -> str:
    W, H = (int(x) for x in size.lower().split("x"))
    o = Options(**options)
    s = act.Shape(H=H - H % 8, W=W - W % 8, n=o.num_images_per_prompt, B=o.unet_batch, cfg=o.cfg, dtype=o.dtype)
    out = []
    for stage, candidates in _stage_candidates(s, o, gpu_profiles.get(o.gpu)).items():
        peak = max(candidates, key=lambda p: p.total)
        out.append(f"**{stage}** at `{peak.operation}`: {peak.total:,} B ({mib(peak.total)} MiB) "
                   f"above the resident weights and workspace\n")
        out.append("| component | tensor | bytes |\n|---|---|---:|")
        out += [f"| {c} | {n} | {b:,} |" for c, n, b in _grouped(peak.terms)]
        out.append("")
    return "\n".join(out).rstrip()


def _grouped(terms):
    """Collapse `name[0]`, `name[1]`, ... into `name (x k)` with the summed bytes."""
    out = []
    for comp, name, size in terms:
        base, _, idx = name.partition("[")
        if idx and out and out[-1][0] == comp and out[-1][3] == base:
            c, n, b, _, k = out[-1]
            out[-1] = (c, f"{base} (x {k + 1})", b + size, base, k + 1)
        else:
            out.append((comp, name if not idx else f"{base} (x 1)", size, base, 1))
    return [(c, n.replace(" (x 1)", ""), b) for c, n, b, _, _ in out]


def validation(*paths: str) -> str:
    """Every archived GPU measurement under `paths` against the current equation."""
    import glob
    import json
    import os

    files = []
    for path in paths:
        files += sorted(glob.glob(os.path.join(path, "*.json"))) if os.path.isdir(path) else [path]
    lines = ["| GPU | allocator | case | allocated MiB (error) | reserved MiB (error) | nvidia-smi MiB (error) | peak stage (predicted) |",
             "|---|---|---|---:|---:|---:|---|"]
    worst = {"allocated": 0.0, "reserved": 0.0, "device": 0.0}
    for f in files:
        data = json.load(open(f, encoding="utf-8"))
        if not str(data.get("schema", "")).startswith("sd-vram/results/"):
            continue
        env = data["environment"]
        expandable = "expandable_segments:True" in str(env["env"].get("PYTORCH_CUDA_ALLOC_CONF"))
        gpu = env["gpu"]["name"]
        profile = gpu_profiles.for_device(gpu)
        for case in data["cases"]:
            m = case["measurement"]
            if m.get("status") != "ok":
                continue
            inp = case["inputs"]
            e = estimate(inp["height"], inp["width"], prompt=inp.get("prompt"),
                         **{**inp["options"], "gpu": profile, "expandable_segments": expandable})
            cells = []
            for q, pred in (("allocated", e.peak_allocated), ("reserved", e.peak_reserved), ("device", e.peak_device)):
                meas = m[f"peak_{q}_bytes"]
                err = (pred - meas) / meas * 100
                worst[q] = max(worst[q], abs(err))
                cells.append(f"{mib(meas)} ({err:+.2f}%)")
            stage = m["peak_stage"] + ("" if e.peak_stage == m["peak_stage"] else f" ({e.peak_stage})")
            lines.append(f"| {gpu} | {'expandable' if expandable else 'native'} | {case['id']} | "
                         + " | ".join(cells) + f" | {stage} |")
    lines.append("")
    lines.append("largest |error|: " + ", ".join(f"{q} {v:.2f}%" for q, v in worst.items()))
    return "\n".join(lines)


def validation_summary(*paths: str) -> str:
    import glob
    import os

    files = []
    for path in paths:
        files += sorted(glob.glob(os.path.join(path, "**", "*.json"), recursive=True))
    table = validation(*files)
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # after the header ("|---|" is not "| ")
    gpus = sorted({line.split("|")[1].strip() for line in rows})
    return f"{len(rows)} measured cases on {', '.join(gpus)}; " + table.splitlines()[-1]


COMMANDS = {"validation-summary": validation_summary, "validation": validation, "seeds": seeds, "sweep": sweep, "terms": terms, "weights": lambda: weights_table()}


def run(args: list[str]) -> str:
    name, rest = args[0], args[1:]
    options = {}
    positional = []
    for a in rest:
        if "=" in a:
            k, v = a.split("=", 1)
            options[k] = _value(v)
        else:
            positional.append(a)
    return COMMANDS[name](*positional, **options)


def _value(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(v, v)


BLOCK = re.compile(r"(<!-- report: (.*?) -->\n)(.*?)(<!-- /report -->)", re.S)


def update(path: str) -> bool:
    text = open(path, encoding="utf-8").read()
    new = BLOCK.sub(lambda m: m.group(1) + run(m.group(2).split()) + "\n" + m.group(4), text)
    if new != text:
        open(path, "w", encoding="utf-8").write(new)
    return new != text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--update"]:
        for path in argv[1:]:
            print(f"{path}: {'updated' if update(path) else 'up to date'}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 2
    print(run(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
