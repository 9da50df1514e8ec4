"""The live sets, schedules and weights read the architecture from the config (issue 13 item 3).

A modified config (other UNet block_out_channels, other layers_per_block, the inpainting
UNet's 9 input channels) is a config change for both sides: the equation reads it through
formula/architecture.spec, the simulation builds the diffusers models from it
(sd_vram.models.build_pipeline(config=...)). They must agree as they do for SD1.5 (bands of
tests/test_equation_vs_simulation.py), and the enumerated weights must be the built model's.
"""

from __future__ import annotations

import copy

import pytest

from sd_vram.formula import architecture as arch
from sd_vram.formula import estimate
from sd_vram.formula.options import InputError

ALLOCATED_BAND, RESERVED_BAND = 0.01, 0.03


def _config(**unet) -> dict:
    c = copy.deepcopy(arch.sd15())
    c["unet"].update(unet)
    return c


HALF_WIDTH = _config(block_out_channels=[160, 320, 640, 640])
ONE_LAYER = _config(layers_per_block=1)
INPAINT_UNET = _config(in_channels=9)


def test_spec_follows_the_config():
    s = arch.spec(HALF_WIDTH)
    assert s.unet_channels == (160, 320, 640, 640) and s.time_embed_dim == 4 * 160
    assert s.unet_skips()[0] == (0, 160) and len(s.unet_skips()) == 1 + 4 * 2 + 3
    assert len(arch.spec(ONE_LAYER).unet_skips()) == 1 + 4 * 1 + 3
    assert arch.spec(INPAINT_UNET).unet_in_channels == 9 and arch.spec().unet_in_channels == 4


def test_the_equation_follows_the_config():
    base, half = estimate(512, 512, gpu="h200"), estimate(512, 512, gpu="h200", architecture=HALF_WIDTH)
    assert half.stages["unet"].components["weights_unet"] < base.stages["unet"].components["weights_unet"] / 3
    assert "(1280 -> 640, 3x3" in estimate(64, 64, gpu="h200", architecture=HALF_WIDTH).stages["unet"].operation
    # conv_in of the inpainting UNet: 9 input channels instead of 4, its filter 5 x 320 x 9 more elements
    inpaint = estimate(512, 512, gpu="h200", architecture=INPAINT_UNET)
    assert inpaint.stages["unet"].components["weights_unet"] > base.stages["unet"].components["weights_unet"]


def test_unmodelled_block_pattern_is_one_input_error():
    bad = _config(down_block_types=["CrossAttnDownBlock2D"] * 4)
    with pytest.raises(InputError) as e:
        estimate(512, 512, architecture=bad)
    assert "block pattern" in str(e.value) and "\n" not in str(e.value)


torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.mark.parametrize("config", [HALF_WIDTH, ONE_LAYER, INPAINT_UNET], ids=["half-width", "one-layer", "inpaint"])
def test_weights_are_the_built_unet(config):
    from sd_vram import models

    with torch.device("meta"):
        unet = models.build_unet(config)
    tensors = arch.model_tensors("unet", arch.spec(config))
    assert arch.numel(tensors) == sum(p.numel() for p in unet.parameters())
    assert [s for _, s, _ in tensors] == [tuple(p.shape) for p in unet.parameters()]


@pytest.mark.parametrize("config,size", [(HALF_WIDTH, 256), (ONE_LAYER, 128)], ids=["half-width-256", "one-layer-128"])
def test_equation_matches_simulation_of_the_config(config, size):
    from sd_vram.simulation import simulate

    e = estimate(size, size, prompt_length=20, gpu="h200", architecture=config)
    sim = simulate(size, size, prompt_length=20, gpu="h200", architecture=config)
    msg = f"equation {e.peak_allocated:,} / {e.peak_reserved:,} at {e.peak_stage}; simulation " \
          f"{sim.peak_allocated:,} / {sim.peak_reserved:,} at {sim.peak_stage}"
    assert abs(e.peak_allocated - sim.peak_allocated) <= ALLOCATED_BAND * sim.peak_allocated, msg
    assert abs(e.peak_reserved - sim.peak_reserved) <= RESERVED_BAND * sim.peak_reserved, msg
    assert e.peak_stage == sim.peak_stage, msg
    # the UNet stage on its own (the stage the config changes)
    eu, su = e.stages["unet"].allocated, sim.stages["unet"].allocated
    assert abs(eu - su) <= ALLOCATED_BAND * su, (eu, su)
