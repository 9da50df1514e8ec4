"""torch.backends.cudnn settings: enabled (Options.cudnn), benchmark and deterministic.

cuDNN off is derived from PyTorch's source (ConvolutionMM2d.cu: one im2col columns buffer of
C_in x kH x kW x H_out x W_out elements, none for an unpadded stride-1 1x1 conv): the figures
below are worked from that formula here, not read back from the code under test, and the
equation is held to the simulation of diffusers' code. cudnn.benchmark's peak depends on the
memory free at the search (Conv_v8.cpp get_plans_from_find): a range, flagged as such.
"""

from __future__ import annotations

import pytest

from pathlib import Path

from sd_vram.formula import InputError, Options, estimate, gpu_profiles, kernels

CATALOGUE = Path(__file__).resolve().parents[1] / "cases" / "catalogue.toml"

H200 = {"gpu": "h200"}
FP16 = 2


# --- the native convolution's columns ------------------------------------------------------------

def test_columns_follow_slow_conv2d():
    cols = kernels.native_conv_columns
    assert cols(128, 3, (64, 64)) == 128 * 3 * 3 * 64 * 64 * FP16
    assert cols(320, 1, (32, 32)) == 0                        # requires_columns is false
    assert cols(320, 1, (32, 32), padding=(1, 1)) == 320 * 32 * 32 * FP16
    assert cols(128, 3, (32, 32), stride=(2, 2), padding=(0, 0)) == 128 * 9 * 32 * 32 * FP16   # VAE downsampler
    assert cols(3, 14, (16, 16), stride=(14, 14), padding=(0, 0)) == 3 * 14 * 14 * 16 * 16 * FP16  # CLIP patches


def test_columns_do_not_grow_with_the_batch():
    conv = kernels.NativeConv()
    one = conv("unet.x", 3, (1, 320, 32, 32), 0, 0, 0)
    four = conv("unet.x", 3, (4, 320, 32, 32), 0, 0, 0)
    assert one == four == 320 * 9 * 32 * 32 * FP16           # the buffer is reused per batch element
    assert conv("vae.x", 3, (1, 128, 65, 65), 0, 0, 0, output_shape=(1, 128, 32, 32)) == 128 * 9 * 32 * 32 * FP16


def test_without_cudnn_the_decoder_peaks_at_the_upsampler_columns():
    H = W = 256
    e = estimate(H, W, prompt_length=20, cudnn=False, **H200)
    assert e.peak_stage == "vae_decode"
    terms = [(c, t, b) for c, t, b in _peak_terms(e)]
    columns = [b for c, t, b in terms if t == kernels.NATIVE_COLUMNS]
    assert columns == [256 * 9 * H * W * FP16]                # 256 -> 256, 3x3, full resolution
    assert not any(t == kernels.ConvWorkspace.term for _, t, _ in terms)
    assert e.conv_workspace.startswith("native")
    # the derived columns are far larger than cuDNN's transposed copies (in + out + filter)
    assert e.peak_allocated > estimate(H, W, prompt_length=20, **H200).peak_allocated


def _peak_terms(e):
    from sd_vram.formula import equation
    from sd_vram.formula.activations import Shape

    o = Options(**{k: v for k, v in e.options.items()})
    profile = gpu_profiles.get(o.gpu)
    s = Shape(H=e.height, W=e.width, n=o.num_images_per_prompt, B=o.unet_batch, cfg=o.cfg)
    cands = equation._stage_candidates(s, o, profile)[e.peak_stage]
    return max(cands, key=lambda p: p.total).terms


def test_native_columns_have_no_fallback_under_a_budget():
    full = estimate(380, 396, prompt_length=20, cudnn=False, **H200)
    b = estimate(380, 396, prompt_length=20, cudnn=False, vram=full.peak_device - 160 * 2**20, **H200).boundary
    assert b.fallbacks == [] and b.verdict in ("fits", "oom")
    if b.verdict == "oom":
        assert b.oom.stage == "vae_decode"


# --- benchmark and deterministic ---------------------------------------------------------------------

def test_benchmark_is_a_range_up_to_the_card():
    base = estimate(512, 512, prompt_length=20, **H200)
    e = estimate(512, 512, prompt_length=20, cudnn_benchmark=True, **H200)
    floor = estimate(512, 512, prompt_length=20, _floor=True, **H200)
    profile = gpu_profiles.get("h200")
    assert (e.peak_allocated, e.peak_reserved) == (base.peak_allocated, base.peak_reserved)
    lo, hi = e.bounds["peak_allocated_bytes"]
    assert lo <= floor.peak_allocated and hi == profile.total_memory - profile.cuda_context
    assert e.bounds["peak_device_bytes"][1] == profile.total_memory
    d = e.to_dict()
    assert "run-time state" in d["depends_on_runtime_state"] and "derived" in d["depends_on_runtime_state"]
    assert "depends_on_runtime_state" not in base.to_dict()


def test_deterministic_does_not_use_workspaces_measured_without_it():
    h200 = gpu_profiles.get("h200")
    key = kernels.conv_key("vae.decoder.up_blocks.2.upsamplers.0.conv", (1, 256, 512, 512))
    probed = h200.with_(conv_workspaces={key: 3 << 30})
    measured = estimate(512, 512, prompt_length=20, gpu=probed)
    rules = estimate(512, 512, prompt_length=20, gpu=h200)
    det = estimate(512, 512, prompt_length=20, gpu=probed, cudnn_deterministic=True)
    assert measured.peak_allocated > rules.peak_allocated + (2 << 30)
    assert det.peak_allocated == rules.peak_allocated
    lo, hi = det.bounds["peak_allocated_bytes"]
    assert lo < det.peak_allocated < hi and "deterministic" in det.conv_workspace


# --- validation and the CLI ----------------------------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    ({"cudnn": "no"}, "cudnn must be True or False"),
    ({"cudnn_benchmark": 1}, "cudnn_benchmark must be True or False"),
    ({"cudnn_deterministic": None}, "cudnn_deterministic must be True or False"),
    ({"cudnn": False, "cudnn_benchmark": True}, "cudnn_benchmark needs cuDNN"),
    ({"cudnn": False, "cudnn_deterministic": True}, "cudnn_deterministic needs cuDNN"),
])
def test_bad_values_are_one_line(kw, words):
    with pytest.raises(InputError) as e:
        Options(**kw)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_contradictory_flags_are_one_cli_line(capsys):
    from sd_vram.cli import main

    assert main(["estimate", "64x64", "--no-cudnn", "--cudnn-benchmark"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs cuDNN" in err[0]


def test_flags_say_what_is_derived():
    from sd_vram.option_flags import option_flags

    helps = {f.flag: f.help for f in option_flags()}
    for flag in ("--no-cudnn", "--cudnn-benchmark", "--cudnn-deterministic"):
        assert "derived, not measured on a GPU" in helps[flag], flag


# --- the GPU suite -------------------------------------------------------------------------------------

def test_suite_holds_benchmark_to_its_range():
    from sd_vram.plugin.checks import compare

    bands = {"peak_allocated": 0.01, "peak_reserved": 0.03, "peak_device": 0.03}
    pred = estimate(512, 512, prompt_length=20, cudnn_benchmark=True, **H200).to_dict()
    lo, hi = pred["bounds"]["peak_allocated_bytes"]
    inside = {"peak_allocated_bytes": (lo + hi) // 2, "peak_reserved_bytes": pred["bounds"]["peak_reserved_bytes"][1],
              "peak_device_bytes": None, "peak_stage": "unet"}
    checks, stage = compare(pred, inside, bands)
    assert all(c.ok for c in checks) and stage["ok"]          # far from the point, inside the range
    outside = {**inside, "peak_allocated_bytes": lo - 1}
    checks, _ = compare(pred, outside, bands)
    assert not next(c for c in checks if c.quantity == "peak_allocated").ok
    plain = estimate(512, 512, prompt_length=20, **H200).to_dict()
    checks, stage = compare(plain, inside, bands)
    assert not all(c.ok for c in checks) and not stage["ok"]  # a point prediction keeps its band


def test_gpu_backend_sets_and_restores_the_cudnn_flags():
    torch = pytest.importorskip("torch")
    from sd_vram.plugin.gpu import cudnn_flags

    cudnn = torch.backends.cudnn
    before = (cudnn.enabled, cudnn.benchmark, cudnn.deterministic)
    with cudnn_flags(Options(cudnn_benchmark=True, cudnn_deterministic=True)):
        assert (cudnn.enabled, cudnn.benchmark, cudnn.deterministic) == (True, True, True)
    with cudnn_flags(Options(cudnn=False)):
        assert (cudnn.enabled, cudnn.benchmark, cudnn.deterministic) == (False, False, False)
    assert (cudnn.enabled, cudnn.benchmark, cudnn.deterministic) == before


def test_catalogue_has_the_cudnn_cases():
    from sd_vram.plugin.cases import load_catalogue

    cases = {c.name: c for c in load_catalogue(CATALOGUE).select(tags="cudnn")}
    for prefix, field in (("no-cudnn", "cudnn"), ("cudnn-benchmark", "cudnn_benchmark")):
        mine = [c for n, c in cases.items() if n.startswith(prefix + ".")]
        assert {c.image for c in mine if c.image} == {"balloon--low-res.jpeg", "groceries--low-res.jpg",
                                                       "bench--high-res.jpg", "truck--high-res.jpg"}
        assert len(mine) == 6 and all(getattr(c.opts, field) != getattr(Options(), field) for c in mine)
    assert any(c.opts.cudnn_deterministic for c in cases.values())


# --- the equation against the simulation of diffusers' code ----------------------------------------------

@pytest.mark.parametrize("height,width,extra", [(64, 64, {}), (256, 256, {"guidance_scale": 1.0})],
                         ids=["64x64", "no-cfg-256x256"])
def test_no_cudnn_equation_matches_simulation(height, width, extra):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from sd_vram.simulation import simulate

    opts = {**H200, "cudnn": False, **extra}
    e = estimate(height, width, prompt_length=20, **opts)
    sim = simulate(height, width, prompt_length=20, **opts)
    assert abs(e.peak_allocated - sim.peak_allocated) <= 0.01 * sim.peak_allocated
    assert abs(e.peak_reserved - sim.peak_reserved) <= 0.03 * sim.peak_reserved
    assert e.peak_stage == sim.peak_stage == "vae_decode"
    # without CFG the UNet's own peak is its level-0 conv with its columns (activations.unet_level0_conv)
    unet, sim_unet = e.stages["unet"].allocated, sim.stages["unet"].allocated
    assert abs(unet - sim_unet) <= 0.01 * sim_unet
