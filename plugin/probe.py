"""`sd-vram probe`: measure on this GPU and stack what only the GPU knows, and write a profile.

    sd-vram probe                                  # the four seed images and a ladder of sizes
    sd-vram probe photo.jpg 1024x768 --name mygpu  # these sizes; saved as "mygpu"
    sd-vram probe --out mygpu.json --json          # this file; the profile on stdout
    sd-vram probe --channels-last                  # and the NHWC convolutions of --channels-last

Needs torch with CUDA and an NVIDIA driver (extra sd-vram[gpu]); no model weights: the
pipeline is the bundled SD1.5 config with random fp16 weights (memory does not depend on
weight values). In one process, as the GPU suite does (plugin/gpu.py CudaBackend):

- NVML's baseline before CUDA starts, then the CUDA context and library handles as NVML sees
  them beyond torch's reserved memory (after the warm-up calls and again after the probe:
  the larger is kept, since larger calls load more kernels lazily);
- the cuBLAS and cuBLASLt workspaces at the first matmul, checked against the values
  CublasHandlePool.cpp derives for this architecture (formula/kernels.py);
- every distinct convolution of the img2img call at the exact shapes of each size, through
  conv_probe.run_probe (the workspace the caching allocator sees, one conv at a time); with
  --channels-last the call runs again with the UNet and the VAE channels-last (CudaBackend.
  use_build), and its NHWC convolutions are kept under keys ending in ":nhwc", fitted apart;
- the SDPA backend PyTorch picks for each attention call's shapes (torch._fused_sdp_choice),
  checked against the kernel table, and the scratch the call allocates beside its output.

The probe runs the real call at each size, so it never holds more memory than the call.
The profile (formula/gpu_profiles.py, schema sd-vram/gpu-profile/1) holds the facts, the stack
they were measured on and the conv rule set they fit; it goes to the user profile folder
(gpu_profiles.user_dir(): $SD_VRAM_PROFILES or platformdirs' user data dir) unless --out.

`--backend fake` rehearses every step on a CPU (conv_probe's tiny pipeline, made-up numbers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from sd_vram.formula import InputError, estimate, gpu_profiles, kernels

from . import conv_probe

MiB = 1 << 20
# The four provided seed images (../shared/seed-images/README), width x height.
SEED_SIZES = ((396, 380), (800, 534), (2048, 2048), (1800, 1200))
# The ladder beyond them: kept while the call's predicted peak (upper bound) fits the GPU; it
# stops at 3072 so that the default probe stays near a minute (a 3-step call at 4032x3024 took
# 16 s on the H200, results/H200/20261126T052554Z_nogit.json; larger sizes: pass them).
LADDER = (512, 768, 1024, 1536, 3072)
FIT_MARGIN = 0.9            # of the total memory: room for other processes and fragmentation
SDPA_NAMES = {"CUDNN_ATTENTION": "cudnn", "FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient",
              "MATH": "math"}


class ProbeError(InputError):
    """No GPU, no torch, bad sizes: one line and exit 2."""


# --- sizes ------------------------------------------------------------------------------------------

def requested_sizes(images, resolve) -> list[tuple[int, int]]:
    """(width, height) of each IMAGE argument (a file or WIDTHxHEIGHT, via the CLI's resolve)."""
    out = []
    for text in images:
        case = resolve(text)
        out.append((int(case["width"]), int(case["height"])))
    return out


def default_sizes(total_memory: int) -> list[tuple[int, int]]:
    """The seed images, then the ladder squares whose predicted peak (device, upper bound, on
    the default profile) fits FIT_MARGIN of this GPU, smallest first."""
    sizes = list(SEED_SIZES)
    for side in LADDER:
        hi = estimate(side, side).bounds["peak_device_bytes"][1]
        if hi <= FIT_MARGIN * total_memory and (side, side) not in sizes:
            sizes.append((side, side))
    return sizes


# --- measurements -------------------------------------------------------------------------------------

class SdpaProbe:
    """Wraps F.scaled_dot_product_attention: for each new (stage, q, k) shape, the backend
    PyTorch picks and the scratch of the call (the allocator's peak during it minus what is
    allocated after it, i.e. beyond the output), through `meter` (cuda or fake)."""

    def __init__(self, meter, stage: dict):
        self.meter, self.stage = meter, stage
        self.rows: dict[tuple, dict] = {}

    @contextlib.contextmanager
    def installed(self):
        import torch.nn.functional as F

        orig = F.scaled_dot_product_attention

        def wrapper(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
            k = (self.stage.get("name"), tuple(query.shape), tuple(key.shape), attn_mask is not None)
            row = self.rows.get(k)
            if row is None:
                self.meter.before(query)
            out = orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                       scale=scale, **kw)
            if row is None:
                row = self.rows[k] = {"stage": k[0], "query": list(k[1]), "key": list(k[2]), "mask": k[3],
                                      "dtype": str(query.dtype).replace("torch.", ""),
                                      "backend": self.meter.backend(query, key, value, attn_mask, dropout_p, is_causal),
                                      "scratch_bytes": self.meter.after(out), "calls": 0}
            row["calls"] += 1
            return out

        F.scaled_dot_product_attention = wrapper
        try:
            yield self
        finally:
            F.scaled_dot_product_attention = orig


class CudaSdpaMeter:
    def __init__(self):
        import torch

        self.torch = torch

    def before(self, q):
        c = self.torch.cuda
        c.synchronize()
        c.reset_peak_memory_stats()

    def after(self, out) -> int:
        c = self.torch.cuda
        c.synchronize()
        return c.max_memory_allocated() - c.memory_allocated()

    def backend(self, q, k, v, mask, dropout_p, is_causal) -> str:
        from torch.nn.attention import SDPBackend

        try:
            return SDPBackend(int(self.torch._fused_sdp_choice(q, k, v, mask, dropout_p, is_causal))).name
        except Exception as e:               # private API: the probe goes on without it
            return f"unknown ({type(e).__name__})"


class FakeSdpaMeter:
    """CPU rehearsal: cuDNN everywhere but head dims > 256 (memory-efficient, with the fp32
    accumulator as scratch); made up, not a model of the GPU."""

    def before(self, q):
        pass

    def after(self, out) -> int:
        d = out.shape[-1]
        return out.numel() * 4 if d > 128 else 0

    def backend(self, q, k, v, mask, dropout_p, is_causal) -> str:
        return "EFFICIENT_ATTENTION" if q.shape[-1] > 256 else "CUDNN_ATTENTION"


class FakeHardware:
    """The CPU rehearsal's stand-in for CudaBackend: plugin/backends.FakeBackend's made-up
    hardware constants, conv_probe's tiny pipeline."""

    def __init__(self):
        from .backends import FakeBackend

        fake = FakeBackend()
        self.hardware = dict(fake.hardware)
        self.hardware["cublaslt_extra_allocated_bytes"] = 1 * MiB
        self.gpu = {**fake.gpu, "compute_capability": "9.0", "multi_processor_count": 132, "nvml_matched": True}
        self.environment = {**fake.environment, "gpu": dict(self.gpu)}   # the fake suite's stack
        self.pipe = conv_probe.build_fake_pipeline()

    def use_channels_last(self) -> None:
        self.pipe = None
        self.pipe = conv_probe.build_fake_pipeline(channels_last=True)

    def context_now(self) -> int:
        return self.hardware["context_after_warmup_bytes"]


class CudaHardware:
    """CudaBackend's per-process measurements (NVML, cuBLAS, warm-up) and its pipeline."""

    def __init__(self):
        from . import gpu

        try:
            monitor = gpu.preflight()
        except RuntimeError as e:
            raise ProbeError(f"no usable NVIDIA GPU here: {e}") from None
        self.backend = gpu.CudaBackend(monitor=monitor, warmup=True)
        self.hardware, self.gpu, self.pipe = self.backend.hardware, self.backend.gpu, self.backend.pipe
        self.environment = dict(self.backend.environment)

    def use_channels_last(self) -> None:
        """The same build with the UNet and the VAE channels-last (the old weights freed first)."""
        self.pipe = None
        self.backend.use_build(self.backend.dtype_name, channels_last=True)
        self.pipe = self.backend.pipe

    def context_now(self) -> int | None:
        return self.backend._nvml_over_reserved()


def _version_pair(text) -> tuple[int, int]:
    parts = [int(p) for p in str(text).split("+")[0].split(".")[:2] if p.isdigit()]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def stack_of(env: dict) -> dict:
    """What a probed profile was measured on (gpu_profiles.STACK_KEYS and more)."""
    e = env.get("env") or {}
    return {"torch": env.get("torch"), "cuda": env.get("cuda"), "cudnn": env.get("cudnn"),
            "driver": env.get("driver"), "diffusers": env.get("diffusers"),
            "cudnn_enabled": env.get("cudnn_enabled"), "cudnn_benchmark": env.get("cudnn_benchmark"),
            "cudnn_deterministic": env.get("cudnn_deterministic"),
            "PYTORCH_CUDA_ALLOC_CONF": e.get("PYTORCH_CUDA_ALLOC_CONF"),
            "CUBLAS_WORKSPACE_CONFIG": e.get("CUBLAS_WORKSPACE_CONFIG"),
            "CUBLASLT_WORKSPACE_SIZE": e.get("CUBLASLT_WORKSPACE_SIZE"),
            "TORCH_CUBLASLT_UNIFIED_WORKSPACE": e.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE"),
            "TORCH_CUDNN_SDPA_DEPRIORITIZED": e.get("TORCH_CUDNN_SDPA_DEPRIORITIZED")}


def _nhwc(row: dict) -> bool:
    return row.get("layout") == "nhwc"


def conv_workspaces(rows: list[dict]) -> dict[str, int]:
    """kernels.conv_key (":nhwc" for a channels-last filter's row) -> the largest workspace
    seen (bytes cuDNN asked for where the allocator counts them exactly, else the allocator's
    blocks)."""
    out = {}
    for r in rows:
        seen = [w["requested_bytes"] if w["requested_bytes"] is not None else w["allocated_bytes"]
                for w in r["workspaces"]]
        if seen:
            out[kernels.conv_key(r["module"], r["input"]["shape"], _nhwc(r))] = max(0, max(seen))
    return out


def fit_rules(rows: list[dict], prefer: str = "nchw_transpose") -> dict:
    """How well each named rule set predicts the measured rows (of one layout): {set: [rows
    within conv_probe.TOLERANCE (+ 2 MiB on allocator blocks), rows]}, and the best set (a tie
    goes to `prefer`)."""
    scores = {}
    for name in kernels.CONV_RULE_SETS:
        ws = kernels.ConvWorkspace(kernels.conv_rules(name))
        hit = n = 0
        for r in rows:
            k = tuple(r["kernel_size"])
            shape = r["input"]["shape"]
            for w in r["workspaces"]:
                exact = w["requested_bytes"] is not None
                got = w["requested_bytes"] if exact else w["allocated_bytes"]
                want = ws(r["module"], k, shape, r["input"]["bytes"], r["output"]["bytes"], r["weight"]["bytes"])
                n += 1
                hit += abs(got - want) <= conv_probe.TOLERANCE + (0 if exact else 2 * MiB)
        scores[name] = [hit, n]
    best = max(scores, key=lambda s: (scores[s][0], s == prefer))
    return {"best": best, "scores": scores}


def sdpa_checks(rows: list[dict], profile) -> list[dict]:
    """Each measured backend beside the kernel table's choice for the same call."""
    out = []
    for r in rows:
        b, h, n, d = r["query"]
        call = kernels.SdpaCall(batch=b, heads=h, q_len=n, kv_len=r["key"][2], d_qk=d, d_v=r["key"][3],
                                d_k=r["key"][3], dtype=r["dtype"], mask=r["mask"])
        table = kernels.sdpa_backend(profile, "auto", call)
        out.append({**r, "table": table, "agrees": SDPA_NAMES.get(r["backend"]) == table})
    return out


def probe(sizes, hw, sdpa_meter, conv_meter, device_kind: str, name: str | None,
          channels_last: bool = False) -> tuple:
    """Run the measurements on `hw` (channels_last: then once more with the UNet and the VAE
    channels-last, for the NHWC convolutions); returns (profile, info for the file)."""
    t0 = time.perf_counter()
    env, hard, g = hw.environment, hw.hardware, hw.gpu
    stage = {"name": None}
    sp = SdpaProbe(sdpa_meter, stage)
    from sd_vram.stages import stage_hooks

    def on_stage(n):
        stage["name"] = n

    hw_sizes = [(h, w) for w, h in sizes]
    deadline = os.environ.get("SD_VRAM_DEADLINE")          # epoch seconds (the GPU scripts): later sizes skip
    passes = [False, True] if channels_last else [False]
    result = {"calls": [], "rows": []}
    nchw_context = None
    for nhwc in passes:
        if nhwc:
            nchw_context = hw.context_now()        # before the NHWC kernels' modules load
            hw.use_channels_last()
        with sp.installed(), stage_hooks(hw.pipe, on_stage):
            one = conv_probe.run_probe(hw.pipe, hw_sizes, conv_meter, device_kind=device_kind,
                                       deadline=float(deadline) if deadline else None)
        result["calls"] += [{**c, "layout": "nhwc" if nhwc else "nchw"} for c in one["calls"]]
        result["rows"] += [r for r in one["rows"] if _nhwc(r) == nhwc]   # the safety checker's: measured once
    # the profile's context is the NCHW call's; a channels-last pass loads more modules (kept in measured)
    after = nchw_context if channels_last else hw.context_now()
    context = max(c for c in (hard.get("context_after_warmup_bytes"), after,
                              hard.get("context_and_handles_bytes")) if c is not None) if g.get("nvml_matched") else None
    cc = _version_pair(g["compute_capability"])
    stack = stack_of(env)
    base = gpu_profiles.get("default")
    cublas = hard.get("cublas_workspace_allocated_bytes")
    cublaslt = hard.get("cublaslt_extra_allocated_bytes")
    fit = fit_rules([r for r in result["rows"] if not _nhwc(r)])
    nhwc_rows = [r for r in result["rows"] if _nhwc(r)]
    fit_nhwc = fit_rules(nhwc_rows, prefer=kernels.NHWC_CONV_RULE_SET) if nhwc_rows else None
    digest = hashlib.sha1(json.dumps([g["name"], stack], sort_keys=True).encode()).hexdigest()[:6]
    profile = gpu_profiles.GPUProfile(
        name=name or f"{g['slug'].lower()}-{digest}", gpu=g["name"], compute_capability=cc,
        torch_version=_version_pair(env.get("torch")), cudnn_version=env.get("cudnn"),
        cuda_version=_version_pair(env.get("cuda") or "0.0"),
        cuda_context=context if context is not None else base.cuda_context,
        cuda_context_measured=context is not None,
        total_memory=g["total_memory_bytes"], multiprocessor_count=g.get("multi_processor_count") or 0,
        cublas_workspace=cublas, cublaslt_workspace=cublaslt,
        conv_workspace_rule=fit["best"], conv_workspaces=conv_workspaces(result["rows"]),
        conv_workspace_rule_nhwc=fit_nhwc["best"] if fit_nhwc else kernels.NHWC_CONV_RULE_SET,
        source="probe", stack=stack,
        cudnn_sdpa_deprioritized=str((env.get("env") or {}).get("TORCH_CUDNN_SDPA_DEPRIORITIZED") or "").strip().upper()
        in ("1", "ON", "YES", "TRUE", "Y"),
        measured={"derived_cublas_workspace": kernels.cublas_workspace(cc),
                  "derived_cublaslt_workspace": kernels.cublaslt_workspace(cc),
                  "sizes": [f"{w}x{h}" for w, h in sizes], "conv_rule_fit": fit["scores"],
                  **({"conv_rule_fit_nhwc": fit_nhwc["scores"],
                      "cuda_context_after_channels_last_pass": hw.context_now()} if fit_nhwc else {}),
                  "cuda_context": "NVML used (v1) minus torch reserved, the largest of after the warm-up "
                                  "calls and after the probe" if context is not None else
                                  "not measured (NVML did not match the device): the default profile's"})
    info = {"sdpa": sdpa_checks(list(sp.rows.values()), profile),
            "probe": {"calls": result["calls"], "conv_rows": len(result["rows"]),
                      "seconds": round(time.perf_counter() - t0 + hard.get("setup_s", 0), 2),
                      "environment": env}}
    return profile, info


# --- output ---------------------------------------------------------------------------------------

def _mib(n) -> str:
    return "-" if n is None else f"{n / MiB:,.1f} MiB"


def table(profile, info) -> list[str]:
    m = profile.measured
    lines = [f"sd-vram probe: {profile.gpu} (sm{profile.compute_capability[0]}{profile.compute_capability[1]}), "
             f"torch {profile.stack.get('torch')}, CUDA {profile.stack.get('cuda')}, cuDNN {profile.cudnn_version}, "
             f"driver {profile.stack.get('driver')}"]

    def check(measured, derived):
        return "= derived" if measured == derived else f"derived {_mib(derived)}: differs"

    lines.append(f"  CUDA context + handles  {_mib(profile.cuda_context):>14}  "
                 f"{'NVML' if profile.cuda_context_measured else 'not measured'}")
    lines.append(f"  cuBLAS workspace        {_mib(profile.cublas_workspace):>14}  "
                 f"{check(profile.cublas_workspace, m['derived_cublas_workspace'])}")
    lines.append(f"  cuBLASLt workspace      {_mib(profile.cublaslt_workspace):>14}  "
                 f"{check(profile.cublaslt_workspace, m['derived_cublaslt_workspace'])}")
    calls = info["probe"]["calls"]
    ok = list(dict.fromkeys(c["size"] for c in calls if c["status"] == "ok"))
    bad = [f"{c['size']} {c.get('layout', 'nchw')} ({c['status']})" for c in calls if c["status"] != "ok"]
    nhwc = sum(k.endswith(kernels.NHWC_KEY) for k in profile.conv_workspaces)
    lines.append(f"  convolutions            {len(profile.conv_workspaces):>10} shapes"
                 + (f" ({nhwc} NHWC)" if nhwc else "") + f" at {', '.join(ok) or 'no size'}"
                 + (f"; failed: {', '.join(bad)}" if bad else ""))
    for key, rule, layout in (("conv_rule_fit", profile.conv_workspace_rule, ""),
                              ("conv_rule_fit_nhwc", profile.conv_workspace_rule_nhwc, " (NHWC)")):
        if key in m:
            hit, n = m[key][rule]
            lines.append(f"  conv rule fitted{layout:<8}{rule:>14}  {hit} of {n} measurements")
    top = sorted(profile.conv_workspaces.items(), key=lambda kv: -kv[1])[:3]
    for key, v in top:
        lines.append(f"    {_mib(v):>14}  {key}")
    for r in info["sdpa"]:
        flag = "" if r["agrees"] else f"  (kernel table: {r['table']})"
        lines.append(f"  sdpa {str(r['stage']):<15} q {r['query']} k {r['key'][2]} -> {r['backend']}, scratch {_mib(r['scratch_bytes'])}"
                     + flag)
    lines.append(f"  {info['probe']['seconds']} s")
    return lines


def run(args, resolve) -> int:
    """The probe subcommand (sd_vram/cli.py wires it); InputError -> one line, exit 2."""
    sizes = requested_sizes(args.images, resolve)          # bad input fails before anything starts
    if args.backend == "fake":
        hw, sdpa_meter, conv_meter, kind = FakeHardware(), FakeSdpaMeter(), conv_probe.FakeMeter(), "cpu"
    else:
        try:
            import torch
        except ImportError:
            raise ProbeError("sd-vram probe needs torch with CUDA: pip install 'sd-vram[gpu]'") from None
        if not torch.cuda.is_available():
            raise ProbeError(f"no CUDA GPU here (torch {torch.__version__}, CUDA build {torch.version.cuda}): "
                             "the probe measures an NVIDIA GPU")
        hw, sdpa_meter, conv_meter, kind = CudaHardware(), CudaSdpaMeter(), conv_probe.CudaMeter(), "cuda"
    sizes = sizes or default_sizes(hw.gpu["total_memory_bytes"])
    profile, info = probe(sizes, hw, sdpa_meter, conv_meter, kind, args.name, channels_last=args.channels_last)
    path = Path(args.out) if args.out else gpu_profiles.user_dir() / f"{profile.name}.json"
    gpu_profiles.write(profile, path, **info)
    gpu_profiles.read(path)                                # what was written reads back
    if args.json:
        print(json.dumps(gpu_profiles.to_json(profile, **info), indent=1))
    else:
        print("\n".join(table(profile, info)))
    print(f"sd-vram probe: wrote {path}; use it with --gpu-profile {profile.name if not args.out else path}",
          file=sys.stderr if args.json else sys.stdout)
    return 0 if all(c["status"] == "ok" for c in info["probe"]["calls"]) else 1
