"""txt2img and inpaint (issue 13): the equation against the simulation of each real diffusers
pipeline, and the new options' bad input.

The simulation runs StableDiffusionPipeline / StableDiffusionInpaintPipeline made by from_pipe
of the same meta components (simulation/pipelines.py); the equation derives each pipeline's
stages from its __call__ (formula/pipelines.py). Bands as for img2img
(tests/test_equation_vs_simulation.py): allocated 1 %, reserved 3 %, the same peak stage.
"""

from __future__ import annotations

import pytest

from sd_vram.formula import InputError, Options, estimate

ALLOCATED_BAND, RESERVED_BAND = 0.01, 0.03


def _check(height, width, **options):
    from sd_vram.simulation import simulate

    opts = {"gpu": "h200", "prompt_length": 20, **options}
    e = estimate(height, width, **opts)
    sim = simulate(height, width, **opts)
    msg = (f"equation {e.peak_allocated:,} / {e.peak_reserved:,} at {e.peak_stage} "
           f"({e.stages[e.peak_stage].operation}); simulation {sim.peak_allocated:,} / {sim.peak_reserved:,} "
           f"at {sim.peak_stage} ({sim.peak_operator} in {sim.peak_module})")
    assert abs(e.peak_allocated - sim.peak_allocated) <= ALLOCATED_BAND * sim.peak_allocated, msg
    assert e.peak_stage == sim.peak_stage, msg
    assert abs(e.peak_reserved - sim.peak_reserved) <= RESERVED_BAND * sim.peak_reserved, msg
    assert set(e.stages) == set(sim.stages) - {"setup"}, (sorted(e.stages), sorted(sim.stages))
    return e, sim


# --- txt2img ---------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(64, 64), (256, 256), (384, 512)], ids=["64", "256", "384x512"])
def test_txt2img_equation_matches_simulation(height, width):
    pytest.importorskip("diffusers")
    e, sim = _check(height, width, pipeline="txt2img")
    assert "vae_encode" not in sim.stages          # no image: the VAE encoder never runs
    assert sim.unet_evals == 6                      # steps="auto": the steady state, every timestep runs


def test_txt2img_default_size_is_512():
    """StableDiffusionPipeline.__call__: height = unet.config.sample_size * vae_scale_factor."""
    e = estimate(pipeline="txt2img")
    assert (e.height, e.width) == (512, 512)
    assert estimate(pipeline="txt2img", pipe_height=512, pipe_width=512).peak_allocated == e.peak_allocated
    assert estimate(512, 512, pipeline="txt2img").peak_allocated == e.peak_allocated


def test_txt2img_runs_every_timestep():
    """No strength: PNDM's n + 1 timesteps all run, as img2img at strength 1."""
    assert Options(pipeline="txt2img", num_inference_steps=50).unet_evaluations == \
        Options(strength=1.0, num_inference_steps=50).unet_evaluations == 51


def test_txt2img_has_no_vae_encode_and_the_same_weights():
    t2i, i2i = estimate(512, 512, pipeline="txt2img"), estimate(512, 512)
    assert "vae_encode" not in t2i.stages and "vae_encode" in i2i.stages
    resident = [k for k in i2i.breakdown if k.startswith("weights_")]
    assert all(t2i.breakdown[k] == i2i.breakdown[k] for k in resident)


# --- inpaint ---------------------------------------------------------------------------------

def _inpaint(h, w, **options):
    return {"pipeline": "inpaint", "mask_size": (h, w), "pipe_height": h, "pipe_width": w, **options}


@pytest.mark.parametrize("height,width,options", [
    (256, 256, {"inpaint_unet": "standard"}),
    (256, 256, {"inpaint_unet": "inpainting"}),
    (384, 512, {"inpaint_unet": "inpainting", "strength": 0.5}),   # strength < 1: the image is encoded too
    (128, 128, {"inpaint_unet": "standard", "padding_mask_crop": 16, "num_images_per_prompt": 2}),
], ids=["standard-256", "inpainting-256", "inpainting-384x512-strength-0.5", "standard-128-padding-crop-2-images"])
def test_inpaint_equation_matches_simulation(height, width, options):
    pytest.importorskip("diffusers")
    e, sim = _check(height, width, **_inpaint(height, width, **options))
    assert sim.weights_bytes == sum(v for k, v in e.breakdown.items() if k.startswith("weights_"))


def test_inpaint_runs_at_pipe_size_not_the_image_size():
    """StableDiffusionInpaintPipeline.__call__: height = height or unet.config.sample_size *
    vae_scale_factor, and preprocess resizes the image and the mask to it."""
    default = estimate(380, 396, pipeline="inpaint", mask_size=(380, 396))
    assert (default.height, default.width) == (512, 512)
    other_image = estimate(2048, 2048, pipeline="inpaint", mask_size=(2048, 2048))
    assert other_image.peak_allocated == default.peak_allocated
    assert Options(pipeline="inpaint").strength == 1.0 and Options().strength == 0.8


def test_inpainting_unet_weighs_its_conv_in_more():
    """The 9-channel UNet differs only in conv_in: 320 x 9 x 3 x 3 fp16 weights instead of 320 x 4 x 3 x 3."""
    from sd_vram.formula.allocator import block_bytes

    kw = {"pipeline": "inpaint", "mask_size": (512, 512)}
    std = estimate(512, 512, inpaint_unet="standard", **kw).breakdown["weights_unet"]
    inp = estimate(512, 512, inpaint_unet="inpainting", **kw).breakdown["weights_unet"]
    assert inp - std == block_bytes(320 * 9 * 9 * 2) - block_bytes(320 * 4 * 9 * 2)


def test_inpaint_standard_unet_keeps_image_latents():
    """The 4-channel UNet blends image_latents back each step: one latent-sized tensor more at
    every stage after the encoder than the 9-channel UNet at strength 1."""
    from sd_vram.formula.activations import nbytes

    kw = {"pipeline": "inpaint", "mask_size": (512, 512), "gpu": "h200"}
    std = estimate(512, 512, inpaint_unet="standard", **kw)
    inp = estimate(512, 512, inpaint_unet="inpainting", **kw)
    conv_in = inp.breakdown["weights_unet"] - std.breakdown["weights_unet"]
    assert std.stages["vae_decode"].allocated - (inp.stages["vae_decode"].allocated - conv_in) == nbytes(1, 4, 64, 64)


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("call,needle", [
    (lambda: estimate(512, 512, pipeline="txt2img", strength=0.5), "strength does not apply to txt2img"),
    (lambda: estimate(500, 512, pipeline="txt2img"), "multiple of 8"),
    (lambda: estimate(512, 512, pipeline="txt2img", pipe_height=768), "given twice"),
    (lambda: estimate(512, 512, pipe_height=512), "not an img2img option"),
    (lambda: estimate(512, 512, pipeline="sdxl"), "pipeline must be one of img2img, txt2img, inpaint"),
    (lambda: estimate(512, 512, pipeline="inpaint"), "needs a mask"),
    (lambda: estimate(512, 512, pipeline="inpaint", mask_size=(256, 512)), "the mask is 512x256 but the image is 512x512"),
    (lambda: estimate(512, 512, mask_size=(512, 512)), "only to the inpaint pipeline"),
    (lambda: estimate(512, 512, pipeline="inpaint", mask_size=(512, 512), inpaint_unet="sdxl"), "standard, inpainting"),
    (lambda: estimate(512, 512, pipeline="inpaint", mask_size=(512, 512), padding_mask_crop=32, output_type="np"),
     "padding_mask_crop needs output_type pil"),
    (lambda: estimate(pipeline="inpaint", mask_size=(512, 512)), "needs the image's height and width"),
])
def test_bad_input_is_one_line(call, needle):
    with pytest.raises(InputError) as e:
        call()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_inpaint_unet_read_from_a_model_folder(tmp_path, capsys):
    """--inpaint-unet DIR: unet/config.json's in_channels says which UNet (4 or 9); other counts are refused."""
    import json

    from sd_vram.cli import main

    (tmp_path / "unet").mkdir()
    args = ["estimate", "512x512", "--pipeline", "inpaint", "--mask", "512x512", "--json"]
    for channels, name in ((9, "inpainting"), (4, "standard")):
        (tmp_path / "unet" / "config.json").write_text(json.dumps({"in_channels": channels}))
        assert main([*args, "--inpaint-unet", str(tmp_path)]) == 0
        by_folder = json.loads(capsys.readouterr().out)
        assert main([*args, "--inpaint-unet", name]) == 0
        assert json.loads(capsys.readouterr().out) == by_folder
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"in_channels": 8}))
    assert main([*args, "--inpaint-unet", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "in_channels 8" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv,needle", [
    (["estimate", "512x512", "--pipeline", "txt2img", "--strength", "0.5"], "strength does not apply to txt2img"),
    (["estimate", "512x512", "--pipeline", "inpaint"], "needs a mask"),
    (["estimate", "512x512", "--pipeline", "inpaint", "--mask", "256x256"], "the mask is 256x256 but the image is 512x512"),
    (["estimate", "512x512", "--pipeline", "inpaint", "--mask", "no-such-mask.png"], "no such mask file"),
    (["estimate", "--pipeline", "inpaint", "--mask", "64x64"], "inpaint needs an IMAGE"),
    (["estimate"], "img2img needs an IMAGE"),
])
def test_cli_bad_input_is_one_line(capsys, argv, needle):
    from sd_vram.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
