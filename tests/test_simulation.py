"""Tests of the GPU-free simulation: allocator model, SDPA choice, pipeline behaviour."""

from __future__ import annotations

import pytest


KiB, MiB = 1 << 10, 1 << 20


# --------------------------------------------------------------------------------------
# SDPA backend choice
# --------------------------------------------------------------------------------------

def _qkv(b, h, n, d, nk=None, dtype=None):
    import torch

    dtype = dtype or torch.float16
    # diffusers' layout: (b, n, h, d) viewed as (b, h, n, d)
    q = torch.empty(b, n, h, d, dtype=dtype, device="meta").transpose(1, 2)
    k = torch.empty(b, nk or n, h, d, dtype=dtype, device="meta").transpose(1, 2)
    return q, k, k


@pytest.mark.parametrize("profile_kw, head_dim, expected", [
    # torch 2.11 + cuDNN 9.19 on an H200 ran cuDNN for head dims 40, 80 and 160
    # (results/H200/20261126T052554Z_nogit.json, measurement.sdpa)
    (dict(compute_capability=(9, 0), cudnn_version=91900, torch_version=(2, 11)), 40, "cudnn"),
    (dict(compute_capability=(9, 0), cudnn_version=91900, torch_version=(2, 11)), 160, "cudnn"),
    (dict(compute_capability=(9, 0), cudnn_version=91900, torch_version=(2, 13)), 160, "flash"),  # later rule
    (dict(compute_capability=(9, 0), cudnn_version=92300, torch_version=(2, 13)), 160, "cudnn"),
    (dict(compute_capability=(10, 0), cudnn_version=91900, torch_version=(2, 11)), 160, "flash"),  # 256: sm90 only
    (dict(compute_capability=(9, 0), cudnn_version=91900), 512, "efficient"),
    (dict(compute_capability=(9, 0), cudnn_version=91002), 40, "flash"),     # cuDNN not preferred
    (dict(compute_capability=(8, 0), cudnn_version=91900), 160, "flash"),    # sm80: default order
    (dict(compute_capability=(8, 6), cudnn_version=91900), 512, "efficient"),
    (dict(compute_capability=(7, 5), cudnn_version=91900), 40, "efficient"),  # no flash before sm80
    (dict(compute_capability=(9, 0), cudnn_version=91900, cudnn_sdpa_deprioritized=True), 40, "flash"),
])
def test_sdpa_auto_choice(profile_kw, head_dim, expected):
    from sd_vram.simulation.profile import GPUProfile
    from sd_vram.simulation.sdpa import choose_backend

    q, k, v = _qkv(2, 8, 4096, head_dim)
    assert choose_backend(GPUProfile(**profile_kw), "auto", q, k, v) == expected


def test_sdpa_requests_and_constraints():
    import torch

    from sd_vram.simulation.profile import GPUProfile
    from sd_vram.simulation.sdpa import choose_backend, needs_output_accumulator

    p = GPUProfile(compute_capability=(9, 0), cudnn_version=91900)
    q, k, v = _qkv(1, 1, 4096, 512)
    assert choose_backend(p, "flash", q, k, v) == "efficient"   # flash can't: next in order
    assert choose_backend(p, "math", q, k, v) == "math"
    q, k, v = _qkv(1, 12, 77, 64)
    mask = torch.empty(1, 1, 77, 77, dtype=torch.float16, device="meta")
    a100 = GPUProfile(compute_capability=(8, 0))
    assert choose_backend(a100, "auto", q, k, v, attn_mask=mask) == "efficient"  # flash: no masks
    assert choose_backend(a100, "auto", q, k, v) == "flash"
    q, k, v = _qkv(1, 1, 64, 36)                                # 36 % 8 != 0
    assert choose_backend(GPUProfile(compute_capability=(7, 5)), "auto", q, k, v) == "math"
    assert needs_output_accumulator(*_qkv(1, 1, 64, 512)[:2])
    assert not needs_output_accumulator(*_qkv(1, 1, 64, 128)[:2])
    assert not needs_output_accumulator(*_qkv(1, 1, 64, 512, dtype=torch.float32)[:2])


def test_sdpa_key_length_one_goes_to_flash():
    """cuDNN refuses a key length of 1: the UNet's self-attention over 1 token (64x64 image,
    lowest level) ran FLASH_ATTENTION on the H200, its cross-attention (77 keys) cuDNN."""
    from sd_vram.simulation.profile import get_profile
    from sd_vram.simulation.sdpa import choose_backend

    h200 = get_profile("h200")
    assert choose_backend(h200, "auto", *_qkv(2, 8, 1, 160)) == "flash"
    assert choose_backend(h200, "auto", *_qkv(2, 8, 1, 160, nk=77)) == "cudnn"


def test_cublas_workspace_size(monkeypatch):
    from sd_vram.simulation.profile import GPUProfile

    assert GPUProfile(compute_capability=(8, 0), cublas_workspace=12345).cublas_workspace_bytes == 12345
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    unmeasured = dict(cublas_workspace=None)
    assert GPUProfile(compute_capability=(9, 0), **unmeasured).cublas_workspace_bytes == 32 * MiB
    assert GPUProfile(compute_capability=(8, 0), **unmeasured).cublas_workspace_bytes == 4096 * KiB * 2 + 16 * KiB * 8
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    assert GPUProfile(compute_capability=(9, 0), **unmeasured).cublas_workspace_bytes == 32 * MiB
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert GPUProfile(compute_capability=(9, 0), **unmeasured).cublas_workspace_bytes == 128 * KiB


# --------------------------------------------------------------------------------------
# the pipeline on fake CUDA (small sizes; the meta pipeline is built once per process)
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim_small():
    from sd_vram.simulation import simulate

    return simulate(64, 96)


def test_simulate_reports_peaks_and_stages(sim_small, tmp_path):
    from sd_vram.stages import STAGES

    r = sim_small
    assert (r.height, r.width) == (64, 96)
    assert set(r.stages) == set(STAGES)
    assert r.peak_allocated == max(s.allocated for s in r.stages.values())
    assert r.peak_reserved >= r.peak_allocated > r.weights_bytes > 2 * (1 << 30)
    assert r.peak_stage in STAGES and r.peak_operator and r.peak_module
    assert sum(t.bytes for t in r.live_at_peak) == r.peak_allocated
    # the VAE's single 512-dim head never fits flash/cuDNN: memory-efficient on sm90
    assert any(k.startswith("vae") and v == "efficient" for k, v in r.sdpa_backends.items())
    d = r.to_dict()
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_stage", "stages",
                "peak_operator", "peak_module"):
        assert key in d
    assert set(d["stages"]["unet"]) >= {"allocated_bytes", "reserved_bytes", "operation"}
    png = r.plot_timeline(tmp_path / "t.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_rounding_and_bad_input():
    from sd_vram.formula.options import InputError
    from sd_vram.simulation import simulate

    with pytest.raises(InputError):
        simulate(7, 64)
    with pytest.raises(InputError):
        simulate(64, 64, attention="sage")


def test_full_step_count_reaches_the_same_peak():
    """50 steps x strength 0.8 = 41 UNet evaluations; 'auto' runs 6 and gets the same peaks."""
    from sd_vram.simulation import simulate

    auto = simulate(64, 64, steps="auto")
    full = simulate(64, 64, steps="full")
    assert (auto.unet_evals, full.unet_evals) == (6, 41)
    assert auto.peak_allocated == full.peak_allocated
    assert auto.peak_reserved == full.peak_reserved
    for name in auto.stages:
        assert auto.stages[name].allocated == full.stages[name].allocated, name
        assert auto.stages[name].reserved == full.stages[name].reserved, name


def test_unet_memo_replays_the_identical_stream():
    from sd_vram.formula.options import Options
    from sd_vram.simulation.call import record_call

    opts = Options(num_inference_steps=10, strength=0.5)       # 5 evaluations
    streams = []
    for memo in (True, False):
        rec, s, e, info = record_call(64, 64, options=opts, max_unet_evals=None, memo_unet=memo)
        streams.append([(ev.kind, ev.nbytes, ev.op, ev.stage) for ev in rec.events[s:e]])
        if memo:
            assert info["unet_replays"] >= 3
    assert streams[0] == streams[1]


def test_cfg_doubles_the_unet_stage_only():
    from sd_vram.simulation import simulate

    cfg = simulate(64, 64, guidance_scale=7.5, steps=2)
    no = simulate(64, 64, guidance_scale=1.0, steps=2)

    def allocs(r, stage):  # tensors only: a conv's workspace holds its filter, which CFG does not double
        return [(e.nbytes, e.shape) for e in r.events[r.call_start:]
                if e.kind == "alloc" and e.stage == stage and e.op != "cudnn_convolution:workspace"]

    assert allocs(cfg, "vae_decode") == allocs(no, "vae_decode")
    # the first step's torch.cat([latents] * 2) runs before the UNet's first forward, so by
    # the stage rules it belongs to vae_encode: that is the only difference there
    enc_cfg = allocs(cfg, "vae_encode")
    enc_cfg.remove((2 * 4 * 8 * 8 * 2, (2, 4, 8, 8)))
    assert enc_cfg == allocs(no, "vae_encode")
    unet_cfg = [s for n, s in allocs(cfg, "unet") if len(s) == 4 and s[1] == 320]
    unet_no = [s for n, s in allocs(no, "unet") if len(s) == 4 and s[1] == 320]
    assert unet_cfg and {s[0] for s in unet_cfg} == {2} and {s[0] for s in unet_no} == {1}
    assert max(n for n, _ in allocs(cfg, "unet")) == 2 * max(n for n, _ in allocs(no, "unet"))


def test_latent_output_has_no_decode_stage():
    from sd_vram.simulation import simulate

    r = simulate(64, 64, output_type="latent", steps=2)
    assert "vae_decode" not in r.stages and "safety_checker" not in r.stages
    assert r.to_dict()["stages"].keys() == {"setup", "text_encoder", "vae_encode", "unet"}


def test_no_safety_checker_option():
    from sd_vram.simulation import simulate

    r = simulate(64, 64, safety_checker=False, steps=2)
    assert "safety_checker" not in r.stages
    assert not any("safety_checker" in e.op for e in r.events[: r.call_start])


# --------------------------------------------------------------------------------------
# substitutions keep what reaches the device
# --------------------------------------------------------------------------------------

def test_preprocess_substitute_matches_the_pil_path():
    import numpy as np
    import torch
    from PIL import Image

    from sd_vram.simulation.patches import _make_preprocess
    from sd_vram.simulation.resident import meta_pipeline

    pipe = meta_pipeline(True)
    img = Image.fromarray(np.zeros((45, 67, 3), dtype=np.uint8))   # 67 wide, 45 high
    real = pipe.image_processor.preprocess(img)
    sub = _make_preprocess(40, 64)(img)
    assert real.shape == sub.shape == torch.Size([1, 3, 40, 64])
    assert real.stride() == sub.stride() and real.dtype == sub.dtype == torch.float32
    assert real.is_contiguous(memory_format=torch.channels_last)


def test_feature_extractor_substitute_matches_clip_processor():
    import numpy as np
    from PIL import Image

    from sd_vram.simulation.patches import _FeatureExtractorStub
    from sd_vram.simulation.resident import meta_pipeline

    fe = meta_pipeline(True).feature_extractor
    img = [Image.fromarray(np.zeros((40, 64, 3), dtype=np.uint8))]
    real = fe(img, return_tensors="pt").pixel_values
    sub = _FeatureExtractorStub(fe)(img, return_tensors="pt").pixel_values
    assert real.shape == sub.shape and real.dtype == sub.dtype


# --------------------------------------------------------------------------------------
# empty_cache, GPU profiles, cuDNN conv workspaces, host-to-device copies
# --------------------------------------------------------------------------------------

def test_profiles_are_the_equations():
    """One GPUProfile class: the simulation reads the equation's profiles themselves."""
    from sd_vram.formula import gpu_profiles
    from sd_vram.simulation.profile import GPUProfile, get_profile

    assert GPUProfile is gpu_profiles.GPUProfile
    for name in gpu_profiles.profiles():
        assert get_profile(name) == gpu_profiles.get(name)
    assert GPUProfile().name == "default"
    assert get_profile(None) is get_profile("default")


def test_conv_rules():
    from sd_vram.formula.kernels import ConvRule
    from sd_vram.simulation.profile import get_profile

    vae3 = ConvRule.from_dict({"module": r"^vae\.", "kernel": 3, "formula": "input + output + weight"})
    assert vae3.matches("vae.decoder.up_blocks.2.upsamplers.0.conv", (3, 3))
    assert not vae3.matches("vae.decoder.up_blocks.2.resnets.0.conv_shortcut", (1, 1))
    assert not vae3.matches("unet.conv_in", (3, 3))
    assert vae3.bytes(input=10, output=20, weight=3) == 33
    assert ConvRule.from_dict({"module": "", "formula": "max(input, output) // 2"}).bytes(input=8, output=6, weight=0) == 4
    for bad in ("__import__('os')", "input ** 2", "output.real"):
        with pytest.raises(ValueError):
            ConvRule.from_dict({"module": "", "formula": bad})
    h200 = get_profile("h200")
    assert h200.conv_rules and not h200.with_(conv_workspace_rule="none").conv_rules
    custom = h200.with_(conv_workspace_rules=({"module": "^unet", "formula": "output"},))
    assert [r.formula for r in custom.conv_rules] == ["output"]


def test_h2d_temporary():
    """copy_kernel_cuda: a blocking copy with a dtype change stages through a contiguous
    device tensor when the destination is not contiguous (the channels-last image)."""
    import torch

    from sd_vram.simulation.kernel_hooks import h2d_temporary_bytes

    src = torch.empty(1, 40, 64, 3, dtype=torch.float32, device="meta").permute(0, 3, 1, 2)
    dst = torch.empty_strided(src.shape, src.stride(), dtype=torch.float16, device="meta")
    assert h2d_temporary_bytes(dst, src, non_blocking=False) == 3 * 40 * 64 * 2
    assert h2d_temporary_bytes(dst, src, non_blocking=True) == 3 * 40 * 64 * 4
    contiguous = torch.empty(1, 3, 40, 64, dtype=torch.float16, device="meta")
    assert h2d_temporary_bytes(contiguous, src, non_blocking=False) == 0
    same = torch.empty_strided(src.shape, src.stride(), dtype=torch.float32, device="meta")
    assert h2d_temporary_bytes(same, src, non_blocking=False) == 0   # one cudaMemcpyAsync


def test_conv_workspace_events(sim_small):
    """Workspace after the conv output, freed at once; sized by the profile's rule."""
    r = sim_small
    ev = r.events
    H, W = r.height, r.width
    idx = [i for i, e in enumerate(ev) if e.kind == "alloc" and e.op == "cudnn_convolution:workspace"]
    assert idx and all(ev[i].module.startswith(("vae.", "unet.")) for i in idx)
    # the UNet's 3x3 convs hold their filter too (up_blocks.0: 2560 -> 1280, 59 MB)
    assert max(ev[i].nbytes for i in idx if ev[i].module == "unet.up_blocks.0.resnets.0.conv1") > 2560 * 1280 * 9 * 2
    up = [i for i in idx if ev[i].module == "vae.decoder.up_blocks.2.upsamplers.0.conv"]
    assert len(up) == 1
    i = up[0]
    full = 256 * H * W * 2
    assert ev[i].nbytes == full + full + 256 * 256 * 9 * 2      # input + output + weight
    assert ev[i - 1].kind == "alloc" and ev[i - 1].op == "convolution.default" and ev[i - 1].nbytes == full
    assert ev[i + 1].kind == "free" and ev[i + 1].key == ev[i].key


def test_conv_workspace_off():
    from sd_vram.simulation import get_profile, simulate

    r = simulate(64, 64, steps=1, strength=0.5, num_inference_steps=2,
                 profile=get_profile("default").with_(conv_workspace_rule="none"))
    assert not any(e.op == "cudnn_convolution:workspace" for e in r.events)


@pytest.mark.parametrize("steps, strength", [(2, 0.5), (1, 1.0), (50, 0.0), (3, 0.8)])
def test_unet_evaluations_match_the_simulation(steps, strength):
    """The equation's count of UNet evaluations is the one the real pipeline code runs."""
    from sd_vram.formula.options import unet_evaluations
    from sd_vram.simulation import simulate

    r = simulate(64, 64, steps="full", num_inference_steps=steps, strength=strength)
    assert r.unet_evals == unet_evaluations(steps, strength)
