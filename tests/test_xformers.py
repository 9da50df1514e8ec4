"""attention="xformers": pipe.enable_xformers_memory_efficient_attention() (DERIVATION.md,
"xformers attention"). Derived from the xformers 0.0.35 and diffusers 0.42.1 sources, not
measured on a GPU: the equation against the simulation, which runs diffusers' own
enable_xformers_memory_efficient_attention() and XFormersAttnProcessor on a stand-in xformers
(simulation/fake_xformers.py), and the dispatch facts of formula/kernels.py section 4.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from sd_vram.formula import activations as act
from sd_vram.formula import estimate, gpu_profiles, kernels
from sd_vram.formula.equation import _backends
from sd_vram.formula.options import InputError, Options

H200 = gpu_profiles.get("h200")
ALLOCATED_BAND, RESERVED_BAND = 0.01, 0.03


def test_dispatch_on_hopper():
    """dispatch.py's order on CUDA without flash_attn_3: fa2F-pt (PyTorch's flash: fp16/bf16,
    head dim <= 256 and a multiple of 8), else cutlassF-pt (PyTorch's memory-efficient)."""
    for d in (40, 80, 160, 256):
        op = kernels.xformers_forward_op(H200, d)
        assert (op.name, op.kernel) == (kernels.XF_FLASH, kernels.FLASH), d
    for d in (36, 264, 512):
        op = kernels.xformers_forward_op(H200, d)
        assert (op.name, op.kernel, op.splits) == (kernels.XF_CUTLASS, kernels.EFFICIENT, 1), d
    # diffusers' test call is fp32 (torch.randn without a dtype): no flash dtype
    assert kernels.xformers_forward_op(H200, 40, "float32").name == kernels.XF_CUTLASS
    assert kernels.xformers_forward_op(H200, 40, bias=True).name == kernels.XF_CUTLASS


def test_only_the_unet_and_vae_change_backend():
    """transformers' CLIP models have no set_use_memory_efficient_attention_xformers: they keep SDPA."""
    s = act.Shape(H=512, W=512, n=1, B=2, cfg=True)
    xf, auto = _backends(s, Options(attention="xformers"), H200), _backends(s, Options(), H200)
    assert xf["clip"] == auto["clip"]
    assert (str(xf["unet"]), str(xf["vae"])) == ("xformers[fa2F-pt]", "xformers[cutlassF-pt]")


def test_no_operator_is_one_input_error():
    """cutlass.FwOp stops at sm90 and flash at head dim 256: the VAE's 512 has no op on sm100."""
    blackwell = replace(H200, compute_capability=(10, 0))
    with pytest.raises(InputError, match="no forward operator for the vae's head dim 512") as e:
        estimate(512, 512, attention="xformers", gpu=blackwell)
    assert "\n" not in str(e.value)


def test_bad_value_names_xformers():
    with pytest.raises(InputError) as e:
        Options(attention="xformer")
    assert "xformers" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["estimate", "max-size", "simulate"])
def test_help_says_derived_not_measured(capsys, command):
    from sd_vram.cli import main

    try:
        main([command, "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    assert "xformers" in text and "enable_xformers_memory_efficient_attention() (xformers 0.0.35)" in text
    flag_help = text.rsplit("--attention {auto,cudnn,flash,efficient,math,xformers}", 1)[1]
    assert "not measured on a GPU" in flag_help.split("--attention-slicing")[0]


def test_slicing_replaces_xformers_in_the_unet_only():
    """enable_attention_slicing after xformers: the UNet's processors are sliced again; the VAE
    (no set_attention_slice) keeps xformers."""
    from sd_vram.formula.equation import _stage_candidates

    e = estimate(512, 512, attention="xformers", attention_slicing="auto", gpu="h200")
    s = estimate(512, 512, attention="auto", attention_slicing="auto", gpu="h200")
    assert e.stages["unet"].allocated == s.stages["unet"].allocated
    shape = act.Shape(H=512, W=512, n=1, B=2, cfg=True)
    cands = _stage_candidates(shape, Options(attention="xformers", attention_slicing="auto"), H200)
    assert not any("xformers" in p.operation for p in cands["unet"])
    assert any(p.operation.endswith("xformers[cutlassF-pt]") for p in cands["vae_decode"])


def test_a_skipped_measurement_is_a_skipped_case():
    """plugin/gpu.py marks an xformers case "skipped" where xformers does not import: the
    suite reports it as skipped with the reason, never compares its missing peaks."""
    from sd_vram.plugin.checks import evaluate

    rec = {"id": "xformers-512x512", "prediction": {"peak_reserved_bytes": 1},
           "measurement": {"status": "skipped", "error": "xformers does not import here"}}
    evaluate(rec, {}, "NVIDIA H200")
    assert rec["outcome"] == "skipped" and "xformers does not import here" in rec["message"]


# --- against the simulation of diffusers' code -------------------------------------------------

pytest.importorskip("torch")
pytest.importorskip("diffusers")

SIZES = [(64, 64), (128, 192)]


@pytest.fixture(scope="module")
def simulated():
    from sd_vram.simulation import simulate

    return {(h, w): simulate(h, w, prompt_length=20, gpu="h200", attention="xformers") for h, w in SIZES}


@pytest.mark.parametrize("height,width", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_equation_matches_simulation(simulated, height, width):
    e = estimate(height, width, prompt_length=20, gpu="h200", attention="xformers")
    sim = simulated[(height, width)]
    msg = (f"equation {e.peak_allocated:,} / {e.peak_reserved:,} at {e.peak_stage}; simulation "
           f"{sim.peak_allocated:,} / {sim.peak_reserved:,} at {sim.peak_stage} ({sim.peak_module})")
    assert abs(e.peak_allocated - sim.peak_allocated) <= ALLOCATED_BAND * sim.peak_allocated, msg
    assert e.peak_stage == sim.peak_stage, msg
    assert abs(e.peak_reserved - sim.peak_reserved) <= RESERVED_BAND * sim.peak_reserved, msg


def test_simulation_ran_diffusers_xformers_processor(simulated):
    """Every UNet and VAE attention went through xformers with the op the equation charges;
    the text encoder and the safety checker through SDPA's own choice; the shared meta
    pipeline has its AttnProcessor2_0 back afterwards."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from sd_vram.simulation.resident import meta_pipeline

    s = act.Shape(H=128, W=192, n=1, B=2, cfg=True)
    eq = _backends(s, Options(attention="xformers"), H200)
    choices = simulated[(128, 192)].sdpa_backends
    by_model = {}
    for key, op in choices.items():
        by_model.setdefault(key.split()[0], set()).add(op)
    assert by_model["unet"] == {str(eq["unet"])}
    assert by_model["vae"] == {str(eq["vae"])}
    assert by_model["text_encoder"] == by_model["safety_checker"] == {eq["clip"]}
    pipe = meta_pipeline(True)
    for model in (pipe.unet, pipe.vae):
        assert all(isinstance(p, AttnProcessor2_0) for p in model.attn_processors.values())


def _window_increment(sim, prefix: str) -> int:
    """The simulation's allocated peak inside the first call of the module `prefix`, above
    what was allocated just before it."""
    window = []
    for i in range(sim.call_start, len(sim.events)):
        if sim.events[i].module.startswith(prefix):
            window.append(i)
        elif window:
            break
    return max(sim.allocated_series[i] for i in window) - sim.allocated_series[window[0] - 1]


@pytest.mark.parametrize("height,width", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_attention_working_sets_match_simulation(simulated, height, width):
    """Above what the caller holds, the processor's own peak: the UNet's level-0 self-attention
    (q, k, v copies, output, then batch_to_head_dim's copy at 64x64; the kernel's two fp32
    split-KV buffers, larger, at 128x192) and the VAE decoder's mid-block (one head: no copies;
    output and the fp32 accumulator), each within 1 % of the simulation's."""
    h, w = height, width
    sim = simulated[(h, w)]
    s = act.Shape(H=h, W=w, n=1, B=2, cfg=True)
    be = _backends(s, Options(attention="xformers"), H200)
    N = s.h * s.w
    unet = max(p.total for p in act.xformers_self_attention(act.Peak("held"), be["unet"], 2, 8, N, 40))
    mid = act._vae_mid_attention(s, 1, s.h, s.w, be["vae"], "decoder")
    vae = mid.total - sum(b for _, name, b in mid.terms if name.startswith("mid-block input, resnets.0 output"))
    for prefix, equation in (("unet.up_blocks.3.attentions.0.transformer_blocks.0.attn1", unet),
                             ("vae.decoder.mid_block.attentions.0", vae)):
        simulated_bytes = _window_increment(sim, prefix)
        assert abs(equation - simulated_bytes) <= 0.01 * simulated_bytes, (prefix, equation, simulated_bytes)
