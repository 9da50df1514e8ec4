"""`sd-vram compare results/A [results/B ...]`: archived GPU runs, GPUs side by side.

One column per GPU (and allocator setting): each case's measured peaks with the error of the
current equation's prediction (`--as-recorded`: of the prediction stored with the run), the
difference between the GPUs' measurements, the peak stages, the error summary per GPU (every
measurement of every run) and optionally a PNG: predicted against measured per GPU, and peak
against megapixels with the equation's line and each GPU's measurements.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from sd_vram.formula import InputError

from .archive import SCHEMA, find_archives
from .checks import QUANTITIES, alloc_conf, allocator_variant, match_profile, mib, predict

GiB = 1 << 30
SHORT = {"peak_allocated": "allocated", "peak_reserved": "reserved", "peak_device": "device"}


class CompareError(Exception):
    """A results file or folder that cannot be compared: one line for the user."""


# --- loading and checking -------------------------------------------------------------------

def _need(cond, where: str, what: str) -> None:
    if not cond:
        raise CompareError(f"{where}: not a valid sd-vram results archive: {what}")


def _is_bytes(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0)


def check_archive(path: Path, data) -> None:
    """Every field compare reads, with its type; CompareError names the file and the field."""
    where = str(path)
    _need(isinstance(data.get("gpu", {}), dict), where, "'gpu' is not an object")
    _need(isinstance(data.get("gpu", {}).get("name", ""), (str, type(None))), where, "gpu.name is not text")
    env = data.get("environment", {})
    _need(isinstance(env, dict) and isinstance(env.get("env", {}), dict), where, "'environment' is not an object")
    _need(isinstance(data.get("run", {}), dict), where, "'run' is not an object")
    cases = data.get("cases")
    _need(isinstance(cases, list), where, "'cases' is not a list")
    for i, rec in enumerate(cases, 1):
        _need(isinstance(rec, dict) and isinstance(rec.get("id"), str), where, f"case #{i} has no id")
        at = f"case {rec['id']}"
        inp = rec.get("inputs")
        _need(isinstance(inp, dict), where, f"{at}: no inputs")
        for k in ("height", "width"):
            v = inp.get(k)
            _need(isinstance(v, int) and not isinstance(v, bool) and v >= 8, where, f"{at}: inputs.{k} is {v!r}")
        _need(isinstance(inp.get("prompt", ""), str), where, f"{at}: inputs.prompt is not text")
        _need(isinstance(inp.get("options", {}), dict), where, f"{at}: inputs.options is not an object")
        for part in ("measurement", "prediction"):
            d = rec.get(part)
            _need(d is None or isinstance(d, dict), where, f"{at}: {part} is not an object")
            for q in QUANTITIES:
                v = (d or {}).get(q + "_bytes")
                _need(_is_bytes(v), where, f"{at}: {part}.{q}_bytes is {v!r}")
            _need(isinstance((d or {}).get("peak_stage"), (str, type(None))), where, f"{at}: {part}.peak_stage")
        _need(isinstance((rec.get("measurement") or {}).get("status"), (str, type(None))), where,
              f"{at}: measurement.status is not text")


def _load(path: Path):
    """The archive, or None for JSON of another kind (conv probes, memory histories)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CompareError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise CompareError(f"{path}: not UTF-8 text") from None
    except ValueError as e:
        raise CompareError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("sd-vram/"):
        raise CompareError(f"{path}: not an sd-vram results archive (schema {SCHEMA})")
    if data["schema"] != SCHEMA:
        return None
    check_archive(path, data)
    return data


def _label(path: Path, data: dict) -> str:
    slug = data.get("gpu", {}).get("slug") or "?"
    return f"{slug} {path.stem.split('_')[0]}"


def _gpu(data: dict) -> str:
    """The column a run goes in: its GPU model, and the allocator when it is not the default."""
    slug = data.get("gpu", {}).get("slug") or "?"
    variant = allocator_variant(data.get("environment", {}).get("env", {}))
    return slug + ("" if variant == "default" else f" [{variant}]")


def load_runs(paths) -> list[tuple[str, Path, dict]]:
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise CompareError(f"no such file or folder: {', '.join(missing)}")
    runs = []
    for f in find_archives(paths):
        data = _load(f)
        if data is not None:
            runs.append((_label(f, data), f, data))
    if not runs:
        raise CompareError(f"no sd-vram results under {', '.join(map(str, paths))}")
    seen: dict[str, int] = {}
    out = []
    for label, f, data in runs:               # same GPU and second: keep labels unique
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label} #{seen[label]}", f, data))
    return out


# --- points ---------------------------------------------------------------------------------

def _prediction(rec: dict, data: dict, as_recorded: bool, gpu_profile: str | None = None) -> dict | None:
    if as_recorded:
        return rec.get("prediction")
    from sd_vram.formula import InputError

    inp = rec["inputs"]
    try:
        return predict(inp["height"], inp["width"], inp.get("prompt"), inp.get("options", {}),
                       gpu_profile or match_profile(data.get("gpu", {}).get("name")),
                       alloc_conf(data.get("environment", {}).get("env", {})))
    except (InputError, TypeError):            # options this equation does not know
        return None


def points(runs, as_recorded: bool = False, gpu_profile: str | None = None) -> list[dict]:
    """One dict per (run, case, quantity): gpu, run, case, q, pred, meas, stages, status, pixels."""
    pts = []
    for label, _f, data in runs:
        for rec in data["cases"]:
            m = rec.get("measurement") or {}
            p = _prediction(rec, data, as_recorded, gpu_profile) or {}
            inp = rec["inputs"]
            pixels = (inp["height"] - inp["height"] % 8) * (inp["width"] - inp["width"] % 8)
            for q in QUANTITIES:
                pts.append({"gpu": _gpu(data), "run": label, "case": rec["id"], "q": q,
                            "pred": p.get(q + "_bytes"), "meas": m.get(q + "_bytes"),
                            "stage_pred": p.get("peak_stage"), "stage_meas": m.get("peak_stage"),
                            "status": m.get("status"), "pixels": pixels, "options": inp.get("options", {}),
                            "profile": match_profile(data.get("gpu", {}).get("name"))})
    return pts


def _ok(p) -> bool:
    return p["status"] == "ok" and p["meas"] is not None


def _err(p) -> float:
    return (p["pred"] - p["meas"]) / p["meas"]


def _cell(p) -> str:
    if p is None:
        return ""
    if p["status"] == "oom":
        return "OOM"
    if p["meas"] is None:
        return "-" if p["status"] in (None, "ok") else str(p["status"])
    if p["pred"] is None:
        return f"{mib(p['meas'])} (?)"
    return f"{mib(p['meas'])} ({_err(p):+.2%})"


# --- the report -----------------------------------------------------------------------------

def compare_runs(paths, png: str | Path | None = None, as_recorded: bool = False,
                 gpu_profile: str | None = None) -> str:
    """Text report of the runs under `paths` (archive files or folders); writes a PNG if asked."""
    text, runs, pts = report(paths, as_recorded, gpu_profile)
    if png:
        write_png(pts, runs, Path(png))
        text += f"\n\nplot: {png}"
    return text


def report(paths, as_recorded: bool = False, gpu_profile: str | None = None):
    """(text, runs, points) of the runs under `paths`; gpu_profile: predict with this profile
    (a name or a file) instead of the one matching each run's GPU."""
    if gpu_profile:
        from sd_vram.formula import InputError, gpu_profiles

        try:
            gpu_profiles.get(gpu_profile)
        except InputError as e:
            raise CompareError(str(e)) from None
        if as_recorded:
            raise CompareError("--gpu-profile predicts with the current equation; it cannot go with --as-recorded")
    runs = load_runs(paths)
    pts = points(runs, as_recorded, gpu_profile)
    gpus = sorted(dict.fromkeys(p["gpu"] for p in pts), key=lambda g: "[" in g)  # default allocators first
    cases = list(dict.fromkeys(p["case"] for p in pts))
    latest = {}                                   # (gpu, case, q) -> the last run's point (runs in time order)
    for p in pts:
        if p["meas"] is not None or p["status"] not in (None, "ok") or (p["gpu"], p["case"], p["q"]) not in latest:
            latest[(p["gpu"], p["case"], p["q"])] = p

    out = ["Runs:"]
    for label, f, data in runs:
        env, run = data.get("environment", {}), data.get("run", {})
        out.append(f"  {label}: {data.get('gpu', {}).get('name')} | torch {env.get('torch')} | CUDA {env.get('cuda')} | "
                   f"driver {env.get('driver')} | commit {run.get('git_commit')} | {len(data['cases'])} cases | {f}")
    which = "as recorded with each run" if as_recorded else "of the current equation"
    out.append(f"\nMeasured MiB per GPU (the latest run that measured the case), with the error of the prediction "
               f"{which}: (predicted - measured) / measured")
    first = gpus[0]
    vs = gpus[1:]
    header = ["case", *gpus, *(f"{g} vs {first}" for g in vs)]
    for q in QUANTITIES:
        rows = []
        for cid in cases:
            cells = [_cell(latest.get((g, cid, q))) for g in gpus]
            a = latest.get((first, cid, q))
            for g in vs:
                b = latest.get((g, cid, q))
                both = a and b and _ok(a) and _ok(b)
                cells.append(f"{(b['meas'] - a['meas']) / a['meas']:+.1%}" if both else "")
            rows.append([cid, *cells])
        out.append(f"\n{q}")
        out.append(_table(rows, header))
    rows = []
    for cid in cases:
        cells = []
        for g in gpus:
            p = latest.get((g, cid, "peak_allocated"))
            star = p and p["stage_meas"] and p["stage_pred"] != p["stage_meas"]
            cells.append("" if p is None else f"{p['stage_meas'] or '-'}{'*' if star else ''}")
        rows.append([cid, *cells])
    out.append("\npeak stage (measured; * = the prediction named another)")
    out.append(_table(rows, ["case", *gpus]))
    out.append("\nerror summary: mean |error| / max |error| over every measurement of every run")
    rows = []
    for q in QUANTITIES:
        cells = []
        for g in gpus:
            errs = [abs(_err(p)) for p in pts if p["gpu"] == g and p["q"] == q and _ok(p) and p["pred"] is not None]
            cells.append(f"{sum(errs) / len(errs):.2%} / {max(errs):.2%}" if errs else "-")
        rows.append([q, *cells])
    out.append(_table(rows, ["quantity", *gpus]))
    out.append("\n" + summary_line(runs, pts))
    return "\n".join(out), runs, pts


def summary_line(runs, pts) -> str:
    """'N measured cases on GPU, ...; largest |error|: allocated x%, reserved y%, device z%'."""
    measured = [p for p in pts if p["q"] == "peak_allocated" and _ok(p)]
    names = sorted({str(d.get("gpu", {}).get("name")) for _, _, d in runs})
    worst = []
    for q in QUANTITIES:
        errs = [abs(_err(p)) for p in pts if p["q"] == q and _ok(p) and p["pred"] is not None]
        worst.append(f"{SHORT[q]} {max(errs, default=0):.2%}")
    return f"{len(measured)} measured cases on {', '.join(names)}; largest |error|: " + ", ".join(worst)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), *map(line, rows)]).rstrip()


# --- the plot -------------------------------------------------------------------------------

def _nice_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 3, 5 x 10^k between lo and hi: few enough on a log axis that the labels never overlap."""
    ticks = []
    for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        ticks += [m * 10 ** k for m in (1, 2, 3, 5) if lo <= m * 10 ** k <= hi]
    return ticks


def _log_axis(axis, lo: float, hi: float) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    axis.set_major_locator(FixedLocator(_nice_ticks(lo, hi)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _plain(options: dict) -> bool:
    """The catalogue's default call (squares, seeds, aspect and odd sizes): one line fits them."""
    want = {"num_images_per_prompt": 1, "attention": "auto", "attention_slicing": None, "vae_slicing": False,
            "vae_tiling": False, "safety_checker": True, "output_type": "pil"}
    return all(options.get(k, v) == v for k, v in want.items()) and options.get("guidance_scale", 7.5) > 1


def write_png(pts, runs, path: Path) -> None:
    """Left: predicted (GiB) against measured per GPU, log-log. Right: peak device memory against
    megapixels, measured and predicted, for the cases of the default call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    gpus = list(dict.fromkeys(p["gpu"] for p in pts))
    markers, colours = "o^sDvP*X", {"peak_allocated": "tab:blue", "peak_reserved": "tab:orange",
                                    "peak_device": "tab:green"}
    good = [p for p in pts if _ok(p) and p["pred"]]
    for i, g in enumerate(gpus):
        for q in QUANTITIES:
            sel = [p for p in good if p["gpu"] == g and p["q"] == q]
            if sel:
                ax.scatter([p["pred"] / GiB for p in sel], [p["meas"] / GiB for p in sel], s=22, alpha=0.7,
                           marker=markers[i % len(markers)], color=colours[q], label=f"{g}: {SHORT[q]}")
    if good:
        vals = [v / GiB for p in good for v in (p["pred"], p["meas"])]
        lo, hi = min(vals) * 0.9, max(vals) * 1.1
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="predicted = measured")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        _log_axis(ax.xaxis, lo, hi)
        _log_axis(ax.yaxis, lo, hi)
    ax.set_xlabel("predicted peak (GiB, current equation)")
    ax.set_ylabel("measured peak (GiB)")
    ax.set_title("predicted against measured")
    ax.grid(True, which="major", alpha=0.3)

    plain = [p for p in good if p["q"] == "peak_device" and _plain(p["options"])]
    for i, g in enumerate(gpus):
        sel = [p for p in plain if p["gpu"] == g]
        if not sel:
            continue
        ax2.scatter([p["pixels"] / 1e6 for p in sel], [p["meas"] / GiB for p in sel], s=22, alpha=0.8,
                    marker=markers[i % len(markers)], label=f"{g}: measured")
        line = sorted({(p["pixels"], p["pred"]) for p in sel})     # the equation at the measured sizes
        ax2.plot([x / 1e6 for x, _ in line], [y / GiB for _, y in line], lw=1, label=f"{g}: equation")
    ax2.set_xlabel("megapixels (height x width after rounding down to multiples of 8)")
    ax2.set_ylabel("peak device memory (GiB, nvidia-smi)")
    ax2.set_title("peak against image size (default call)")
    ax2.grid(True, alpha=0.3)
    for a in (ax, ax2):
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.suptitle("sd-vram: archived GPU runs against the equation")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line ---------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="RESULTS", help="archive files or folders (e.g. results/H200 results/H100-80GB-HBM3)")
    parser.add_argument("--png", metavar="FILE", help="also write the plots (predicted against measured; peak against megapixels)")
    parser.add_argument("--as-recorded", action="store_true",
                        help="errors of the predictions stored with each run instead of the current equation's")
    parser.add_argument("--gpu-profile", metavar="NAME|FILE",
                        help="predict with this GPU profile (a name or a file) instead of the one of each run's GPU")


def run(args, prog: str = "sd-vram compare") -> int:
    """Print the report; a bad archive or folder is one line and exit 2. Without matplotlib the
    text still prints, then one line says the plot needs it (exit 1)."""
    if args.png:
        from sd_vram.plotfile import check_plot_path

        try:
            check_plot_path("--png", args.png)
        except InputError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        except ImportError:
            pass                  # said after the text, below
    try:
        text, runs, pts = report(args.paths, as_recorded=args.as_recorded,
                                 gpu_profile=getattr(args, "gpu_profile", None))
    except CompareError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(text)
    if args.png:
        try:
            write_png(pts, runs, Path(args.png))
        except ImportError:
            print(f"{prog}: error: the plot needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 1
        print(f"\nplot: {args.png}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sd-vram compare", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
