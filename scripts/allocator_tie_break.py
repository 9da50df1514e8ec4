"""Which caching-allocator model matches the GPU: DERIVATION.md section 8's figures.

    python scripts/allocator_tie_break.py        # a few minutes on 2 cores; needs sd-vram[sim] and git

The simulation's allocation streams of the archived H200 cases (those of
tests/test_simulation_vs_gpu.py) are replayed through the allocator model (best fit by size,
then address, as CUDACachingAllocator's BlockComparatorSize) and through the equation's
earlier model (formula/allocator.py at commit 823c94d, best fit by size, then creation order),
and each reserved peak is compared with the GPU's.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLD_MODEL_COMMIT = "823c94d"


def old_segments():
    """The earlier model's Segments class, read from git (it imports only the standard library)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_MODEL_COMMIT}:formula/allocator.py"],
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("old_allocator")
    exec(compile(source, f"{OLD_MODEL_COMMIT}:formula/allocator.py", "exec"), module.__dict__)
    return module.Segments


def creation_order_peak(Segments, events, start: int, expandable: bool) -> int:
    seg, blocks, peak = Segments(expandable), {}, 0
    for i, e in enumerate(events):
        if e.kind == "alloc":
            blocks[e.key] = seg.alloc_one(e.nbytes)
        elif e.kind == "free":
            seg.free_one(blocks.pop(e.key))
        else:   # empty_cache, before the call: release the free whole segments
            for small in (True, False):
                for _, _, b in list(seg._free[small]):
                    if b.prev is None and b.next is None and not expandable:
                        seg._take_free(b)
                        seg.reserved -= b.size
        if i >= start:
            peak = max(peak, seg.reserved)
    return peak


def main() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_simulation_vs_gpu import CASES, EXPANDABLE, NATIVE, archive, case_and_history, simulated

    Segments = old_segments()
    print("| allocator | case | measured reserved MiB | address order (this model) | creation order (823c94d) |")
    print("|---|---|---:|---:|---:|")
    for name, case_id in CASES + [(NATIVE, "square-64x64"), (EXPANDABLE, "square-128x128")]:
        case, _ = case_and_history(name, case_id)
        measured = case["measurement"]["peak_reserved_bytes"]
        expandable = archive(name)["run"]["allocator"] == "expandable_segments"
        r = simulated(name, case_id)
        old = creation_order_peak(Segments, r.events, r.call_start, expandable)
        print(f"| {'expandable' if expandable else 'native'} | {case_id} | {measured / 2**20:,.1f} | "
              f"{(r.peak_reserved - measured) / measured:+.2%} | {(old - measured) / measured:+.2%} |", flush=True)
        simulated.cache_clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
