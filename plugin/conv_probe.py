"""Workspace of every convolution of the img2img call, measured one convolution at a time.

    python3 -m sd_vram.plugin.conv_probe --results-dir results --sizes 64x64,640x427,2048x2048
    python3 -m sd_vram.plugin.conv_probe --out probe.json --sizes 512x512
    python3 -m sd_vram.plugin.conv_probe --summary results/H100-80GB-HBM3/..._conv_probe.json

cuDNN takes its convolution workspace from PyTorch's caching allocator during the
convolution, so it shows in max_memory_allocated() but in no tensor. The probe builds the
suite's pipeline (bundled SD1.5 config, random fp16 weights) once, hooks every nn.Conv2d of
the UNet, the VAE (encoder, decoder, quant_conv, post_quant_conv) and the safety checker's
patch embedding, and runs the real call (guidance 5.0, strength 0.8, 3 steps: 3 UNet
evaluations) at each size. Around each convolution: synchronize and reset_peak_memory_stats()
in the pre-hook, synchronize and read the counters in the post-hook; then

    workspace = peak during the conv - allocated before - the output's allocated bytes
              = max_memory_allocated() - memory_allocated() after the conv
                (less the NHWC copy of an NCHW input a channels-last filter makes, alive with it)

for the allocator's block sizes and, exactly, for the bytes requested (memory_stats()
"requested_bytes.all.*"). Each workspace is matched against input/output/weight byte sums
(RULES). Resetting the peak counters at every convolution spoils stage peaks, so the probe is
a process of its own and writes its own schema, "sd-vram/conv-probe/1" (results/README.md),
never a case result.

`--backend fake` rehearses it on a CPU: a tiny SD-shaped pipeline in fp32 and made-up
workspaces (FakeMeter), so the script that runs it on the GPU is tested before device time is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from sd_vram.formula.allocator import block_bytes
from sd_vram.formula.files import write_text_atomic

from .environment import cuda_environment, fake_environment

SCHEMA = "sd-vram/conv-probe/1"
DEFAULT_SIZES = "64x64,128x128,256x256,512x512,640x427,1024x1024,2048x2048"
PROMPT = "a photo of a red bicycle leaning against a weathered brick wall"
CALL = {"guidance_scale": 5.0, "strength": 0.8, "num_inference_steps": 3, "output_type": "pil"}
# cuDNN pads the workspace it asks for by a few hundred bytes; a sum this close counts as a match.
TOLERANCE = 4096
# Candidate rules, in the order a tie is resolved.
RULES = ("0", "in+out+weight", "in+out", "in+weight", "out+weight", "in", "out", "weight")
MiB = 1 << 20


class ProbeError(Exception):
    """Bad input on the command line: one line, no traceback."""


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'640x427,64x64' (WIDTHxHEIGHT) -> [(427, 640), (64, 64)] as (height, width)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        w, sep, h = part.lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit():
            raise ProbeError(f"bad size {part!r}: write WIDTHxHEIGHT, e.g. 640x427")
        w, h = int(w), int(h)
        if w < 8 or h < 8:
            raise ProbeError(f"bad size {part!r}: width and height must be at least 8")
        out.append((h, w))
    if not out:
        raise ProbeError("no size given (--sizes WIDTHxHEIGHT[,...])")
    return out


def classify(ws: int | None, in_b: int, out_b: int, w_b: int, tol: int = TOLERANCE) -> tuple[str, int | None]:
    """(rule, ws - the rule's bytes) of the closest rule within tol, else ('other', None)."""
    if ws is None:
        return "unknown", None
    sums = {"0": 0, "in+out+weight": in_b + out_b + w_b, "in+out": in_b + out_b, "in+weight": in_b + w_b,
            "out+weight": out_b + w_b, "in": in_b, "out": out_b, "weight": w_b}
    best = min(RULES, key=lambda r: (abs(ws - sums[r]), RULES.index(r)))
    delta = ws - sums[best]
    return (best, delta) if abs(delta) <= tol else ("other", None)


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _tensor_info(t) -> dict:
    from sd_vram.models import is_channels_last

    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "strides": list(t.stride()),
            "contiguous": t.is_contiguous(), "channels_last": is_channels_last(t), "bytes": _nbytes(t)}


def nhwc_input_copy(x, weight) -> int:
    """Bytes of the NHWC copy of an NCHW input that _convolution makes for a channels-last
    filter (models.copies_to_nhwc, formula/kernels.py section 4b), alive with the workspace: 0
    when there is none."""
    from sd_vram.models import copies_to_nhwc

    return _nbytes(x) if copies_to_nhwc(x, weight) else 0


# --- meters -------------------------------------------------------------------------------------

class CudaMeter:
    """The caching allocator's counters around one convolution (see the module docstring)."""

    name = "cuda"

    def __init__(self):
        import torch

        self.cuda = torch.cuda

    def before(self, module, x) -> None:
        c = self.cuda
        c.synchronize()
        c.reset_peak_memory_stats()
        self.alloc0 = c.memory_allocated()
        st = c.memory_stats()
        self.req0 = st.get("requested_bytes.all.current")
        if st.get("requested_bytes.all.peak") != self.req0:
            self.req0 = None                 # this torch does not reset that peak: no exact figure

    def after(self, module, x, out) -> dict:
        c = self.cuda
        c.synchronize()
        peak = c.max_memory_allocated()
        alloc1 = c.memory_allocated()
        st = c.memory_stats()
        rpeak, req1 = st.get("requested_bytes.all.peak"), st.get("requested_bytes.all.current")
        exact = None not in (rpeak, req1, self.req0)
        return {
            "requested_bytes": rpeak - req1 if exact else None,
            "allocated_bytes": peak - alloc1,
            "output_requested_bytes": req1 - self.req0 if exact else None,
            "output_allocated_bytes": alloc1 - self.alloc0,
            # If a workspace were freed before the output was allocated, this would be it.
            "peak_over_before_bytes": peak - self.alloc0,
        }


class FakeMeter:
    """CPU rehearsal: made-up workspaces, not a model of cuDNN. 3x3 stride-1 convs get
    in+out+weight+256 B, 1x1 convs nothing, every other conv 56 MiB; with a channels-last
    filter, an NCHW input's NHWC copy is counted as CUDA counts it (nhwc_input_copy)."""

    name = "fake"

    def before(self, module, x) -> None:
        pass

    def after(self, module, x, out) -> dict:
        k, s = tuple(module.kernel_size), tuple(module.stride)
        if k == (1, 1):
            ws = 0
        elif k == (3, 3) and s == (1, 1):
            ws = _nbytes(x) + _nbytes(out) + _nbytes(module.weight) + 256
        else:
            ws = 56 * MiB
        o, copy = _nbytes(out), nhwc_input_copy(x, module.weight)
        blocks = block_bytes(ws) + (block_bytes(copy) if copy else 0)
        return {"requested_bytes": ws + copy, "allocated_bytes": blocks, "output_requested_bytes": o,
                "output_allocated_bytes": block_bytes(o), "peak_over_before_bytes": blocks + block_bytes(o)}


# --- the probe ----------------------------------------------------------------------------------

def conv_modules(pipe) -> list[tuple[str, object]]:
    """(qualified name, module) of every nn.Conv2d in the UNet, the VAE and the safety checker."""
    import torch.nn as nn

    out = []
    for prefix in ("unet", "vae", "safety_checker"):
        root = getattr(pipe, prefix, None)
        if root is None:
            continue
        for name, m in root.named_modules():
            if isinstance(m, nn.Conv2d):
                out.append((f"{prefix}.{name}", m))
    return out


def _conv_backend(module, x) -> str | None:
    """The convolution backend PyTorch picks for this call (e.g. 'Cudnn'), or None."""
    import torch

    try:
        if isinstance(module.padding, str):
            return None
        b = torch._C._select_conv_backend(x, module.weight, module.bias, list(module.stride), list(module.padding),
                                          list(module.dilation), False, [0, 0], module.groups)
        return str(b).rsplit(".", 1)[-1]
    except Exception as e:               # private API: keep the probe running whatever it does
        return f"? ({type(e).__name__})"


class Recorder:
    """Conv pre/post hooks feeding one meter; rows keyed by (module name, input shape)."""

    def __init__(self, meter, stage: dict):
        self.meter, self.stage = meter, stage
        self.rows: dict[tuple, dict] = {}
        self.size = None            # "WxH" of the call being probed
        self.calls = 0
        self._x = None

    def pre(self, name):
        def hook(module, args):
            x = args[0]
            self._x = (x, self.stage.get("name"))
            self.meter.before(module, x)
        return hook

    def post(self, name):
        def hook(module, args, out):
            x, stage = self._x
            self._x = None
            m = self.meter.after(module, x, out)
            self.calls += 1
            self.add(name, module, x, out, stage, m)
        return hook

    def add(self, name, module, x, out, stage, m) -> None:
        key = (name, tuple(x.shape))
        row = self.rows.get(key)
        if row is None:
            w = _tensor_info(module.weight)
            row = self.rows[key] = {
                "module": name, "stage": stage, "input": _tensor_info(x), "weight": w,
                "bias_bytes": _nbytes(module.bias) if module.bias is not None else 0,
                "output": _tensor_info(out),
                "kernel_size": list(module.kernel_size), "stride": list(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                "dilation": list(module.dilation), "groups": module.groups, "padding_mode": module.padding_mode,
                "conv_backend": _conv_backend(module, x), "image_sizes": [], "calls": 0, "workspaces": [],
                "layout": "nhwc" if w["channels_last"] else "nchw",
            }
        row["calls"] += 1
        if self.size not in row["image_sizes"]:
            row["image_sizes"].append(self.size)
        if list(x.stride()) != row["input"]["strides"] and list(x.stride()) not in row.setdefault("other_strides", []):
            row["other_strides"].append(list(x.stride()))
        copy = nhwc_input_copy(x, module.weight)
        if copy:            # the workspace is what the conv holds beyond its NHWC input copy
            m = {**m, "input_copy_bytes": copy,
                 "requested_bytes": None if m["requested_bytes"] is None else m["requested_bytes"] - copy,
                 "allocated_bytes": m["allocated_bytes"] - block_bytes(copy)}
        for ws in row["workspaces"]:
            if ws["requested_bytes"] == m["requested_bytes"] and ws["allocated_bytes"] == m["allocated_bytes"]:
                ws["calls"] += 1
                return
        in_b, out_b, w_b = row["input"]["bytes"], row["output"]["bytes"], row["weight"]["bytes"]
        exact = m["requested_bytes"] is not None
        rule, delta = classify(m["requested_bytes"] if exact else m["allocated_bytes"], in_b, out_b, w_b,
                               TOLERANCE if exact else TOLERANCE + 2 * MiB)
        row["workspaces"].append({**m, "rule": rule, "delta_bytes": delta, "rule_on": "requested" if exact else "allocated",
                                  "calls": 1})


def _reset_scheduler(pipe) -> None:
    # PNDM keeps its last noise predictions after a call; each call starts without them (as gpu.py).
    s = pipe.scheduler
    for attr, value in (("ets", []), ("cur_sample", None), ("counter", 0)):
        if hasattr(s, attr):
            setattr(s, attr, value)


def run_probe(pipe, sizes, meter, on_size=None, deadline: float | None = None, device_kind: str = "cuda") -> dict:
    """Probe every conv at each (height, width); returns {"calls": [...], "rows": [...]}.

    on_size(result) is called after each size (to write the file as it grows); a size is
    skipped once time.time() passes deadline.
    """
    import gc

    import torch

    from sd_vram.plugin.cases import synthetic_image
    from sd_vram.stages import stage_hooks

    cuda = device_kind == "cuda"
    pipe.set_progress_bar_config(disable=True)
    current = {"name": None}
    rec = Recorder(meter, current)
    result = {"calls": [], "rows": []}
    evals = [0]

    def on_stage(name):
        current["name"] = name

    with stage_hooks(pipe, on_stage):
        handles = [pipe.unet.register_forward_pre_hook(lambda *_a: evals.__setitem__(0, evals[0] + 1))]
        for name, m in conv_modules(pipe):      # after stage_hooks: a stage starts before its first conv's hook
            handles.append(m.register_forward_pre_hook(rec.pre(name)))
            handles.append(m.register_forward_hook(rec.post(name)))
        try:
            for height, width in sizes:
                size = f"{width}x{height}"
                entry = {"size": size, "height": height, "width": width, "status": "ok", "error": None}
                if deadline is not None and time.time() >= deadline:
                    entry["status"] = "skipped"
                    entry["error"] = "time budget exhausted"
                    result["calls"].append(entry)
                    print(f"conv_probe: {size}: skipped, time budget exhausted", flush=True)
                    continue
                rec.size, calls0, evals[0] = size, rec.calls, 0
                _reset_scheduler(pipe)
                image = synthetic_image(width, height, f"conv-probe-{size}")
                t0 = time.perf_counter()
                out = None
                try:
                    out = pipe(PROMPT, image=image, **CALL)
                    if cuda:
                        torch.cuda.synchronize()
                except torch.OutOfMemoryError as e:
                    entry.update(status="oom", error=str(e).splitlines()[0][:500])
                except Exception as e:
                    entry.update(status="error", error=f"{type(e).__name__}: {str(e)[:500]}")
                del out, image
                rec._x = None
                entry.update(wall_s=round(time.perf_counter() - t0, 3), conv_calls=rec.calls - calls0,
                             unet_evals=evals[0])
                _reset_scheduler(pipe)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                result["calls"].append(entry)
                result["rows"] = list(rec.rows.values())
                print(f"conv_probe: {size}: {entry['status']}{' (' + entry['error'] + ')' if entry['error'] else ''}, "
                      f"{entry['conv_calls']} conv calls, {entry['unet_evals']} UNet evals, {entry['wall_s']} s, "
                      f"{len(rec.rows)} rows so far", flush=True)
                if on_size:
                    on_size(result)
        finally:
            for h in handles:
                h.remove()
    result["rows"] = list(rec.rows.values())
    return result


# --- the tiny pipeline of the CPU rehearsal ------------------------------------------------------

# Tiny SD-shaped models for the CPU rehearsal: the VAE still downsamples 8x, there is no
# attention over full-resolution tokens, so 2048x2048 runs in seconds.
FAKE_CONFIG = {
    "unet": {"act_fn": "silu", "attention_head_dim": 4, "block_out_channels": [4, 4, 4, 8], "cross_attention_dim": 16,
             "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"], "in_channels": 4,
             "layers_per_block": 1, "norm_num_groups": 2, "out_channels": 4, "sample_size": 8,
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]},
    "vae": {"act_fn": "silu", "block_out_channels": [2, 2, 2, 2], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 1, "out_channels": 3,
            "sample_size": 64, "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215,
            "mid_block_add_attention": False},
    "text_encoder": {"hidden_act": "quick_gelu", "hidden_size": 16, "intermediate_size": 32, "layer_norm_eps": 1e-05,
                     "max_position_embeddings": 77, "num_attention_heads": 2, "num_hidden_layers": 1,
                     "projection_dim": 16, "vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
    "safety_checker": {"projection_dim": 16,
                       "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                       "num_hidden_layers": 1},
                       "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                         "num_hidden_layers": 1, "patch_size": 14, "image_size": 224,
                                         "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05}},
}


def build_fake_pipeline(channels_last: bool = False):
    """The tiny pipeline of FAKE_CONFIG on the CPU in fp32, through sd_vram.models.build_pipeline
    (channels_last: its UNet and VAE converted, as Options.channels_last)."""
    from unittest import mock

    import torch

    import sd_vram.models as models

    torch.set_num_threads(1)      # tiny ops: a second thread only contends (64x64 runs 30x faster)
    cfg = {**models.sd15_config(), **FAKE_CONFIG}
    with mock.patch.object(models, "sd15_config", lambda: cfg):
        return models.build_pipeline("cpu", dtype=torch.float32, channels_last=channels_last)


# --- output -------------------------------------------------------------------------------------

def write_doc(path: Path, doc: dict) -> None:
    """Atomically (formula/files.py); one row per line keeps ~1,000 rows near 1 MB and greppable."""
    head = {k: v for k, v in doc.items() if k != "rows"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "rows": [\n'
    text += ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in doc.get("rows", []))
    text += "\n ]\n}\n"
    write_text_atomic(path, text)


def load_doc(path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ProbeError(f"no such file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProbeError(f"{path}: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ProbeError(f"{path}: not a conv-probe file (schema {SCHEMA})")
    return doc


def _mib(n) -> str:
    return "-" if n is None else f"{n / MiB:,.2f} MiB"


def _conv_label(r: dict) -> str:
    k, s = r["kernel_size"], r["stride"]
    ks = f"k{k[0]}" if k[0] == k[1] else f"k{k[0]}x{k[1]}"
    ss = f"s{s[0]}" if s[0] == s[1] else f"s{s[0]}x{s[1]}"
    g = f" g{r['groups']}" if r["groups"] != 1 else ""
    return f"{ks} {ss}{g} {r['weight']['shape'][1] * r['groups']}->{r['weight']['shape'][0]}"


def summary_lines(doc: dict, limit: int = 40) -> list[str]:
    """The rules the workspaces follow, and which convolutions follow each (for a log)."""
    env = doc.get("environment", {})
    gpu = env.get("gpu", {})
    lines = [f"conv probe: {gpu.get('name')} (cc {gpu.get('compute_capability')}, driver {env.get('driver')}), "
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, backend {env.get('backend')}"]
    lines.append("sizes: " + ", ".join(f"{c['size']} {c['status']}" + (f" ({c.get('conv_calls')} convs, "
                                                                       f"{c.get('wall_s')} s)" if c["status"] != "skipped" else "")
                                       for c in doc.get("calls", [])))
    rows = doc.get("rows", [])
    entries = [(r, ws) for r in rows for ws in r["workspaces"]]
    lines.append(f"{len(rows)} (conv, input shape) rows, {sum(r['calls'] for r in rows)} calls, "
                 f"{len(entries)} distinct workspaces; rule = the byte sum the workspace equals "
                 f"(within {doc.get('tolerance_bytes', TOLERANCE)} B), 'in'/'out'/'weight' = that tensor's bytes")
    by_rule: dict[str, list] = {}
    for r, ws in entries:
        by_rule.setdefault(ws["rule"], []).append((r, ws))
    lines.append("")
    lines.append(f"{'rule':<15} {'rows':>6} {'calls':>7} {'largest':>16}  delta range")
    for rule in sorted(by_rule, key=lambda k: -len(by_rule[k])):
        es = by_rule[rule]
        deltas = [ws["delta_bytes"] for _r, ws in es if ws.get("delta_bytes") is not None]
        big = max((ws["requested_bytes"] if ws["requested_bytes"] is not None else ws["allocated_bytes"]) for _r, ws in es)
        lines.append(f"{rule:<15} {len(es):>6} {sum(ws['calls'] for _r, ws in es):>7} {_mib(big):>16}  "
                     + (f"{min(deltas):+,} .. {max(deltas):+,} B" if deltas else "-"))

    # Per module: the rule at every input shape; modules with one rule throughout are listed under it.
    per_module: dict[str, list] = {}
    for r, ws in entries:
        per_module.setdefault(r["module"], []).append((r, ws))
    uniform: dict[str, list] = {}
    mixed = []
    for name, es in per_module.items():
        rules = {ws["rule"] for _r, ws in es}
        if len(rules) == 1:
            uniform.setdefault(rules.pop(), []).append((name, es))
        else:
            mixed.append((name, es))
    for rule in sorted(uniform, key=lambda k: -len(uniform[k])):
        mods = uniform[rule]
        lines.append("")
        lines.append(f"[{rule}] at every input shape probed: {len(mods)} convs")
        for name, es in mods:
            r0 = es[0][0]
            sizes = sorted({tuple(r["input"]["shape"][2:]) for r, _ws in es})
            lines.append(f"  {name:<58} {_conv_label(r0):<18} {r0['stage']:<14} {len(sizes)} shapes "
                         f"{sizes[0][0]}x{sizes[0][1]}..{sizes[-1][0]}x{sizes[-1][1]}")
    if mixed:
        lines.append("")
        lines.append(f"[mixed] the rule depends on the input shape: {len(mixed)} convs (HxW of the input: rule)")
        for name, es in mixed:
            r0 = es[0][0]
            parts = []
            for r, ws in sorted(es, key=lambda e: e[0]["input"]["shape"][2] * e[0]["input"]["shape"][3]):
                h, w = r["input"]["shape"][2:]
                v = ws["requested_bytes"] if ws["requested_bytes"] is not None else ws["allocated_bytes"]
                parts.append(f"{h}x{w}:{ws['rule']}" + (f"({v / MiB:.1f}M)" if ws["rule"] == "other" else ""))
            lines.append(f"  {name:<58} {_conv_label(r0):<18} {r0['stage']:<14} " + " ".join(parts))
    others = [(r, ws) for r, ws in entries if ws["rule"] == "other"]
    if others:
        lines.append("")
        lines.append("[other] workspaces by value (a constant across shapes shows as one value with many rows):")
        by_value: dict[int, list] = {}
        for r, ws in others:
            v = ws["requested_bytes"] if ws["requested_bytes"] is not None else ws["allocated_bytes"]
            by_value.setdefault(v, []).append(r)
        for v, rs in sorted(by_value.items(), key=lambda kv: (-len(kv[1]), -kv[0]))[:limit]:
            r = rs[0]
            in_b, out_b = r["input"]["bytes"], r["output"]["bytes"]
            lines.append(f"  {v:>14,} B = {_mib(v):>14}  {len(rs):>4} rows, e.g. {r['module']} {r['input']['shape']} "
                         f"{_conv_label(r)} (ws/in {v / in_b:.3f}, ws/out {v / out_b:.3f})")
        if len(by_value) > limit:
            lines.append(f"  ... {len(by_value) - limit} more values")
    top = sorted(entries, key=lambda e: -(e[1]["requested_bytes"] if e[1]["requested_bytes"] is not None
                                           else e[1]["allocated_bytes"]))[:15]
    lines.append("")
    lines.append("largest workspaces:")
    for r, ws in top:
        v = ws["requested_bytes"] if ws["requested_bytes"] is not None else ws["allocated_bytes"]
        lines.append(f"  {_mib(v):>14} {ws['rule']:<14} {r['module']:<58} {r['input']['shape']} {_conv_label(r)} "
                     f"{r['stage']}")
    return lines


# --- command line -------------------------------------------------------------------------------

def probe(args) -> int:
    from .archive import git_commit, utc_stamp

    sizes = parse_sizes(args.sizes)
    d = os.environ.get("SD_VRAM_DEADLINE")
    try:
        deadline = float(d) if d else None
    except ValueError:
        raise ProbeError(f"SD_VRAM_DEADLINE must be epoch seconds, got {d!r}") from None
    t0 = time.perf_counter()
    if args.backend == "fake":
        env, meter, device_kind = fake_environment(), FakeMeter(), "cpu"
        pipe = build_fake_pipeline()
    else:
        import torch

        if not torch.cuda.is_available():
            raise ProbeError(f"torch {torch.__version__} sees no CUDA device (use --backend fake to rehearse on a CPU)")
        from sd_vram.models import build_pipeline

        env, meter, device_kind = cuda_environment(), CudaMeter(), "cuda"
        pipe = build_pipeline("cuda")
    setup_s = round(time.perf_counter() - t0, 2)
    commit, _dirty = git_commit(Path.cwd())
    path = Path(args.out) if args.out else Path(args.results_dir) / env["gpu"]["slug"] / f"{utc_stamp()}_{commit}_conv_probe.json"
    doc = {"schema": SCHEMA, "git_commit": commit, "environment": env, "gpu": env["gpu"],
           "call": {"prompt": PROMPT, **CALL}, "tolerance_bytes": TOLERANCE, "rules": list(RULES),
           "sizes_requested": [f"{w}x{h}" for h, w in sizes], "setup_s": setup_s, "complete": False,
           "calls": [], "rows": []}
    print(f"conv_probe: backend {args.backend} on {env['gpu']['name']}, cuDNN {env.get('cudnn')}, "
          f"setup {setup_s} s, {len(conv_modules(pipe))} conv modules -> {path}", flush=True)

    def save(result):
        doc.update(calls=result["calls"], rows=result["rows"])
        write_doc(path, doc)

    result = run_probe(pipe, sizes, meter, on_size=save, deadline=deadline, device_kind=device_kind)
    doc["complete"] = True
    doc["seconds"] = round(time.perf_counter() - t0, 2)
    save(result)
    print(f"conv_probe: wrote {path} ({path.stat().st_size:,} bytes) in {doc['seconds']} s", flush=True)
    if not args.quiet:
        print("\n".join(summary_lines(doc)), flush=True)
    return 0 if all(c["status"] in ("ok", "skipped") for c in doc["calls"]) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd_vram.plugin.conv_probe",
                                description="cuDNN convolution workspaces of the img2img call, one conv at a time")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"WIDTHxHEIGHT[,...] (default {DEFAULT_SIZES})")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, metavar="FILE", help="write the JSON here")
    where.add_argument("--results-dir", default="results", metavar="DIR",
                       help="else write DIR/<gpu-model>/<UTC time>_<commit>_conv_probe.json (default results)")
    where.add_argument("--summary", default=None, metavar="FILE", help="print the rules of a probe file and exit")
    p.add_argument("--backend", default="cuda", choices=("cuda", "fake"),
                   help="cuda (default) or fake: a tiny pipeline on the CPU with made-up workspaces (rehearsal)")
    p.add_argument("--quiet", action="store_true", help="do not print the summary after probing")
    args = p.parse_args(argv)
    try:
        if args.summary:
            print("\n".join(summary_lines(load_doc(args.summary))))
            return 0
        return probe(args)
    except ProbeError as e:
        print(f"conv_probe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
