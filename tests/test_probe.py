"""`sd-vram probe`: its measurement code on the fake backend, and its answer without a GPU."""

import json

import pytest

from sd_vram import cli
from sd_vram.formula import estimate, gpu_profiles, kernels
from sd_vram.plugin import conv_probe, probe

MiB = 1 << 20


def test_without_a_gpu_one_line_and_exit_2(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli.main(["probe"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err and "Traceback" not in err


def test_bad_size_is_one_line(capsys):
    assert cli.main(["probe", "--backend", "fake", "12x3"]) == 2
    assert "too small" in capsys.readouterr().err


def _row(module, shape, kernel, i, o, w, *workspaces):
    return {"module": module, "input": {"shape": list(shape), "bytes": i}, "output": {"bytes": o},
            "weight": {"bytes": w}, "kernel_size": [kernel, kernel],
            "workspaces": [{"requested_bytes": r, "allocated_bytes": a} for r, a in workspaces]}


def test_conv_workspaces_and_rule_fit():
    rows = [
        # cuDNN picked two engines for this shape over the calls: the larger counts
        _row("vae.decoder.up_blocks.3.resnets.0.conv1", (1, 256, 64, 64), 3, 100, 50, 7, (157, 512), (90, 512)),
        # no exact request counter: the allocator's blocks
        _row("unet.up_blocks.1.attentions.0.proj_in", (2, 640, 16, 16), 1, 80, 80, 1, (None, 1024)),
    ]
    assert probe.conv_workspaces(rows) == {"vae.decoder.up_blocks.3.resnets.0.conv1@1x256x64x64": 157,
                                          "unet.up_blocks.1.attentions.0.proj_in@2x640x16x16": 1024}
    fit = probe.fit_rules(rows)
    assert fit["scores"]["nchw_transpose"] == [3, 3]   # 157 = 100 + 50 + 7; 90 within 4 KiB; 1024 B ~ output
    assert fit["best"] == "nchw_transpose"


def test_sdpa_checks_against_the_kernel_table():
    h200 = gpu_profiles.get("h200")
    rows = [{"stage": "unet", "query": [2, 8, 4096, 40], "key": [2, 8, 4096, 40], "mask": False, "dtype": "float16",
             "backend": "CUDNN_ATTENTION", "scratch_bytes": 0, "calls": 2},
            {"stage": "vae_decode", "query": [1, 1, 4096, 512], "key": [1, 1, 4096, 512], "mask": False,
             "dtype": "float16", "backend": "FLASH_ATTENTION", "scratch_bytes": 0, "calls": 1}]
    out = probe.sdpa_checks(rows, h200)
    assert [(r["table"], r["agrees"]) for r in out] == [("cudnn", True), ("efficient", False)]


def test_sdpa_probe_records_backend_and_scratch():
    import torch
    import torch.nn.functional as F

    stage = {"name": "vae_decode"}
    sp = probe.SdpaProbe(probe.FakeSdpaMeter(), stage)
    q = torch.zeros(1, 1, 16, 512)
    with sp.installed():
        F.scaled_dot_product_attention(q, q, q)
        F.scaled_dot_product_attention(q, q, q)
    assert F.scaled_dot_product_attention is not None
    (row,) = sp.rows.values()
    assert row["backend"] == "EFFICIENT_ATTENTION" and row["calls"] == 2
    assert row["scratch_bytes"] == 16 * 512 * 4           # the fake's fp32 accumulator


def test_default_sizes_fit_the_gpu():
    sizes = probe.default_sizes(24 << 30)                  # a 24 GiB card
    assert sizes[:4] == list(probe.SEED_SIZES)
    assert all(estimate(h, w).bounds["peak_device_bytes"][1] <= 0.9 * (24 << 30) for w, h in sizes[4:])
    assert len(probe.default_sizes(200 << 30)) > len(sizes)


@pytest.fixture(scope="module")
def fake_probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "fake.json"
    rc = cli.main(["probe", "--backend", "fake", "64x64", "--out", str(out), "--name", "fakegpu"])
    return rc, out


def test_fake_probe_writes_a_profile_that_reads_back(fake_probe):
    rc, out = fake_probe
    assert rc == 0
    p = gpu_profiles.read(out)
    data = json.loads(out.read_text())
    assert (p.name, p.source, p.gpu) == ("fakegpu", "probe", "FAKE GPU 80GB")
    assert p.cuda_context_measured and p.cuda_context == 610 * MiB       # plugin/backends.FakeBackend
    assert p.cublas_workspace == kernels.cublas_workspace(p.compute_capability) == 32 * MiB
    assert p.measured["derived_cublaslt_workspace"] == p.cublaslt_workspace
    # every conv of the tiny pipeline at 64x64, keyed by module and input shape
    assert "vae.decoder.up_blocks.3.resnets.0.conv1@1x2x64x64" in p.conv_workspaces
    assert len(p.conv_workspaces) == data["probe"]["conv_rows"]
    assert {r["stage"] for r in data["sdpa"]} >= {"text_encoder", "unet", "safety_checker"}
    assert p.stack["torch"] and "CUBLAS_WORKSPACE_CONFIG" in p.stack
    # usable at once, by path
    e = estimate(64, 64, gpu=str(out))
    assert e.gpu_profile == "fakegpu" and e.breakdown["cuda_context"] == 610 * MiB


def test_channels_last_probe_keeps_nhwc_workspaces_apart(tmp_path):
    """--channels-last runs the call again with the UNet and the VAE channels-last; its
    convolutions' workspaces go under ":nhwc" keys, fitted apart from the NCHW ones."""
    out = tmp_path / "cl.json"
    assert cli.main(["probe", "--backend", "fake", "64x64", "--channels-last", "--out", str(out)]) == 0
    p, data = gpu_profiles.read(out), json.loads(out.read_text())
    conv1 = "vae.decoder.up_blocks.3.resnets.0.conv1@1x2x64x64"
    assert p.conv_workspaces[conv1 + kernels.NHWC_KEY] == p.conv_workspaces[conv1] > 0   # FakeMeter's own rule
    nhwc = {k for k in p.conv_workspaces if k.endswith(kernels.NHWC_KEY)}
    assert nhwc and not any(k.startswith("safety_checker") for k in nhwc)   # its conv stays NCHW
    assert {c["layout"] for c in data["probe"]["calls"]} == {"nchw", "nhwc"}
    assert set(p.measured["conv_rule_fit_nhwc"]) == set(kernels.CONV_RULE_SETS)


def test_nhwc_workspace_is_measured_without_the_input_copy():
    """A channels-last filter's conv holds the NHWC copy of an NCHW input beside its workspace;
    FakeMeter counts that copy as CUDA would, and the recorded workspace is FakeMeter's made-up
    one alone (3x3 stride 1: input + output + weight + 256 B; 1x1: none; else 56 MiB)."""
    pipe = conv_probe.build_fake_pipeline(channels_last=True)
    rows = conv_probe.run_probe(pipe, [(64, 64)], conv_probe.FakeMeter(), device_kind="cpu")["rows"]
    copied = [(r, w) for r in rows for w in r["workspaces"] if w.get("input_copy_bytes")]
    assert copied
    for r, w in copied:
        assert w["input_copy_bytes"] == r["input"]["bytes"] and r["layout"] == "nhwc"
        k, stride = tuple(r["kernel_size"]), tuple(r["stride"])
        made_up = (0 if k == (1, 1) else
                   r["input"]["bytes"] + r["output"]["bytes"] + r["weight"]["bytes"] + 256 if stride == (1, 1) else 56 * MiB)
        assert w["requested_bytes"] == made_up, r["module"]


def test_nhwc_input_copy_follows_the_filter_and_the_input():
    torch = pytest.importorskip("torch")
    conv = torch.nn.Conv2d(4, 8, 3)
    x = torch.zeros(1, 4, 6, 6)
    assert conv_probe.nhwc_input_copy(x, conv.weight) == 0                      # NCHW filter
    conv.to(memory_format=torch.channels_last)
    assert conv_probe.nhwc_input_copy(x, conv.weight) == 4 * 36 * 4             # copied to NHWC
    assert conv_probe.nhwc_input_copy(x.to(memory_format=torch.channels_last), conv.weight) == 0


def test_probe_saves_into_the_user_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SD_VRAM_PROFILES", str(tmp_path))
    monkeypatch.setattr(conv_probe, "run_probe", lambda *a, **k: {"calls": [{"size": "64x64", "status": "ok"}],
                                                                  "rows": []})
    assert cli.main(["probe", "--backend", "fake", "64x64", "--name", "quick", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["name"] == "quick" and (tmp_path / "quick.json").is_file()
    assert gpu_profiles.get("quick").source == "probe"


def test_cuda_path_on_cpu(monkeypatch, tmp_path):
    """The probe's CUDA code path (CudaHardware: CudaBackend's NVML and cuBLAS measurements,
    CudaSdpaMeter, conv_probe.CudaMeter) on the CPU with the scripted CUDA and NVML stand-ins
    of tests/test_plugin_gpu_backend.py; nothing about real memory is asserted."""
    torch = pytest.importorskip("torch")
    import test_plugin_gpu_backend as fakes

    gen = getattr(fakes.fake_gpu, "__wrapped__", fakes.fake_gpu)(monkeypatch)   # the fixture's body
    next(gen)
    counter = {"n": 100 * MiB}

    def allocated(*a):               # grows at every reading: the workspaces come out positive
        counter["n"] += 1 * MiB
        return counter["n"]

    monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from sd_vram.plugin import gpu

    real_backend = gpu.CudaBackend
    monkeypatch.setattr(gpu, "CudaBackend", lambda **kw: real_backend(device="cpu", dtype=torch.float32, **kw))
    out = tmp_path / "cuda.json"
    assert cli.main(["probe", "64x48", "--out", str(out), "--name", "cudapath"]) == 0
    p = gpu_profiles.read(out)
    assert p.gpu == "NVIDIA Fake H100" and p.compute_capability == (9, 0) and p.source == "probe"
    assert p.cuda_context_measured and p.cuda_context > 0
    assert p.cublas_workspace > 0 and p.stack["driver"] == "999.1"
    data = json.loads(out.read_text())
    assert data["sdpa"] and all(r["backend"] for r in data["sdpa"])
    try:
        next(gen)
    except StopIteration:
        pass

