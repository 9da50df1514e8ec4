"""Invariants of the closed-form equation (no GPU, no torch)."""

import subprocess
import sys

import pytest

from sd_vram.formula import Estimate, InputError, estimate, f
from sd_vram.formula.activations import nbytes

SIZES = [8, 64, 200, 512, 640, 1000, 2048, 4096]


@pytest.mark.parametrize("fixed", [64, 512, 3000])
def test_monotone_in_height_and_width(fixed):
    for quantity in ("peak_allocated", "peak_reserved", "peak_device"):
        by_h = [getattr(estimate(x, fixed), quantity) for x in SIZES]
        by_w = [getattr(estimate(fixed, x), quantity) for x in SIZES]
        assert by_h == sorted(by_h), quantity
        assert by_w == sorted(by_w), quantity


def test_prompt_length_changes_nothing():
    # padding="max_length" makes every prompt 77 tokens on the GPU
    base = estimate(427, 640, prompt_length=0)
    for n in (1, 53, 75, 76, 200):
        e = estimate(427, 640, prompt_length=n)
        assert (e.peak_allocated, e.peak_reserved, e.peak_device, e.peak_stage) == (
            base.peak_allocated, base.peak_reserved, base.peak_device, base.peak_stage)


def test_prompt_text_is_counted_and_truncation_reported():
    assert estimate(512, 512, prompt="a red bicycle").prompt_tokens == 3
    long = estimate(512, 512, prompt=" ".join(["balloon"] * 80))
    assert long.prompt_tokens == 80 and long.truncated
    assert not estimate(512, 512, prompt_length=75).truncated
    assert estimate(512, 512, prompt_length=76).truncated


def test_sizes_round_down_to_multiples_of_8():
    a, b = estimate(427, 645), estimate(424, 640)
    assert (a.height, a.width) == (424, 640)
    assert a.to_dict() == b.to_dict() | {"height": 424, "width": 640}


def _working_set(e: Estimate, stage: str) -> int:
    comp = e.stages[stage].components
    return comp.get("activations", 0) + comp.get("attention", 0)


def test_cfg_doubles_only_the_unet_working_set():
    on, off = estimate(768, 768, guidance_scale=7.5), estimate(768, 768, guidance_scale=1.0)
    assert _working_set(on, "unet") == 2 * _working_set(off, "unet")
    for stage in ("vae_encode", "vae_decode"):
        assert _working_set(on, stage) == _working_set(off, stage)


def test_images_per_prompt_scale_unet_and_decode():
    one, two = estimate(512, 512, gpu="h200"), estimate(512, 512, gpu="h200", num_images_per_prompt=2)
    assert _working_set(two, "unet") == 2 * _working_set(one, "unet")
    assert _working_set(two, "vae_encode") == _working_set(one, "vae_encode")  # image encoded once
    # The decoder runs at batch 2. cuDNN takes another engine for the upsampler conv there, so
    # the peak moves to up_blocks[3].resnets[0].conv1, whose live set doubles exactly.
    assert "up_blocks.3.resnets.0.conv1" in two.stages["vae_decode"].operation
    from sd_vram.formula import activations as act
    shape = act.Shape(H=512, W=512, n=1, B=2, cfg=True)
    conv1 = {n: act.vae_decode_conv1(shape, n, 512, 512, "nchw_transpose").total for n in (1, 2)}
    assert conv1[2] == 2 * conv1[1] - 128 * 256 * 9 * 2  # the filter's copy is per call, not per image


def test_latent_output_has_no_decode_or_safety_stage():
    e = estimate(512, 512, output_type="latent")
    assert set(e.stages) == {"text_encoder", "vae_encode", "unet"}
    assert e.peak_stage == "vae_encode"


def test_no_safety_checker_drops_its_weights_and_stage():
    with_sc, without = estimate(512, 512), estimate(512, 512, safety_checker=False)
    assert "safety_checker" not in without.stages
    assert with_sc.breakdown["weights_safety_checker"] > 600e6
    assert "weights_safety_checker" not in without.breakdown
    assert with_sc.peak_allocated - without.peak_allocated == with_sc.breakdown["weights_safety_checker"]


def test_math_attention_adds_the_n_squared_scores():
    # 512x512: N = 64*64 tokens at UNet level 0, B = 2, 8 heads: two fp32 N x N matrices
    fused, math = estimate(512, 512, attention="flash"), estimate(512, 512, attention="math")
    assert math.peak_stage == "unet"
    scores = 2 * nbytes(2 * 8, 4096, 4096, itemsize=4)
    assert math.stages["unet"].components["attention"] >= scores
    extra = math.stages["unet"].allocated - fused.stages["unet"].allocated
    # plus _safe_softmax's boolean mask (1 byte per score) and fp32 q, k, v
    assert scores < extra < 1.25 * scores


def test_attention_slicing_costs_n_squared_in_fp16():
    # 1024x1024: N = 16384; "max" slices one (batch x head) row at a time: scores + softmax
    sliced = estimate(1024, 1024, attention_slicing="max")
    assert sliced.stages["unet"].components["attention"] == 2 * nbytes(1, 16384, 16384)


def test_a_slice_size_above_the_head_count_is_refused_as_diffusers_refuses_it():
    """UNet2DConditionModel.set_attention_slice (which pipe.enable_attention_slicing calls)
    raises for a slice size above an attention layer's head count: 8 in every SD1.5 UNet layer."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from sd_vram.models import sd15_config

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(sd15_config()["unet"])
    unet.set_attention_slice(8)
    with pytest.raises(ValueError, match="smaller or equal to 8"):
        unet.set_attention_slice(9)
    assert estimate(512, 512, attention_slicing=8).peak_allocated > 0
    with pytest.raises(InputError, match="8 heads"):
        estimate(512, 512, attention_slicing=9)
    from sd_vram.simulation import simulate

    with pytest.raises(InputError, match="8 heads"):       # before any model is built
        simulate(64, 64, attention_slicing=9)


def test_default_peak_is_the_decoder_upsampler_conv_and_its_workspace():
    e = estimate(1024, 1024, gpu="h200")
    assert e.peak_stage == "vae_decode"
    assert "upsamplers.0.conv" in e.stages["vae_decode"].operation
    full = 256 * 1024 * 1024 * 2  # one 256-channel fp16 map at full resolution
    comp = e.stages["vae_decode"].components
    # cuDNN's NHWC engine: transposed input + output + filter (profile rule "nchw_transpose")
    assert comp["workspace"] == 2 * full + 256 * 256 * 9 * 2
    # conv input and output at full res; up_blocks.1 output (512 ch) and resnet output (256 ch) at H/2
    assert comp["activations"] == 2 * full + full // 2 + full // 4


def test_without_conv_workspace_the_peak_is_three_full_resolution_maps(monkeypatch):
    from sd_vram.formula import gpu_profiles
    import dataclasses
    plain = dataclasses.replace(gpu_profiles.get("h200"), conv_workspace_rule="none")
    monkeypatch.setattr(gpu_profiles, "get", lambda name: plain)
    e = estimate(1024, 1024)
    assert e.stages["vae_decode"].components["activations"] == 3 * 256 * 1024 * 1024 * 2


def test_quantities_are_ordered():
    for h, w in [(64, 64), (427, 640), (3024, 4032)]:
        e = estimate(h, w)
        assert e.peak_allocated <= e.peak_reserved < e.peak_device


@pytest.mark.parametrize("bad", [0, -8, 7, 12.5, "512", None, True])
def test_bad_sizes_are_input_errors(bad):
    with pytest.raises(InputError):
        estimate(bad, 512)


@pytest.mark.parametrize("options", [
    {"guidance": 5.0}, {"attention": "sage"}, {"num_images_per_prompt": 0},
    {"strength": 1.5}, {"strength": 0.8, "num_inference_steps": 1}, {"output_type": "jpeg"}, {"gpu": "no-such-gpu"},
    {"attention_slicing": 0},
])
def test_bad_options_are_input_errors(options):
    with pytest.raises(InputError):
        estimate(512, 512, **options)


def test_prompt_and_length_together_is_an_error():
    with pytest.raises(InputError):
        estimate(512, 512, prompt="x", prompt_length=3)


def test_notebook_signature():
    out = f(427, 640, 53)
    assert set(out) == {"bytes", "GB", "breakdown"}
    assert out["bytes"] == estimate(427, 640).peak_allocated
    assert out["GB"] == pytest.approx(out["bytes"] / 1e9)


def test_estimate_imports_neither_torch_nor_diffusers():
    code = ("import sys; from sd_vram.formula import estimate; estimate(427, 640, prompt='a b c'); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_estimate_speed(benchmark):
    result = benchmark(estimate, 427, 640, prompt_length=53)
    assert result.peak_allocated > 0


# (steps, strength) at the edges of diffusers' img2img schedule
EDGES = [(50, 0.8), (50, 0.0), (50, 0.01), (2, 0.5), (2, 0.0), (1, 1.0), (1, 0.5), (3, 0.8), (4, 0.3), (10, 1.0)]


def _diffusers_evaluations(steps: int, strength: float) -> int:
    """The timesteps diffusers 0.42.1's own get_timesteps leaves, on the SD1.5 scheduler."""
    from types import SimpleNamespace

    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionImg2ImgPipeline

    from sd_vram.models import build_scheduler

    sched = build_scheduler()
    sched.set_timesteps(steps, device="cpu")
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=sched), steps, strength, "cpu")
    return len(timesteps)


@pytest.mark.parametrize("steps, strength", EDGES)
def test_unet_evaluations_follow_diffusers(steps, strength):
    from sd_vram.formula.options import unet_evaluations

    assert unet_evaluations(steps, strength) == _diffusers_evaluations(steps, strength)


@pytest.mark.parametrize("strength", [0, 0.01])
def test_low_strength_runs_one_step(strength):
    """diffusers 0.42 runs strength 0 and 0.01 (one UNet evaluation); the equation answers."""
    e = estimate(512, 512, strength=strength)
    assert e.peak_allocated > 0 and e.options["strength"] == strength


def test_no_timestep_left_is_refused():
    """1 step at strength < 1 leaves diffusers no timestep: it then decodes an empty batch and fails."""
    assert _diffusers_evaluations(1, 0.5) == 0
    with pytest.raises(InputError, match="leaves no denoising step"):
        estimate(512, 512, num_inference_steps=1, strength=0.5)
    assert estimate(512, 512, num_inference_steps=1, strength=1.0).peak_allocated > 0
