"""channels_last (Options.channels_last): the UNet's and VAE's weights in torch.channels_last.

Derived from PyTorch's sources (kernels.py section 4b, DERIVATION.md section 20): NHWC cuDNN
convolutions whose NCHW inputs are copied first, GroupNorm's NCHW copies up to torch 2.12, no
NHWC workspace. The figures below are worked from those rules here; the equation is held to
the simulation of diffusers' code, in which the layouts come from the fake tensors' strides.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from sd_vram.formula import InputError, Options, estimate, gpu_profiles, kernels
from sd_vram.formula.activations import NHWC_COPY

pytestmark = pytest.mark.usefixtures("no_shell_alloc_conf")   # tests/conftest.py

H200 = {"gpu": "h200"}
# a stack whose GroupNorm keeps NHWC (kernels.py section 4b: taken as torch 2.14)
TORCH_214 = dataclasses.replace(gpu_profiles.get("h200"), name="h200-torch-2.14", torch_version=(2, 14))
FP16 = 2


def _peak_terms(height, width, **options):
    from sd_vram.formula import equation

    _, _, _, o, profile, s = equation._setup(height, width, None, 20, options)
    e = estimate(height, width, prompt_length=20, **options)
    cands = equation._stage_candidates(s, o, profile)[e.peak_stage]
    return e, max(cands, key=lambda p: p.total).terms


# --- the kernel facts ---------------------------------------------------------------------------

def test_group_norm_rule_matches_the_installed_torch():
    """The version rule (kernels.group_norm_keeps_channels_last) against what this torch does:
    F.group_norm of a (fake) CUDA NHWC map copies it to contiguous (aten.clone) exactly when the
    rule says GroupNorm does not keep NHWC. torch 2.13.0 still copies (pytorch/pytorch#191945
    came after it branched); a later wheel that stops copying fails this test until the rule
    follows."""
    import types

    import torch
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty_strided((1, 64, 8, 8), (64 * 8 * 8, 1, 8 * 64, 64), dtype=torch.float16, device="cuda")
        with Ops() as ops:
            F.group_norm(x, 32)
    installed = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    keeps = kernels.group_norm_keeps_channels_last(types.SimpleNamespace(torch_version=installed))
    assert any(op.startswith("aten.clone") for op in ops.seen) == (not keeps), ops.seen


def test_layouts_follow_the_option_and_the_stack():
    h200 = gpu_profiles.get("h200")                            # torch 2.11: GroupNorm copies
    assert kernels.Layouts.of(Options(channels_last=True), h200).norm_copies
    assert not kernels.Layouts.of(Options(channels_last=True), TORCH_214).norm_copies
    assert kernels.Layouts.of(Options(), TORCH_214) == kernels.Layouts()   # NCHW weights: nothing changes


# --- the equation -------------------------------------------------------------------------------

def test_decoder_peak_trades_the_workspace_for_one_input_copy():
    """At decoder.up_blocks.3.resnets.0.conv1 (256 -> 128, full res): NCHW takes cuDNN's transposing
    workspace (input + output + filter); channels_last holds the upsampler's output x, silu(norm1(x)),
    its NHWC copy and the conv output y: 3 x + y, no workspace."""
    H, W = 512, 768
    x, y = 256 * H * W * FP16, 128 * H * W * FP16
    e, terms = _peak_terms(H, W, channels_last=True, **H200)
    assert e.peak_stage == "vae_decode" and "up_blocks.3.resnets.0.conv1" in e.stages["vae_decode"].operation
    assert sum(b for c, _, b in terms if c == "activations") == 3 * x + y
    assert [b for _, t, b in terms if t == NHWC_COPY] == [x]
    assert not any(c == "workspace" for c, _, _ in terms)
    # NCHW peaks at the upsampler: 2 full-res maps + workspace (2 maps + filter) + 2 half-res ones
    assert e.stages["vae_decode"].allocated < estimate(H, W, prompt_length=20, **H200).stages["vae_decode"].allocated


def test_where_group_norm_keeps_nhwc_the_decoder_peaks_at_its_silu():
    """No copies: conv1 holds x, silu(x) and its output (2 x 256 ch + 128 ch), less than the three
    256-ch maps at silu(norm1(x)); with the copies conv1 had a third 256-ch map."""
    H = W = 512
    old = estimate(H, W, prompt_length=20, channels_last=True, **H200)
    new, terms = _peak_terms(H, W, channels_last=True, gpu=TORCH_214)
    assert not any(t == NHWC_COPY for _, t, _ in terms)
    assert "silu(norm1(x))" in new.stages["vae_decode"].operation
    assert old.peak_allocated - new.peak_allocated == 128 * H * W * FP16   # 3 x + y against 3 x


def test_large_decodes_copy_around_the_upsampler():
    """diffusers' Upsample2D makes its input contiguous once the interpolated map passes 2^31
    elements: for the decoder's 256-ch upsampler into full resolution that is b x H x W > 2^24 px.
    With channels-last weights the copy to NCHW and the conv's copy back put a fourth full-res
    256-ch map beside the interpolated one: 1920 P against conv1's 1792 P (P = H x W)."""
    at = lambda s: estimate(s, s, prompt_length=20, channels_last=True, **H200)   # noqa: E731
    assert "resnets.0.conv1" in at(4096).stages["vae_decode"].operation       # 4096^2 = 2^24: not above
    assert "up_blocks.2.upsamplers.0.conv" in at(4104).stages["vae_decode"].operation


def test_channels_last_bounds_cover_heavy_nhwc_engines():
    """The NHWC workspaces are derived (none): even on a profile with a measured context the bounds
    stay open, and their top covers engines as heavy as the heaviest NCHW ones on record."""
    e = estimate(640, 424, prompt_length=20, channels_last=True, **H200)
    lo, hi = e.bounds["peak_allocated_bytes"]
    assert lo < e.peak_allocated < hi
    assert hi > estimate(640, 424, prompt_length=20, **H200).peak_allocated


def test_bad_values_are_one_line_errors():
    with pytest.raises(InputError, match="channels_last must be True or False"):
        Options(channels_last="yes")
    with pytest.raises(InputError, match="channels_last with cudnn=False is not modelled"):
        Options(channels_last=True, cudnn=False)


def test_cli_flag_and_its_refusal():
    run = lambda *a: subprocess.run([sys.executable, "-m", "sd_vram.cli", "estimate", "640x424", *a],  # noqa: E731
                                    capture_output=True, text=True)
    ok = run("--channels-last", "--gpu-profile", "h200")
    assert ok.returncode == 0 and "UNet and VAE channels_last" in ok.stdout
    bad = run("--channels-last", "--no-cudnn")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "not modelled" in bad.stderr


# --- against the simulation ------------------------------------------------------------------------

CASES = [
    ("256", 256, 256, {}),
    ("images2-512", 512, 512, {"num_images_per_prompt": 2}),
    ("fp32-512x384", 384, 512, {"dtype": "fp32"}),
    ("txt2img-768", 768, 768, {"pipeline": "txt2img", "pipe_height": 768, "pipe_width": 768}),
    ("vae-tiling-768", 768, 768, {"vae_tiling": True}),
    ("upsampler-copies-4160", 4160, 4160, {}),
]


@pytest.mark.parametrize("name,height,width,opts", CASES, ids=[c[0] for c in CASES])
def test_equation_matches_simulation(name, height, width, opts):
    _compare(height, width, {**opts, **H200})


def test_equation_matches_simulation_where_group_norm_keeps_nhwc():
    _compare(512, 512, {"gpu": TORCH_214})


def _compare(height, width, opts):
    pytest.importorskip("diffusers")
    from sd_vram.simulation import simulate

    sim = simulate(height, width, prompt_length=20, channels_last=True, **opts)
    e = estimate(height, width, prompt_length=20, channels_last=True, **opts)
    msg = f"equation {e.peak_allocated:,} / {e.peak_reserved:,} at {e.peak_stage}; simulation {sim.peak_allocated:,} / {sim.peak_reserved:,} at {sim.peak_stage}"
    assert e.peak_stage == sim.peak_stage, msg
    assert abs(e.peak_allocated / sim.peak_allocated - 1) <= 0.01, msg
    assert abs(e.peak_reserved / sim.peak_reserved - 1) <= 0.03, msg


# --- the simulation's layouts ---------------------------------------------------------------------

def _copies(profile):
    pytest.importorskip("diffusers")
    from sd_vram.simulation import simulate

    sim = simulate(256, 256, prompt_length=20, channels_last=True, profile=profile, steps=1)
    ops = [ev for ev in sim.events if ev.kind == "alloc" and ev.op == "convolution:input.contiguous(channels_last)"]
    return sim, {ev.module.rsplit(".", 1)[-1] for ev in ops}


def test_simulated_copies_sit_after_group_norm_where_it_copies():
    """torch 2.11: every convolution fed by GroupNorm (+ SiLU) copies its NCHW input, and proj_out
    its .contiguous() input; the upsamplers', downsamplers' and shortcuts' inputs are NHWC (img2img:
    the UNet's conv_in gets the encoder's NHWC latents)."""
    sim, convs = _copies(gpu_profiles.get("h200"))
    assert {"conv1", "conv2", "proj_in", "proj_out", "conv_out"} <= convs
    assert not convs & {"conv", "conv_shortcut", "conv_in"}
    assert sim.resident_allocated == _resident(channels_last=False)   # the same weights, re-strided


def test_simulated_copies_where_group_norm_keeps_nhwc_only_at_proj_out():
    _, convs = _copies(TORCH_214)
    assert convs == {"proj_out"}


def _resident(**options):
    from sd_vram.simulation import simulate

    return simulate(256, 256, prompt_length=20, steps=1, **options, **H200).resident_allocated


def test_a_probed_nhwc_shape_reaches_the_simulation_too():
    """`sd-vram probe --channels-last` measures the NHWC convolutions under ":nhwc" keys: one such
    workspace, at the channels-last decoder's peak conv, moves the equation and the simulation
    alike, by the workspace (it sits on the peak), and the NCHW call not at all."""
    pytest.importorskip("diffusers")
    from sd_vram.simulation import simulate

    MiB = 1 << 20
    key = kernels.conv_key("vae.decoder.up_blocks.3.resnets.0.conv1", (1, 256, 256, 256), nhwc=True)
    h200 = gpu_profiles.get("h200")
    probed = h200.with_(name="probed-nhwc", source="probe", conv_workspaces={key: 512 * MiB})
    runs = {}
    for name, p in (("rule", h200), ("probed", probed)):
        e = estimate(256, 256, prompt_length=5, gpu=p, channels_last=True)
        sim = simulate(256, 256, prompt_length=5, profile=p, steps=1, channels_last=True)
        runs[name] = (e.stages["vae_decode"].allocated, sim.stages["vae_decode"].allocated)
        assert "up_blocks.3.resnets.0.conv1 " in e.stages["vae_decode"].operation
    for i in (0, 1):   # equation, simulation
        assert runs["probed"][i] - runs["rule"][i] == 512 * MiB, runs
    assert estimate(256, 256, gpu=probed).peak_allocated == estimate(256, 256, gpu=h200).peak_allocated
