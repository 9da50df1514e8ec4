"""`sd-vram compare results/A [results/B ...]`: archived GPU runs side by side.

Same cases across runs and GPU models: measured peaks with the prediction's error at the
time of the run (or of the current equation, --current), peak stages, a per-run error
summary, and optionally a PNG of predicted against measured per GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .archive import find_archives, load_archive
from .checks import QUANTITIES, allocator_variant, match_profile, mib, predict

GiB = 1 << 30


class CompareError(Exception):
    pass


def _label(path: Path, data: dict) -> str:
    slug = data.get("gpu", {}).get("slug", "?")
    stamp = path.stem.split("_")[0]
    variant = allocator_variant(data.get("environment", {}).get("env", {}))
    return f"{slug} {stamp}" + ("" if variant == "default" else f" [{variant}]")


def load_runs(paths) -> list[tuple[str, Path, dict]]:
    files = find_archives(paths)
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise CompareError(f"no such file or folder: {', '.join(map(str, missing))}")
    runs = []
    for f in files:
        try:
            data = load_archive(f)
        except (ValueError, OSError):
            continue
        runs.append((_label(f, data), f, data))
    if not runs:
        raise CompareError(f"no sd-vram results under {', '.join(map(str, paths))}")
    seen: dict[str, int] = {}
    out = []
    for label, f, data in runs:               # same GPU and second: keep labels unique
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label} #{seen[label]}", f, data))
    return out


def _prediction(rec: dict, data: dict, current: bool, gpu_profile: str | None = None) -> dict | None:
    if not current:
        return rec.get("prediction")
    inp = rec["inputs"]
    try:
        return predict(inp["height"], inp["width"], inp["prompt"], inp["options"],
                       gpu_profile or match_profile(data.get("gpu", {}).get("name")),
                       allocator_variant(data.get("environment", {}).get("env", {})))
    except Exception:
        return None


def _points(runs, current: bool, gpu_profile: str | None = None):
    """[(label, slug, case id, quantity, predicted, measured, stage_pred, stage_meas, status)]"""
    pts = []
    for label, _f, data in runs:
        slug = data.get("gpu", {}).get("slug", "?")
        for rec in data.get("cases", []):
            m = rec.get("measurement") or {}
            p = _prediction(rec, data, current, gpu_profile) or {}
            for q in QUANTITIES:
                pts.append((label, slug, rec["id"], q, p.get(q + "_bytes"), m.get(q + "_bytes"),
                            p.get("peak_stage"), m.get("peak_stage"), m.get("status")))
    return pts


def _cell(pred, meas, status) -> str:
    if status == "oom":
        return "OOM"
    if meas is None:
        return "-" if status in (None, "ok") else str(status)
    if pred is None:
        return f"{mib(meas)} (?)"
    return f"{mib(meas)} ({(pred - meas) / meas:+.1%})"


def compare_runs(paths, png: str | Path | None = None, current: bool = False, gpu_profile: str | None = None) -> str:
    """Text report of the runs under `paths` (archive files or folders); writes a PNG if asked."""
    runs = load_runs(paths)
    if gpu_profile:                      # a profile to predict with: the current equation
        from sd_vram.formula import InputError, gpu_profiles

        try:
            gpu_profiles.get(gpu_profile)
        except InputError as e:
            raise CompareError(str(e)) from None
        current = True
    pts = _points(runs, current, gpu_profile)
    labels = [r[0] for r in runs]
    cases: list[str] = []
    for _l, _s, cid, *_ in pts:
        if cid not in cases:
            cases.append(cid)
    by = {(p[0], p[2], p[3]): p for p in pts}

    out = ["Runs:"]
    for label, f, data in runs:
        env, run = data.get("environment", {}), data.get("run", {})
        out.append(f"  {label}: {data.get('gpu', {}).get('name')} | torch {env.get('torch')} | CUDA {env.get('cuda')} | "
                   f"driver {env.get('driver')} | commit {run.get('git_commit')} | {len(data.get('cases', []))} cases | {f}")
    which = "the current equation" if current else "the equation of each run"
    out.append(f"\nMeasured MiB (error of {which}: (predicted - measured) / measured)")
    width = max([len("case")] + [len(c) for c in cases]) + 2
    colw = max(22, *(len(lb) + 2 for lb in labels))
    for q in QUANTITIES:
        out.append(f"\n{q}")
        out.append(f"{'case':<{width}}" + "".join(f"{lb:>{colw}}" for lb in labels))
        for cid in cases:
            cells = []
            for lb in labels:
                p = by.get((lb, cid, q))
                cells.append("" if p is None else _cell(p[4], p[5], p[8]))
            out.append(f"{cid:<{width}}" + "".join(f"{c:>{colw}}" for c in cells))
    out.append("\npeak stage (measured; * = the prediction named another)")
    out.append(f"{'case':<{width}}" + "".join(f"{lb:>{colw}}" for lb in labels))
    for cid in cases:
        cells = []
        for lb in labels:
            p = by.get((lb, cid, "peak_allocated"))
            if p is None:
                cells.append("")
            else:
                cells.append(f"{p[7] or '-'}{'*' if p[6] != p[7] and p[7] else ''}")
        out.append(f"{cid:<{width}}" + "".join(f"{c:>{colw}}" for c in cells))
    out.append("\nerror summary: mean |error| / max |error| over the cases measured")
    out.append(f"{'quantity':<{width}}" + "".join(f"{lb:>{colw}}" for lb in labels))
    for q in QUANTITIES:
        cells = []
        for lb in labels:
            errs = [abs((p[4] - p[5]) / p[5]) for p in pts if p[0] == lb and p[3] == q
                    and p[4] is not None and p[5] and p[8] == "ok"]
            cells.append(f"{sum(errs) / len(errs):.2%} / {max(errs):.2%}" if errs else "-")
        out.append(f"{q:<{width}}" + "".join(f"{c:>{colw}}" for c in cells))
    if png:
        write_png(pts, runs, Path(png))
        out.append(f"\nplot: {png}")
    return "\n".join(out)


def write_png(pts, runs, path: Path) -> None:
    """Predicted against measured (GiB, log-log) per quantity, one colour per GPU model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bands = runs[0][2].get("run", {}).get("bands", {})
    fig, axes = plt.subplots(1, len(QUANTITIES), figsize=(5 * len(QUANTITIES), 4.8))
    slugs = sorted({p[1] for p in pts})
    markers = "o^sDvP*X"
    for ax, q in zip(axes, QUANTITIES):
        lo, hi = None, None
        for i, slug in enumerate(slugs):
            xs = [p[4] / GiB for p in pts if p[1] == slug and p[3] == q and p[4] and p[5] and p[8] == "ok"]
            ys = [p[5] / GiB for p in pts if p[1] == slug and p[3] == q and p[4] and p[5] and p[8] == "ok"]
            if xs:
                ax.scatter(xs, ys, label=slug, marker=markers[i % len(markers)], alpha=0.75)
                lo = min([lo or min(xs + ys)] + xs + ys)
                hi = max([hi or max(xs + ys)] + xs + ys)
        if lo is not None:
            line = [lo * 0.9, hi * 1.1]
            ax.plot(line, line, "k-", lw=0.8, label="predicted = measured")
            b = bands.get(q)
            if b:
                ax.plot(line, [v / (1 + b) for v in line], "k:", lw=0.6, label=f"band ±{b:.0%}")
                ax.plot(line, [v / (1 - b) for v in line], "k:", lw=0.6)
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_title(q)
        ax.set_xlabel("predicted (GiB)")
        ax.set_ylabel("measured (GiB)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("sd-vram: predicted vs measured peak memory per GPU")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="RESULTS", help="archive files or folders (e.g. results/H200 results/H100-80GB-HBM3)")
    parser.add_argument("--png", metavar="FILE", help="also write a plot of predicted against measured per GPU")
    parser.add_argument("--current", action="store_true",
                        help="errors of the current equation instead of the one archived with each run")
    parser.add_argument("--gpu-profile", metavar="NAME|FILE",
                        help="predict with this GPU profile (a name or a file; implies --current)")


def run(args) -> int:
    try:
        print(compare_runs(args.paths, png=args.png, current=args.current,
                           gpu_profile=getattr(args, "gpu_profile", None)))
    except CompareError as e:
        print(f"sd-vram compare: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sd-vram compare", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
