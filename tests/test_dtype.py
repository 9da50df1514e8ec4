"""--dtype (Options.dtype): the pipeline's torch_dtype through weights, live sets, kernels and the simulation.

Invariants, not figures: fp32 tensors are twice fp16's bytes, so each fp32 weight block is
twice its fp16 block except where the 512-B rounding gave fp16 a partly empty last 512 B
(formula/allocator.py round_size); bf16 has fp16's sizes; the equation stays within the
bands of the simulation (tests/test_equation_vs_simulation.py) in bf16 and fp32.
"""

from __future__ import annotations

from math import prod

import pytest

from sd_vram.formula import architecture as arch
from sd_vram.formula import estimate, gpu_profiles, kernels
from sd_vram.formula.allocator import block_bytes
from sd_vram.formula.equation import weights
from sd_vram.formula.options import InputError, Options

ALLOCATED_BAND, RESERVED_BAND = 0.01, 0.03


def _fp32_block(fp16_bytes: int) -> int:
    """The fp32 block of a tensor whose fp16 bytes are b: 2b rounded up to 512 B equals twice
    b's block unless b's remainder modulo 512 is in (0, 256], where twice b's block carries
    a 512 B that 2b's rounding does not need."""
    r = fp16_bytes % 512
    twice = 2 * (fp16_bytes + (512 - r if r else 0))
    return twice - 512 if 0 < r <= 256 else twice


def _blocks(model: str, itemsize: int) -> list[int]:
    """Each tensor's block: its bytes rounded up to 512 B (allocator.block_bytes)."""
    return [block_bytes(prod(shape) * item) for _, shape, item in arch.in_dtype(arch.MODELS[model](), itemsize)]


@pytest.mark.parametrize("model", list(arch.MODELS))
def test_fp32_weights_are_twice_fp16_blocks(model):
    tensors = arch.MODELS[model]()
    expected = [_fp32_block(prod(shape) * item) if item == arch.FP16 else block_bytes(prod(shape) * item)
                for _, shape, item in tensors]      # int64 position_ids keep their 8 bytes
    assert _blocks(model, 4) == expected
    # Allocated bytes add what the allocator does not split off a cached block (a remainder of
    # 1 MiB or less stays with the block: CUDACachingAllocator.cpp should_split), which depends
    # on how the blocks pack: at most 1 MiB per tensor.
    for itemsize, blocks in ((2, _blocks(model, 2)), (4, expected)):
        allocated = weights(dtype={2: "fp16", 4: "fp32"}[itemsize])[model]
        assert 0 <= allocated - sum(blocks) <= (1 << 20) * len(blocks)


def test_bf16_sizes_are_fp16_sizes():
    assert weights(dtype="bf16") == weights(dtype="fp16")
    a, b = estimate(512, 512, gpu="h200"), estimate(512, 512, gpu="h200", dtype="bf16")
    assert {k: (v.allocated, v.reserved) for k, v in a.stages.items()} == \
        {k: (v.allocated, v.reserved) for k, v in b.stages.items()}


def test_bad_dtype_is_one_line():
    with pytest.raises(InputError) as e:
        Options(dtype="fp64")
    assert "fp16, bf16, fp32" in str(e.value) and "\n" not in str(e.value)


def test_sdpa_backends_by_dtype():
    """sdp_utils.cpp: flash and cuDNN attention take fp16/bf16 only; memory-efficient takes fp32
    on sm80+. The H200 profile prefers cuDNN for fp16 and bf16 and has to run fp32 elsewhere."""
    h200 = gpu_profiles.get("h200")
    call = dict(batch=2, heads=8, q_len=4096, kv_len=4096, d_qk=40)
    by = {d: kernels.sdpa_backend(h200, "auto", kernels.SdpaCall(**call, dtype=d))
          for d in ("float16", "bfloat16", "float32")}
    assert by["float16"] == by["bfloat16"] != by["float32"] == "efficient"
    for requested in ("flash", "cudnn"):
        assert kernels.sdpa_backend(h200, requested, kernels.SdpaCall(**call, dtype="float32")) == "efficient"
    # the fp32 efficient kernel keeps its output in registers: no fp32 accumulator at head dim 512
    assert kernels.efficient_output_accumulator("bfloat16", 512, 512)
    assert not kernels.efficient_output_accumulator("float32", 512, 512)


def test_measured_conv_workspaces_are_fp16_only():
    p = gpu_profiles.get("h200")
    key = kernels.conv_key("vae.decoder.conv_out", (1, 128, 64, 64))
    p = gpu_profiles.GPUProfile(**{**p.__dict__, "conv_workspaces": {key: 12345}})
    assert p.conv_workspace()("vae.decoder.conv_out", 3, (1, 128, 64, 64), 1, 1, 1) == 12345
    ws = p.conv_workspace(dtype="fp32")
    assert ws("vae.decoder.conv_out", 3, (1, 128, 64, 64), 1, 1, 1) != 12345 and ws.used == {"rule"}


torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


def test_simulated_pipeline_is_built_in_the_dtype():
    from sd_vram.simulation.resident import meta_pipeline, module_order

    pipe = meta_pipeline(True, "fp32")
    assert pipe.unet.dtype == torch.float32
    for name, module in module_order(pipe):
        tensors = list(module.parameters()) + list(module.buffers())
        assert sorted(block_bytes(t.numel() * t.element_size()) for t in tensors) == sorted(_blocks(name, 4))


@pytest.mark.parametrize("height,width,options", [
    (128, 128, {"dtype": "bf16"}),
    (256, 256, {"dtype": "fp32"}),
    (128, 128, {"dtype": "fp32", "attention": "math"}),   # no fp32 upcast in the math kernel
], ids=["bf16-128", "fp32-256", "fp32-math-128"])
def test_equation_matches_simulation(height, width, options):
    from sd_vram.simulation import simulate

    e = estimate(height, width, prompt_length=20, gpu="h200", **options)
    sim = simulate(height, width, prompt_length=20, gpu="h200", **options)
    msg = f"equation {e.peak_allocated:,} / {e.peak_reserved:,} at {e.peak_stage}; simulation " \
          f"{sim.peak_allocated:,} / {sim.peak_reserved:,} at {sim.peak_stage}"
    assert abs(e.peak_allocated - sim.peak_allocated) <= ALLOCATED_BAND * sim.peak_allocated, msg
    assert abs(e.peak_reserved - sim.peak_reserved) <= RESERVED_BAND * sim.peak_reserved, msg
    assert e.peak_stage == sim.peak_stage, msg
