"""The conv-workspace probe (plugin/conv_probe.py) on the CPU.

The real meter (CudaMeter) runs against a scripted caching allocator: torch.cuda's counters are
replaced and F.conv2d is wrapped so that each convolution "allocates" its output and then a
workspace planted by a rule written here; the probe must recover every planted workspace from
the counters alone and name its rule. The command line runs with --backend fake (tiny pipeline,
made-up workspaces), as scripts/gpu_validate.sh's rehearsal does.
"""

from __future__ import annotations

import json
import math
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sd_vram.plugin import conv_probe as cp  # noqa: E402

MiB = 1 << 20


def r512(n):
    return -(-n // 512) * 512


def test_parse_sizes():
    assert cp.parse_sizes("640x427, 64x64") == [(427, 640), (64, 64)]
    for bad in ("640", "640x", "x427", "640*427", "4x64", "", "a,b"):
        with pytest.raises(cp.ProbeError):
            cp.parse_sizes(bad)


def test_classify_picks_the_closest_sum():
    i, o, w = 1000, 20_000, 300_000
    assert cp.classify(i + o + w + 384, i, o, w) == ("in+out+weight", 384)
    assert cp.classify(i + o, i, o, w) == ("in+out", 0)
    assert cp.classify(0, i, o, w) == ("0", 0)
    assert cp.classify(w - 100, i, o, w) == ("weight", -100)
    assert cp.classify(56 * MiB, i, o, w) == ("other", None)
    assert cp.classify(None, i, o, w) == ("unknown", None)


def planted(x_bytes, out_bytes, w_bytes, kernel, stride):
    """The workspace the scripted cuDNN takes (independent of conv_probe's rules)."""
    if kernel == (1, 1):
        return 0
    if kernel == (3, 3) and stride == (1, 1):
        return x_bytes + out_bytes + w_bytes + 384
    return 7 * MiB + 123


class ScriptedAllocator:
    """Counters of a caching allocator that never frees outputs; workspaces come and go in each conv."""

    def __init__(self, requested=True):
        self.alloc = self.req = 50 * MiB
        self.alloc_peak = self.req_peak = self.alloc
        self.requested = requested
        self.syncs = 0

    def malloc(self, n):
        self.alloc += r512(n)
        self.req += n
        self.alloc_peak = max(self.alloc_peak, self.alloc)
        self.req_peak = max(self.req_peak, self.req)

    def free(self, n):
        self.alloc -= r512(n)
        self.req -= n

    def reset(self, *a):
        self.alloc_peak, self.req_peak = self.alloc, self.req

    def stats(self, *a):
        if not self.requested:
            return {"num_ooms": 0}
        return {"requested_bytes.all.current": self.req, "requested_bytes.all.peak": self.req_peak}


@pytest.fixture(scope="module")
def tiny_pipe():
    threads = torch.get_num_threads()
    pipe = cp.build_fake_pipeline()
    yield pipe
    torch.set_num_threads(threads)


def scripted(monkeypatch, requested=True):
    a = ScriptedAllocator(requested)
    c = torch.cuda
    monkeypatch.setattr(c, "synchronize", lambda *x: setattr(a, "syncs", a.syncs + 1))
    monkeypatch.setattr(c, "reset_peak_memory_stats", a.reset)
    monkeypatch.setattr(c, "memory_allocated", lambda *x: a.alloc)
    monkeypatch.setattr(c, "max_memory_allocated", lambda *x: a.alloc_peak)
    monkeypatch.setattr(c, "memory_stats", a.stats)
    conv2d = torch.nn.functional.conv2d

    def fake_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        out = conv2d(x, weight, bias, stride, padding, dilation, groups)
        nb = lambda t: t.numel() * t.element_size()  # noqa: E731
        ws = planted(nb(x), nb(out), nb(weight), tuple(weight.shape[2:]), tuple(stride))
        a.malloc(nb(out))              # the output first, then the workspace, as at::native::cudnn_convolution
        a.malloc(ws)
        a.free(ws)
        return out

    monkeypatch.setattr(torch.nn.functional, "conv2d", fake_conv2d)
    return a


def test_cuda_meter_recovers_planted_workspaces(tiny_pipe, monkeypatch):
    a = scripted(monkeypatch)
    sizes = [(48, 64), (128, 128)]      # no input shape in common but the safety checker's
    res = cp.run_probe(tiny_pipe, sizes, cp.CudaMeter(), device_kind="cpu")
    assert [c["status"] for c in res["calls"]] == ["ok", "ok"]
    assert all(c["unet_evals"] == 3 for c in res["calls"])       # 3 steps x strength 0.8 -> 3 evaluations
    names = {n for n, _m in cp.conv_modules(tiny_pipe)}
    rows = res["rows"]
    assert {r["module"] for r in rows} == names
    assert a.syncs == 2 * sum(c["conv_calls"] for c in res["calls"])
    # one row per (module, input shape): the safety checker always sees 224x224, so one row for both sizes
    pe = [r for r in rows if r["module"].startswith("safety_checker.")]
    assert len(pe) == 1 and pe[0]["image_sizes"] == ["64x48", "128x128"] and pe[0]["input"]["shape"] == [1, 3, 224, 224]
    assert len(rows) == 2 * (len(names) - 1) + 1
    expected_rule = {0: "0", 7 * MiB + 123: "other"}
    for r in rows:
        nb = [r[t]["bytes"] for t in ("input", "output", "weight")]
        assert nb == [4 * math.prod(r[t]["shape"]) for t in ("input", "output", "weight")]   # fp32
        ws = planted(*nb, tuple(r["kernel_size"]), tuple(r["stride"]))
        assert len(r["workspaces"]) == 1, r
        got = r["workspaces"][0]
        assert got["requested_bytes"] == ws and got["allocated_bytes"] == r512(ws), r["module"]
        assert got["output_requested_bytes"] == nb[1] and got["output_allocated_bytes"] == r512(nb[1])
        assert got["rule"] == expected_rule.get(ws, "in+out+weight") and got["rule_on"] == "requested"
        assert got["delta_bytes"] == (384 if got["rule"] == "in+out+weight" else None if got["rule"] == "other" else 0)
        # UNet convs run once per evaluation, the others once per call
        assert r["calls"] == got["calls"] == (3 if r["module"].startswith("unet.") else 1) * len(r["image_sizes"])
        stage = r["stage"]
        m = r["module"]
        if m.startswith("unet."):
            assert stage == "unet"
        elif m.startswith(("vae.encoder.", "vae.quant_conv")):
            assert stage == "vae_encode"
        elif m.startswith(("vae.decoder.", "vae.post_quant_conv")):
            assert stage == "vae_decode"
        else:
            assert stage == "safety_checker"
    unet_in = next(r for r in rows if r["module"] == "unet.conv_in" and r["image_sizes"] == ["64x48"])
    assert unet_in["input"]["shape"] == [2, 4, 6, 8]        # CFG batch 2, latents of 48x64 / 8


def test_cuda_meter_without_requested_stats_uses_allocated_sizes(tiny_pipe, monkeypatch):
    scripted(monkeypatch, requested=False)
    rows = cp.run_probe(tiny_pipe, [(64, 64)], cp.CudaMeter(), device_kind="cpu")["rows"]
    for r in rows:
        nb = [r[t]["bytes"] for t in ("input", "output", "weight")]
        got = r["workspaces"][0]
        assert got["requested_bytes"] is None and got["rule_on"] == "allocated"
        assert got["allocated_bytes"] == r512(planted(*nb, tuple(r["kernel_size"]), tuple(r["stride"])))
        assert got["rule"] in ("in+out+weight", "0", "other")


def test_cuda_command_line_end_to_end_on_cpu(tiny_pipe, monkeypatch, tmp_path, capsys):
    """The --backend cuda path (environment, build, meter, file) with CUDA scripted."""
    import types

    import sd_vram.models as models

    a = scripted(monkeypatch)
    built = []
    monkeypatch.setattr(models, "build_pipeline", lambda device, **kw: built.append(device) or tiny_pipe)
    c = torch.cuda
    monkeypatch.setattr(c, "is_available", lambda: True)
    monkeypatch.setattr(c, "empty_cache", lambda: None)
    monkeypatch.setattr(c, "current_device", lambda: 0)
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 << 30,
                                  multi_processor_count=132)
    monkeypatch.setattr(c, "get_device_properties", lambda *x: props)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91900)
    monkeypatch.delenv("SD_VRAM_DEADLINE", raising=False)
    assert cp.main(["--results-dir", str(tmp_path), "--sizes", "64x48"]) == 0
    assert built == ["cuda"] and a.syncs > 0
    (f,) = (tmp_path / "H100-80GB-HBM3").glob("*_conv_probe.json")
    doc = json.loads(f.read_text())
    env = doc["environment"]
    assert env["backend"] == "cuda" and env["cudnn"] == 91900 and env["gpu"]["compute_capability"] == "9.0"
    assert "driver" in env and "torch" in env and doc["complete"]
    ws = [w for r in doc["rows"] for w in r["workspaces"]]
    assert ws and all(w["rule_on"] == "requested" for w in ws)
    assert "largest workspaces:" in capsys.readouterr().out


def test_command_line_fake_backend_and_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SD_VRAM_DEADLINE", raising=False)
    out = tmp_path / "probe.json"
    assert cp.main(["--backend", "fake", "--out", str(out), "--sizes", "64x48,72x64", "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "sd-vram/conv-probe/1" and doc["complete"] is True
    assert doc["environment"]["backend"] == "fake" and doc["gpu"]["slug"] == "FAKE-GPU-80GB"
    assert [c["size"] for c in doc["calls"]] == ["64x48", "72x64"]
    assert doc["call"]["num_inference_steps"] == 3 and doc["call"]["guidance_scale"] == 5.0
    assert out.stat().st_size < 3_000_000
    for r in doc["rows"]:            # FakeMeter's made-up rules, seen through the classification
        k, s = tuple(r["kernel_size"]), tuple(r["stride"])
        want = "0" if k == (1, 1) else "in+out+weight" if (k, s) == ((3, 3), (1, 1)) else "other"
        assert [w["rule"] for w in r["workspaces"]] == [want], r["module"]
    capsys.readouterr()
    assert cp.main(["--summary", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[in+out+weight] at every input shape probed" in text and "[0] at every input shape probed" in text
    assert "vae.decoder.conv_out" in text and "58,720,256 B" in text       # the 56 MiB 'other' value
    # results-dir naming: <dir>/<gpu-model>/<UTC time>_<commit>_conv_probe.json
    assert cp.main(["--backend", "fake", "--results-dir", str(tmp_path / "res"), "--sizes", "64x64", "--quiet"]) == 0
    files = list((tmp_path / "res" / "FAKE-GPU-80GB").glob("*_conv_probe.json"))
    assert len(files) == 1


def test_deadline_skips_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("SD_VRAM_DEADLINE", str(time.time() - 1))
    out = tmp_path / "p.json"
    assert cp.main(["--backend", "fake", "--out", str(out), "--sizes", "64x64,128x128", "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert [c["status"] for c in doc["calls"]] == ["skipped", "skipped"] and doc["rows"] == []


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "64", "--backend", "fake"], "bad size '64'"),
    (["--summary", "/nonexistent/x.json"], "no such file"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    assert cp.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_summary_rejects_other_json(tmp_path, capsys):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"schema": "sd-vram/results/1"}))
    assert cp.main(["--summary", str(p)]) == 2
    assert "not a conv-probe file" in capsys.readouterr().err
