"""Device-side tasks of scripts/gpu_validate.sh that are not pytest runs.

    python3 -m sd_vram.plugin.device_tasks snapshot --cases balloon-396x380,bench-2048x2048 --results-dir DIR

`snapshot` runs each case once under torch.cuda.memory._record_memory_history and writes
DIR/<gpu-model>/<UTC time>_<commit>_memhistory_<case>.json: the measurement (same code path as `pytest --gpu`) and the snapshot reduced
on the device by memhistory.reduce_snapshot (the raw pickle is far too large to bring back).
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd_vram.plugin.device_tasks")
    sub = p.add_subparsers(dest="task", required=True)
    s = sub.add_parser("snapshot", help="memory-history snapshot of some cases, reduced to JSON")
    s.add_argument("--catalogue", default="cases/catalogue.toml")
    s.add_argument("--cases", required=True, help="comma-separated case names")
    s.add_argument("--results-dir", default="results")
    s.add_argument("--stacks", default="all", choices=("python", "all"))
    s.add_argument("--backend", default="cuda", choices=("cuda", "fake"))
    args = p.parse_args(argv)
    return snapshot(args)


if __name__ == "__main__":
    sys.exit(main())
