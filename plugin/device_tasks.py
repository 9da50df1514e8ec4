"""Device-side tasks of scripts/gpu_validate.sh that are not pytest runs.

    python3 -m sd_vram.plugin.device_tasks snapshot --cases balloon-396x380,bench-2048x2048 --results-dir DIR

    python3 -m sd_vram.plugin.device_tasks budgets --cases balloon,truck --results-dir DIR

`snapshot` runs each case once under torch.cuda.memory._record_memory_history and writes
DIR/<gpu-model>/<UTC time>_<commit>_memhistory_<case>.json: the measurement (same code path as `pytest --gpu`) and the snapshot reduced
on the device by memhistory.reduce_snapshot (the raw pickle is far too large to bring back).

`budgets` runs each case under torch.cuda.set_per_process_memory_fraction at four capacities
the equation places around its boundary (DERIVATION.md section 11, BUDGET_POINTS): just above
the full-speed reserved peak, just above its allocated peak, between the no-workspace floor
and the full-speed peak, and just below the floor; largest first. Run it with
TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT=-1 (scripts/gpu_validate.sh does): cuDNN then caches no
convolution plan, so a plan chosen after a workspace fallback never runs at another budget.
It writes DIR/<gpu-model>/<UTC time>_<commit>_budgets.json
with each run's measurement (status, the OOM message, num_ooms, num_alloc_retries, peaks) and
the equation's verdict for it at the time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _deadline(args) -> float | None:
    d = os.environ.get("SD_VRAM_DEADLINE")
    return float(d) if d else None


def snapshot(args) -> int:
    from .archive import git_commit, utc_stamp, write_json_atomic
    from .cases import load_catalogue
    from .memhistory import HistoryRecorder, fake_snapshot, reduce_snapshot

    cat = load_catalogue(args.catalogue)
    cases = [cat.get(n) for n in args.cases.split(",") if n]
    deadline = _deadline(args)
    out = Path(args.results_dir)
    commit, _dirty = git_commit(Path.cwd())
    if args.backend == "fake":
        from .backends import FakeBackend

        backend = FakeBackend()
    else:
        from .gpu import CudaBackend, preflight

        backend = CudaBackend(monitor=preflight())
    print(f"snapshot: backend {backend.name} on {backend.gpu['name']}", flush=True)
    rc = 0
    for case in cases:
        if deadline is not None and time.time() > deadline:
            print(f"snapshot: {case.name}: skipped, time budget exhausted", flush=True)
            continue
        t0 = time.perf_counter()
        image, _info = case.load_image(cat.images_dir) if backend.wants_image else (None, None)
        recorder = HistoryRecorder(stacks=args.stacks)
        m = backend.measure(case, image, around_call=None if args.backend == "fake" else recorder,
                            size=case.size(cat.images_dir))
        del image
        snap = recorder.snapshot if args.backend != "fake" else fake_snapshot()
        t1 = time.perf_counter()
        summary = reduce_snapshot(snap or {}, resident_bytes=m.get("resident_allocated_bytes") or 0,
                                  measured_peak=m.get("peak_allocated_bytes"))
        recorder_error = recorder.error
        del snap, recorder
        doc = {"schema": "sd-vram/memhistory/1", "case": case.name, "inputs": {"height": case.height,
               "width": case.width, "options": case.options}, "gpu": backend.gpu, "stacks": args.stacks,
               "measurement": m, "summary": summary, "recorder_error": recorder_error,
               "seconds": {"call_and_snapshot": round(t1 - t0, 2), "reduce": round(time.perf_counter() - t1, 2)}}
        path = out / backend.gpu["slug"] / f"{utc_stamp()}_{commit}_memhistory_{case.name}.json"
        write_json_atomic(path, doc)
        print(f"snapshot: {case.name}: {m['status']}, peak_allocated {m.get('peak_allocated_bytes')} B measured, "
              f"{summary['peak_allocated_bytes']} B from the trace ({summary['events']} events), "
              f"{doc['seconds']} -> {path}", flush=True)
        rc |= m["status"] != "ok"
    backend.close()
    return rc


BUDGET_POINTS = {  # capacity for the allocator, from the equation's full-speed and floor peaks
    "above-full-speed": lambda full, floor: full.peak_reserved + (64 << 20),      # no OOM path
    # cached segments released: halfway between the allocated and the reserved peak
    "above-allocated": lambda full, floor: (full.peak_allocated + full.peak_reserved) // 2,
    "between-floor-and-full": lambda full, floor: (floor.peak_allocated + full.peak_allocated) // 2,
    "below-floor": lambda full, floor: floor.peak_allocated - (64 << 20),        # out of memory
}


def budget_capacities(case, size, profile) -> dict[str, int]:
    """The capacities BUDGET_POINTS gives for a case, largest first."""
    from sd_vram.formula.equation import estimate

    opts = {**case.options, "gpu": profile.name}
    full = estimate(*size, prompt=case.prompt, **opts)
    floor = estimate(*size, prompt=case.prompt, _floor=True, **opts)
    caps = {label: rule(full, floor) for label, rule in BUDGET_POINTS.items()}
    return dict(sorted(caps.items(), key=lambda kv: -kv[1]))


def budgets(args) -> int:
    from sd_vram.formula import gpu_profiles
    from sd_vram.formula.equation import estimate

    from .archive import git_commit, utc_stamp, write_json_atomic
    from .backends import make_backend
    from .cases import load_catalogue

    cat = load_catalogue(args.catalogue)
    cases = [cat.get(n) for n in args.cases.split(",") if n]
    deadline = _deadline(args)
    commit, _dirty = git_commit(Path.cwd())
    if args.backend == "fake":
        backend = make_backend("fake")
    else:
        from .gpu import preflight

        backend = make_backend("cuda", monitor=preflight())
    profile = gpu_profiles.get(args.gpu_profile or gpu_profiles.for_device(backend.gpu["name"]))
    print(f"budgets: backend {backend.name} on {backend.gpu['name']}, predictions with profile {profile.name}", flush=True)
    runs = []
    path = Path(args.results_dir) / backend.gpu["slug"] / f"{utc_stamp()}_{commit}_budgets.json"
    doc = {"schema": "sd-vram/budgets/1", "gpu": backend.gpu, "environment": backend.environment,
           "prediction_profile": profile.name, "runs": runs}
    for case in cases:
        size = case.size(cat.images_dir)
        image, _info = case.load_image(cat.images_dir) if backend.wants_image else (None, None)
        for label, capacity in budget_capacities(case, size, profile).items():
            if deadline is not None and time.time() > deadline:
                print(f"budgets: {case.name} {label}: skipped, time budget exhausted", flush=True)
                continue
            pred = estimate(*size, prompt=case.prompt, vram=capacity + profile.cuda_context, limit="fraction",
                            **{**case.options, "gpu": profile.name}).boundary
            backend.limit(capacity)
            try:
                m = backend.measure(case, image, size=size)
            finally:
                backend.limit(None)
            runs.append({"case": case.name, "height": size[0], "width": size[1], "prompt": case.prompt,
                         "options": dict(case.options), "budget": label, "capacity_bytes": capacity,
                         "predicted": pred.to_dict(), "measurement": m})
            write_json_atomic(path, doc)
            print(f"budgets: {case.name} {label} capacity {capacity:,} B: measured {m['status']} "
                  f"(num_ooms {m.get('num_ooms')}, retries {m.get('num_alloc_retries')}), predicted {pred.verdict}",
                  flush=True)
        del image
    backend.close()
    print(f"budgets: {len(runs)} runs -> {path}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd_vram.plugin.device_tasks")
    sub = p.add_subparsers(dest="task", required=True)
    s = sub.add_parser("snapshot", help="memory-history snapshot of some cases, reduced to JSON")
    s.add_argument("--catalogue", default="cases/catalogue.toml")
    s.add_argument("--cases", required=True, help="comma-separated case names")
    s.add_argument("--results-dir", default="results")
    s.add_argument("--stacks", default="all", choices=("python", "all"))
    s.add_argument("--backend", default="cuda", choices=("cuda", "fake"))
    s.set_defaults(run=snapshot)
    b = sub.add_parser("budgets", help="each case under memory budgets around its boundary")
    b.add_argument("--catalogue", default="cases/catalogue.toml")
    b.add_argument("--cases", required=True, help="comma-separated case names")
    b.add_argument("--results-dir", default="results")
    b.add_argument("--gpu-profile", default=None, help="profile to predict with (default: the one of this GPU)")
    b.add_argument("--backend", default="cuda", choices=("cuda", "fake"))
    b.set_defaults(run=budgets)
    args = p.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
