"""Each baseline estimator against figures worked out by hand from its published formula.

The input is 640 wide and 427 high (the size first guessed for the balloon seed image): the pipeline sees 640x424
(each side rounded down to a multiple of 8), latents 80 x 53. Every expected figure below
is written out from the source's formula, not taken from the code under test.
"""

import pytest

from sd_vram.formula import InputError, Options
from sd_vram.formula import baselines as b

H, W = 427, 640          # as the user gives it
H8, W8 = 424, 640        # as the pipeline sees it
h, w = 53, 80            # latent
MiB, GiB = 2**20, 2**30

# fp16 weights from the exact parameter counts (DESIGN.md) + int64 position_ids
UNET = 2 * 859_520_964                   # 1_719_041_928
TEXT = 2 * 123_060_480 + 8 * 77          # 246_121_576
VAE = 2 * 83_653_863                     # 167_307_726
SAFETY = 2 * 303_981_588 + 8 * 257       # 607_965_232
UNET_TEXT_VAE = UNET + TEXT + VAE        # 2_132_471_230


def test_weight_bytes_are_the_exact_fp16_sizes():
    assert b.weight_bytes("unet") == 1_719_041_928
    assert b.weight_bytes("text_encoder") == 246_121_576
    assert b.weight_bytes("vae") == 167_307_726
    assert b.weight_bytes("safety_checker") == 607_965_232


def test_seed_notebook_by_hand():
    weights = 2 * (860e6 + 123e6 + 35e6)                           # 2_036_000_000
    # levels: n_i = (53 / 2^i)(80 / 2^i) = 4240, 1060, 265, 66.25
    maps = 2 * (320 * 4240 + 640 * 1060 + 1280 * 265 + 1280 * 66.25)  # 4_918_400
    attention = 2 * (8 * (4240**2 + 1060**2 + 265**2 + 66.25**2) + 3 * 2_459_200)  # 321_568_225
    clip = 2 * 77 * 768 * 12                                       # 1_419_264
    vae = 2 * 64 * 424 * 640                                       # 34_734_080
    assert maps == 4_918_400 and attention == 321_568_225
    expected = int(1.12 * (weights + maps + attention + clip + vae))   # 1.12 x 2_398_639_969
    assert expected == 2_686_476_765
    assert b.seed_notebook(H, W, 77) == expected


def test_seed_notebook_ignores_options_and_grows_with_the_prompt():
    base = b.seed_notebook(H, W, 77, Options())
    assert b.seed_notebook(H, W, 77, Options(guidance_scale=1.0, safety_checker=False)) == base
    # 10 tokens fewer: 1.12 x 2 x 10 x 768 x 12 bytes fewer (within float rounding)
    assert abs((base - b.seed_notebook(H, W, 67)) - 1.12 * 2 * 10 * 768 * 12) <= 1


def test_comfyui_by_hand_default():
    # UNet: area = 2 (CFG batch) x 53 x 80 = 8480; fused attention: 8480 x 2 x 0.01 x 1.0 MiB = 169.6 MiB
    unet_wm = 8480 * 2 * 0.01 * 1.0 * MiB
    decode = 2178 * 53 * 80 * 64 * 2          # 1_182_044_160
    encode = 1767 * 424 * 640 * 2             # 958_986_240
    reserve = 400 * MiB
    min_inference = 0.8 * GiB + reserve       # 1_278_423_859.2
    assert decode == 1_182_044_160 and encode == 958_986_240
    extra = max(max(min_inference, x + reserve) for x in (unet_wm, decode, encode))
    assert extra == decode + reserve == 1_601_474_560   # the VAE decode decides
    assert b.comfyui(H, W) == UNET_TEXT_VAE + 1_601_474_560 == 3_733_945_790


def test_comfyui_without_fused_attention_uses_the_015_branch():
    unet_wm = 8480 * 0.15 * 1.0 * MiB          # 1272 MiB = 1_333_788_672
    assert unet_wm + 400 * MiB == 1_753_219_072  # now above the decode's 1_601_474_560
    assert b.comfyui(H, W, 77, Options(attention="math")) == UNET_TEXT_VAE + 1_753_219_072 == 3_885_690_302


def test_comfyui_latent_output_has_no_decode():
    # encode 958_986_240 + 400 MiB = 1_378_416_640 beats 0.8 GiB + 400 MiB = 1_278_423_859.2
    assert b.comfyui(H, W, 77, Options(output_type="latent")) == UNET_TEXT_VAE + 1_378_416_640 == 3_510_887_870


def test_comfyui_unet_working_memory_counts_images():
    one = b.comfyui_unet_working_memory(H, W, Options())
    four = b.comfyui_unet_working_memory(H, W, Options(num_images_per_prompt=4))
    assert one == pytest.approx(169.6 * MiB) and four == pytest.approx(4 * 169.6 * MiB)


def test_invokeai_by_hand():
    decode = 424 * 640 * 2 * 2200              # 1_193_984_000, below the 3 GiB default
    assert decode < 3 * GiB
    assert b.invokeai(H, W) == UNET_TEXT_VAE + 3 * GiB == 5_353_696_702
    # the truck, 4032x3024: decode 4032 x 3024 x 2 x 2200 = 53_648_179_200 bytes
    assert b.invokeai(3024, 4032) == UNET_TEXT_VAE + 53_648_179_200 == 55_780_650_430
    # tiled: 512 x 512 x 2 x 2200 x 1.25 = 1_441_792_000 < 3 GiB
    assert b.invokeai(3024, 4032, 77, Options(vae_tiling=True)) == UNET_TEXT_VAE + 3 * GiB


def test_hf_accelerate_by_hand():
    assert b.hf_accelerate(H, W) == int(1.2 * (UNET_TEXT_VAE + SAFETY)) == 3_288_523_754
    assert b.hf_accelerate(H, W, 77, Options(safety_checker=False)) == int(1.2 * UNET_TEXT_VAE) == 2_558_965_476
    assert b.hf_accelerate(3024, 4032) == b.hf_accelerate(H, W)   # weights only: no image term


def test_all_baselines_and_rounding_to_multiples_of_8():
    got = b.all_baselines(H, W)
    assert set(got) == {x.name for x in b.BASELINES} == {"seed notebook f", "ComfyUI", "InvokeAI", "HF accelerate"}
    assert got == b.all_baselines(H8, W8)   # 427 and 424 are the same image to the pipeline
    assert all(x.counts and x.fn.__doc__ for x in b.BASELINES)


@pytest.mark.parametrize("hw", [(0, 640), (427, 7), (-8, 640), (427.0, 640), (True, 640)])
def test_bad_sizes_raise_input_error(hw):
    for x in b.BASELINES:
        with pytest.raises(InputError):
            x.fn(*hw, 77, None)
