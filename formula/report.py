"""Tables for DERIVATION.md and the README, regenerated from the code.

    python -m sd_vram.formula.report seeds            # the four seed cases
    python -m sd_vram.formula.report sweep            # squares 64 .. 4096
    python -m sd_vram.formula.report terms 512x512    # every term of every stage at one size
    python -m sd_vram.formula.report weights          # weights per model
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

SEEDS = [  # name, width, height, CLIP tokens of its prompt (cases/catalogue.toml)
    ("balloon", 640, 427, 53),
    ("groceries", 800, 533, 64),
    ("bench", 3840, 2560, 62),
    ("truck", 4032, 3024, 41),
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
    w = weights(True)
    lines = ["| model | allocated bytes (each tensor rounded to 512 B) |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in w.items() if k != "reserved"]
    lines.append(f"| total | {sum(v for k, v in w.items() if k != 'reserved'):,} |")
    lines.append(f"| reserved (segments after pipe.to('cuda')) | {w['reserved']:,} |")
    return "\n".join(lines)


def terms(size: str, **options) -> str:
    W, H = (int(x) for x in size.lower().split("x"))
    o = Options(**options)
    s = act.Shape(H=H - H % 8, W=W - W % 8, n=o.num_images_per_prompt, B=o.unet_batch, cfg=o.cfg)
    out = []
    for stage, candidates in _stage_candidates(s, o, gpu_profiles.get(o.gpu)).items():
        peak = max(candidates, key=lambda p: p.total)
        out.append(f"**{stage}** at `{peak.operation}`: {peak.total:,} B ({mib(peak.total)} MiB) "
                   f"above the resident weights and workspace\n")
        out.append("| component | tensor | bytes |\n|---|---|---:|")
        out += [f"| {c} | {n} | {b:,} |" for c, n, b in peak.terms]
        out.append("")
    return "\n".join(out).rstrip()


COMMANDS = {"seeds": seeds, "sweep": sweep, "terms": terms, "weights": lambda: weights_table()}


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
