"""SimResult: the replayed peaks of one simulated call, with what was alive at them."""

from __future__ import annotations

from dataclasses import dataclass, field

from sd_vram.stages import STAGES

from sd_vram.formula.allocator import CachingAllocator, OutOfMemoryError, apply, round_size


@dataclass
class LiveTensor:
    bytes: int          # size of the caching allocator block it occupies (sums to allocated)
    requested: int      # storage nbytes
    op: str
    module: str
    stage: str
    shape: tuple
    dtype: str

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "requested": self.requested, "op": self.op,
                "module": self.module, "stage": self.stage, "shape": list(self.shape),
                "dtype": self.dtype}


@dataclass
class StageSim:
    allocated: int
    reserved: int
    operation: str
    module: str
    event_index: int


@dataclass
class SimResult:
    height: int
    width: int
    peak_allocated: int
    peak_reserved: int
    peak_stage: str
    peak_operator: str
    peak_module: str
    peak_index: int
    stages: dict[str, StageSim]
    live_at_peak: list[LiveTensor]
    sdpa_backends: dict[str, str]
    options: dict
    gpu_profile: str
    weights_bytes: int               # the weights' allocator blocks before the call
    unet_evals: int
    seconds: float
    expandable_segments: bool = False
    events: list = field(default_factory=list, repr=False)
    allocated_series: list[int] = field(default_factory=list, repr=False)
    reserved_series: list[int] = field(default_factory=list, repr=False)
    call_start: int = 0
    resident_allocated: int = 0      # before the call: weights + cuBLAS/cuBLASLt workspaces
    resident_reserved: int = 0
    # NVML's view: peak_reserved + the profile's CUDA context and library handles (not
    # simulated; the H200 archive measured 697-715 MiB above torch's reserved memory)
    peak_device: int = 0
    # under a capacity (simulate(..., vram=...)): convolutions run without their workspace
    # (stage, module), cached segments released, and where the call ran out of memory
    fallbacks: list = field(default_factory=list)
    num_alloc_retries: int = 0
    oom: dict | None = None

    # -- diagnosis ----------------------------------------------------------------------
    def live_at(self, index: int) -> list[LiveTensor]:
        """Tensors alive just after event `index`, largest first."""
        live = {}
        for ev in self.events[: index + 1]:
            if ev.kind == "alloc" and ev.block != -1:   # -1: a workspace cuDNN ran without
                live[ev.key] = ev
            elif ev.kind == "free":
                live.pop(ev.key, None)
        out = [LiveTensor(e.block or round_size(e.nbytes), e.nbytes, e.op, e.module, e.stage, e.shape, e.dtype)
               for e in live.values()]
        out.sort(key=lambda t: -t.bytes)
        return out

    def stage_live(self, stage: str) -> list[LiveTensor]:
        return self.live_at(self.stages[stage].event_index)

    def to_dict(self, live_limit: int = 20) -> dict:
        return {
            "height": self.height,
            "width": self.width,
            "peak_allocated_bytes": self.peak_allocated,
            "peak_reserved_bytes": self.peak_reserved,
            "peak_device_bytes": self.peak_device,
            "peak_stage": self.peak_stage,
            "peak_operator": self.peak_operator,
            "peak_module": self.peak_module,
            "stages": {name: {"allocated_bytes": s.allocated, "reserved_bytes": s.reserved,
                              "operation": s.operation, "module": s.module}
                       for name, s in self.stages.items()},
            "live_at_peak": [t.to_dict() for t in self.live_at_peak[:live_limit]],
            "sdpa_backends": dict(self.sdpa_backends),
            "weights_bytes": self.weights_bytes,
            "resident_allocated_bytes": self.resident_allocated,
            "resident_reserved_bytes": self.resident_reserved,
            "unet_evaluations_simulated": self.unet_evals,
            "expandable_segments": self.expandable_segments,
            "options": dict(self.options),
            "gpu_profile": self.gpu_profile,
            "seconds": round(self.seconds, 3),
        }

    # -- plot ---------------------------------------------------------------------------
    def plot_timeline(self, path, title: str | None = None) -> str:
        """PNG of allocated and reserved memory over the call's events, stages shaded."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        start = self.call_start
        alloc = [a / 2**30 for a in self.allocated_series[start:]]
        res = [r / 2**30 for r in self.reserved_series[start:]]
        xs = list(range(start, start + len(alloc)))
        fig, ax = plt.subplots(figsize=(12, 5), dpi=110)
        # stage spans
        colors = ["#e8f1fa", "#fdf0e1", "#e9f6e9", "#f6e8f3", "#fff9db", "#eeeeee"]
        spans = []
        cur, begin = None, start
        for i in range(start, start + len(alloc)):
            st = self.events[i].stage
            if st != cur:
                if cur is not None:
                    spans.append((cur, begin, i))
                cur, begin = st, i
        if cur is not None:
            spans.append((cur, begin, start + len(alloc)))
        seen = set()
        for name, a, b in spans:
            c = colors[STAGES.index(name) % len(colors)] if name in STAGES else "#f4f4f4"
            ax.axvspan(a, b, color=c, alpha=0.9, lw=0, label=None if name in seen else name)
            seen.add(name)
        ax.plot(xs, res, color="#888888", lw=1.0, label="reserved")
        ax.plot(xs, alloc, color="#1f5fa8", lw=1.0, label="allocated")
        ax.plot([self.peak_index], [self.peak_allocated / 2**30], "o", color="#c0392b")
        ax.annotate(f"peak {self.peak_allocated / 2**30:.2f} GiB\n{self.peak_stage}: {self.peak_operator}",
                    (self.peak_index, self.peak_allocated / 2**30), textcoords="offset points",
                    xytext=(8, 8), fontsize=8, color="#c0392b")
        ax.set_xlabel("allocator event")
        ax.set_ylabel("GiB")
        ax.set_title(title or f"sd-vram simulation {self.width}x{self.height} ({self.gpu_profile})")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_ylim(bottom=0)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return str(path)


def build_result(recorder, start, end, info, *, height, width, options, profile,
                 expandable_segments=False, capacity: int | None = None) -> SimResult:
    """Replay the events through the allocator model and read the peaks as the GPU suite
    does (plugin/gpu.py measure): reset_peak_memory_stats() before the call and at every
    stage boundary, so a stage's peak starts from the level at its boundary.

    capacity: the bytes the allocator may reserve. A cuDNN workspace that cannot be had is
    skipped (the next engine of cuDNN's list, down to none: Conv_v8.cpp try_configs); any
    other allocation that fails ends the replay there (SimResult.oom)."""
    events = recorder.events[:end]
    alloc = CachingAllocator(total_memory=profile.total_memory, capacity=capacity, conf=options.allocator)
    blocks: dict = {}
    a_series, r_series = [], []
    stage_peak: dict[str, list] = {}
    peak_a, peak_i, peak_r = -1, -1, 0
    resident = (0, 0)
    weight_keys: set = set()
    weights_bytes = 0
    prev_stage = None
    skipped: set = set()          # workspaces cuDNN ran without (their free is skipped too)
    fallbacks: list[tuple[str, str]] = []
    oom = None
    for i, ev in enumerate(events):
        if i == start:
            resident = (alloc.stats.allocated, alloc.stats.reserved)
            weights_bytes = sum(blocks[k].size for k in weight_keys)
        if i >= start and ev.stage != prev_stage:
            # reset_peak_memory_stats() at the boundary: the level there counts for the stage
            a0, r0 = alloc.stats.allocated, alloc.stats.reserved
            sp = stage_peak.setdefault(ev.stage, [a0, r0, max(i - 1, 0)])
            if a0 > sp[0]:
                sp[0], sp[2] = a0, max(i - 1, 0)
            sp[1] = max(sp[1], r0)
            prev_stage = ev.stage
        if ev.kind == "free" and ev.key in skipped:
            skipped.discard(ev.key)
        else:
            try:
                block = apply(alloc, blocks, ev)
            except OutOfMemoryError as e:
                if ev.op != "cudnn_convolution:workspace":
                    oom = (ev, e)
                    break
                skipped.add(ev.key)       # Conv_v8.cpp try_configs: the next engine, none at last
                fallbacks.append((ev.stage, ev.module))
                ev.block = -1             # run without: live_at leaves it out
                block = None
            if block is not None:
                ev.block = block.size
                if i < start and ev.op.startswith("weights:") and not ev.op.endswith(":arange"):
                    weight_keys.add(ev.key)
            elif ev.kind == "free":
                weight_keys.discard(ev.key)
        a, r = alloc.stats.allocated, alloc.stats.reserved
        a_series.append(a)
        r_series.append(r)
        if i >= start:
            if a > peak_a:
                peak_a, peak_i = a, i
            peak_r = max(peak_r, r)
            sp = stage_peak[ev.stage]
            if a > sp[0]:
                sp[0], sp[2] = a, i
            sp[1] = max(sp[1], r)
    if oom is not None:
        events = events[:i]           # the replay stopped at the failed allocation
    if start >= len(events):
        resident = (alloc.stats.allocated, alloc.stats.reserved)
        weights_bytes = sum(blocks[k].size for k in weight_keys)
    stages = {}
    for name in STAGES:
        if name in stage_peak:
            a, r, i = stage_peak[name]
            stages[name] = StageSim(a, r, _op_at(events, i), events[i].module if i >= 0 else "", i)
    peak_ev = events[peak_i] if peak_i >= 0 else None
    res = SimResult(
        height=height, width=width,
        peak_allocated=max(peak_a, 0), peak_reserved=peak_r,
        peak_stage=peak_ev.stage if peak_ev else "", peak_operator=_op_at(events, peak_i),
        peak_module=peak_ev.module if peak_ev else "", peak_index=peak_i, stages=stages,
        live_at_peak=[], sdpa_backends={_fmt_key(k): v for k, v in info.get("sdpa", {}).items()},
        options=options.to_dict(), gpu_profile=profile.name, weights_bytes=weights_bytes,
        unet_evals=info.get("unet_evals", 0), seconds=info.get("seconds", 0.0),
        expandable_segments=expandable_segments, events=events, allocated_series=a_series,
        reserved_series=r_series, call_start=start, resident_allocated=resident[0],
        resident_reserved=resident[1], peak_device=peak_r + (getattr(profile, "cuda_context", 0) or 0),
        fallbacks=fallbacks, num_alloc_retries=alloc.stats.num_alloc_retries)
    if oom is not None:
        ev, e = oom
        res.oom = {"stage": ev.stage, "operation": ev.op, "module": ev.module, "requested_bytes": e.requested,
                   "allocated_bytes": e.allocated, "reserved_bytes": e.reserved}
    if peak_i >= 0:
        res.live_at_peak = res.live_at(peak_i)
    return res


def _op_at(events, i) -> str:
    if i < 0:
        return ""
    return events[i].op


def _fmt_key(k) -> str:
    model, q, kshape, mask = k
    b, h, n, d = q
    return f"{model} B={b} heads={h} q={n} kv={kshape[2]} d={d}" + (" mask" if mask else "")
