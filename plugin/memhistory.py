"""torch.cuda.memory._record_memory_history around one call, reduced on the device to a small JSON.

The raw snapshot (every allocation with its stack) is hundreds of MiB; `reduce_snapshot`
replays the allocator trace and keeps what the equation needs to be checked against:
- the allocations alive at the peak, grouped by where they were made (top Python frame and
  top C++ operator frame) and the largest ones one by one;
- every allocation grouped by frame and size, split into tensor allocations (made through
  at::empty / TensorImpl: an operator's output or a temporary tensor) and raw ones (cuDNN
  and cuBLAS workspaces and other memory taken from the allocator directly).
"""

from __future__ import annotations

import re
from collections import defaultdict

# Distinct allocation sizes kept per (frame, operator) group, largest total first. The
# convolution group holds one size per conv shape; 12 hid every UNet workspace below the
# level-0 ones (truck-4032x3024), 64 keeps them all.
SIZES_KEPT = 64

_ALLOCATOR = re.compile(r"CUDACachingAllocator|c10::cuda::|NativeCachingAllocator|DeviceCachingAllocator|"
                        r"malloc|CUDAAllocator|gather_traceback|CapturedTraceback|record_trace|"
                        r"torch::unwind|unwind::|c10::Allocator|GatheredContext", re.I)
_TENSOR = re.compile(r"\bempty|TensorImpl|resize_|at::detail::empty|make_tensor|new_empty|empty_like", re.I)
_OP = re.compile(r"at::native::|at::cuda::|cudnn|cublas|Workspace|conv|attention|sdp|gemm|mm_out|addmm|bmm|"
                 r"softmax|group_norm|layer_norm|upsample|pad|cat|copy_|to_copy", re.I)


def _is_python(frame: dict) -> bool:
    return str(frame.get("filename", "")).endswith(".py")


def _short_file(path: str) -> str:
    for marker in ("site-packages/", "dist-packages/", "/work/", "/sd_vram/"):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + len(marker):]
    return path.rsplit("/", 1)[-1]


_OUTERMOST = {"<module>", "_run_module_as_main", "_run_code"}


def innermost_first(frames: list[dict]) -> list[dict]:
    """Snapshots list frames innermost first; reverse a list that starts at the program's entry."""
    if frames and _is_python(frames[0]) and frames[0].get("name") in _OUTERMOST:
        return frames[::-1]
    return frames


def frame_keys(frames: list[dict]) -> tuple[str, str, str]:
    """(top Python frame, top C++ operator frame, kind) of one allocation."""
    frames = innermost_first(frames)
    py = next((f"{_short_file(f['filename'])}:{f.get('line')}:{f.get('name')}" for f in frames if _is_python(f)), "?")
    cpp_frames = [str(f.get("name", "")) for f in frames if not _is_python(f)]
    cpp_frames = [n for n in cpp_frames if n and not _ALLOCATOR.search(n)]
    op = next((n for n in cpp_frames if _OP.search(n)), cpp_frames[0] if cpp_frames else "")
    if not cpp_frames:
        kind = "unknown"              # Python-only stacks: tensors and workspaces look alike
    elif any(_TENSOR.search(n) for n in cpp_frames[:12]):
        kind = "tensor"
    else:
        kind = "raw"
    return py, op[:200], kind


def _trace(snapshot: dict, device: int) -> list[dict]:
    traces = snapshot.get("device_traces") or []
    return traces[device] if device < len(traces) else []


def reduce_snapshot(snapshot: dict, device: int = 0, resident_bytes: int = 0, top: int = 40,
                    measured_peak: int | None = None) -> dict:
    """Summary of a memory-history snapshot (see module docstring). Sizes in bytes.

    resident_bytes: memory allocated before recording began (weights), which the trace does
    not see; the traced peak plus it is comparable with max_memory_allocated().
    """
    trace = _trace(snapshot, device)
    live: dict[int, tuple[int, int]] = {}        # addr -> (size, event index)
    requested: set[int] = set()
    keys: dict[int, tuple[str, str, str]] = {}   # event index -> frame keys (allocs only)
    cur = peak = 0
    peak_idx = -1
    seg = seg_peak = 0
    ooms = []
    by_frame: dict = defaultdict(lambda: {"count": 0, "bytes": 0, "max_bytes": 0, "sizes": defaultdict(int)})
    for i, e in enumerate(trace):
        action, addr, size = e.get("action"), e.get("addr"), int(e.get("size", 0))
        if action == "alloc":
            key = keys[i] = frame_keys(e.get("frames") or [])
            live[addr] = (size, i)
            requested.discard(addr)
            cur += size
            g = by_frame[key]
            g["count"] += 1
            g["bytes"] += size
            g["max_bytes"] = max(g["max_bytes"], size)
            g["sizes"][size] += 1
            if cur > peak:
                peak, peak_idx = cur, i
        elif action in ("free_requested", "free_completed"):
            if action == "free_completed" and addr in requested:
                requested.discard(addr)       # already counted at free_requested
                continue
            hit = live.pop(addr, None)
            if hit is not None:
                cur -= hit[0]
                if action == "free_requested":
                    requested.add(addr)
        elif action == "segment_alloc":
            seg += size
            seg_peak = max(seg_peak, seg)
        elif action == "segment_free":
            seg -= size
        elif action == "oom":
            ooms.append({"event": i, "size": size})

    # Replay up to the peak to list what was alive there.
    alive: dict[int, tuple[int, int]] = {}
    requested.clear()
    for i, e in enumerate(trace[: peak_idx + 1]):
        action, addr = e.get("action"), e.get("addr")
        if action == "alloc":
            alive[addr] = (int(e.get("size", 0)), i)
            requested.discard(addr)
        elif action in ("free_requested", "free_completed"):
            if action == "free_completed" and addr in requested:
                requested.discard(addr)
                continue
            if alive.pop(addr, None) is not None and action == "free_requested":
                requested.add(addr)
    at_peak: dict = defaultdict(lambda: {"count": 0, "bytes": 0})
    for size, i in alive.values():
        g = at_peak[keys[i]]
        g["count"] += 1
        g["bytes"] += size
    largest = sorted(alive.values(), reverse=True)[:top]

    def frames_of(i, n=6):
        return [f"{_short_file(str(f.get('filename', '')))}:{f.get('line')}:{f.get('name')}"
                for f in innermost_first(trace[i].get("frames") or [])
                if _is_python(f) or not _ALLOCATOR.search(str(f.get("name", "")))][:n]

    def group_rows(groups, limit):
        rows = []
        for (py, op, kind), g in sorted(groups.items(), key=lambda kv: -kv[1]["bytes"])[:limit]:
            row = {"python": py, "op": op, "kind": kind, **{k: v for k, v in g.items() if k != "sizes"}}
            if "sizes" in g:
                row["sizes"] = dict(sorted(((str(s), c) for s, c in g["sizes"].items()),
                                           key=lambda sc: -int(sc[0]) * sc[1])[:SIZES_KEPT])
            rows.append(row)
        return rows

    kinds = defaultdict(lambda: {"count": 0, "bytes": 0})
    for (py, op, kind), g in by_frame.items():
        kinds[kind]["count"] += g["count"]
        kinds[kind]["bytes"] += g["bytes"]
    raw = {k: v for k, v in by_frame.items() if k[2] == "raw"}
    return {
        "events": len(trace),
        "resident_bytes": resident_bytes,
        "traced_peak_bytes": peak,
        "peak_allocated_bytes": resident_bytes + peak,
        "measured_peak_allocated_bytes": measured_peak,
        "peak_event": peak_idx,
        "segments_peak_bytes": seg_peak,
        "ooms": ooms,
        "at_peak": group_rows(at_peak, top),
        "largest_at_peak": [{"bytes": s, "python_frame": keys[i][0], "op": keys[i][1], "kind": keys[i][2],
                             "frames": frames_of(i)} for s, i in largest],
        "allocations_by_kind": dict(kinds),
        "raw_allocations": group_rows(raw, 5 * top),
        "allocations_by_frame": group_rows(by_frame, 5 * top),
    }


class HistoryRecorder:
    """Context manager factory for CudaBackend.measure(around_call=...): records one call."""

    def __init__(self, stacks: str = "all", max_entries: int = 3_000_000):
        self.stacks, self.max_entries = stacks, max_entries
        self.snapshot = None
        self.error = None

    def __call__(self):
        return self

    def __enter__(self):
        import torch

        rec = torch.cuda.memory._record_memory_history
        try:
            rec(enabled="all", context="alloc", stacks=self.stacks, max_entries=self.max_entries, clear_history=True)
        except TypeError:          # older torch: no clear_history
            rec(enabled="all", context="alloc", stacks=self.stacks, max_entries=self.max_entries)
        return self

    def __exit__(self, *exc):
        import torch

        try:
            self.snapshot = torch.cuda.memory._snapshot()
        except Exception as e:            # keep the measurement even if the snapshot fails
            self.error = f"{type(e).__name__}: {e}"
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        return False


def fake_snapshot() -> dict:
    """A small hand-made snapshot (dry runs): conv output, a cuDNN workspace, an attention temporary."""
    py = {"filename": "/x/site-packages/torch/nn/modules/conv.py", "line": 543, "name": "_conv_forward"}
    empty = {"filename": "??", "line": 0, "name": "at::detail::empty_generic"}
    ws = {"filename": "??", "line": 0, "name": "at::native::cudnn_convolution_forward workspace"}
    alloc = {"filename": "??", "line": 0, "name": "c10::cuda::CUDACachingAllocator::Native::malloc"}
    t = [
        {"action": "segment_alloc", "addr": 0, "size": 64 << 20},
        {"action": "alloc", "addr": 1, "size": 8 << 20, "frames": [alloc, empty, py]},
        {"action": "alloc", "addr": 2, "size": 16 << 20, "frames": [alloc, ws, py]},
        {"action": "free_requested", "addr": 2, "size": 16 << 20},
        {"action": "free_completed", "addr": 2, "size": 16 << 20},
        {"action": "alloc", "addr": 3, "size": 4 << 20, "frames": [alloc, empty, py]},
        {"action": "free_requested", "addr": 1, "size": 8 << 20},
        {"action": "free_completed", "addr": 1, "size": 8 << 20},
    ]
    return {"segments": [], "device_traces": [t]}
