"""The kernel table (formula/kernels.py): one source for the equation and the simulation."""

import pytest

from sd_vram.formula import gpu_profiles, kernels
from sd_vram.formula.equation import _backends, estimate
from sd_vram.formula.activations import Shape
from sd_vram.formula.options import SDPA_BACKENDS, Options

KiB, MiB = 1 << 10, 1 << 20


@pytest.mark.parametrize("cc, expected", [
    ((9, 0), 32 * MiB),                       # Hopper: 4096 KiB x 8
    ((8, 0), 4096 * KiB * 2 + 16 * KiB * 8),  # ":4096:2:16:8" everywhere else
    ((8, 6), 4096 * KiB * 2 + 16 * KiB * 8),
    ((7, 5), 4096 * KiB * 2 + 16 * KiB * 8),
    ((10, 0), 4096 * KiB * 2 + 16 * KiB * 8),  # sm90 exactly (major 9, minor 0), not "9 or later"
    ((12, 0), 4096 * KiB * 2 + 16 * KiB * 8),
])
def test_cublas_workspace_by_architecture(cc, expected):
    assert kernels.cublas_workspace(cc, env={}) == expected
    assert kernels.cublaslt_workspace(cc, env={}) == 1 * MiB
    assert gpu_profiles.GPUProfile(compute_capability=cc).cublas_workspace_bytes == (
        kernels.cublas_workspace(cc))


def test_cublas_workspace_config():
    assert kernels.cublas_workspace((9, 0), {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}) == 128 * KiB
    assert kernels.cublas_workspace((8, 0), {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}) == 32 * MiB
    assert kernels.cublas_workspace((8, 0), {"CUBLAS_WORKSPACE_CONFIG": ":4096:2:16:8"}) == 8 * MiB + 128 * KiB
    assert kernels.cublas_workspace((9, 0), {"CUBLAS_WORKSPACE_CONFIG": "garbage"}) == 32 * MiB
    # cuBLASLt: capped at the cuBLAS workspace, its own size in KiB, none when unified
    assert kernels.cublaslt_workspace((9, 0), {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}) == 128 * KiB
    assert kernels.cublaslt_workspace((9, 0), {"CUBLASLT_WORKSPACE_SIZE": "4096"}) == 4 * MiB
    assert kernels.cublaslt_workspace((9, 0), {"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "1"}) == 0
    assert kernels.cublaslt_workspace((9, 0), {"CUBLAS_WORKSPACE_CONFIG": ":16:8",
                                               "TORCH_CUBLASLT_UNIFIED_WORKSPACE": "0"}) == 1 * MiB


def test_measured_cublas_workspaces_are_the_derived_ones():
    """The H200 and H100 archives measured what CublasHandlePool.cpp gives sm90."""
    for name in ("h200", "h100"):
        p = gpu_profiles.get(name)
        assert p.cublas_workspace == kernels.cublas_workspace(p.compute_capability, env={})
        assert p.cublaslt_workspace == kernels.cublaslt_workspace(p.compute_capability, env={})


STACKS = {
    "h200": dict(compute_capability=(9, 0), cudnn_version=91900, torch_version=(2, 11)),
    "a100": dict(compute_capability=(8, 0), cudnn_version=91900, torch_version=(2, 11)),
    "rtx3060": dict(compute_capability=(8, 6), cudnn_version=90100, torch_version=(2, 11)),
    "t4": dict(compute_capability=(7, 5), cudnn_version=90100, torch_version=(2, 11)),
    "b200": dict(compute_capability=(10, 0), cudnn_version=91900, torch_version=(2, 13)),
}


@pytest.mark.parametrize("stack", STACKS, ids=list(STACKS))
@pytest.mark.parametrize("requested", SDPA_BACKENDS)   # xformers: tests/test_xformers.py
def test_equation_and_simulation_choose_the_same_sdpa_backend(stack, requested):
    """The equation's backends per model are the simulation's for the same tensors."""
    import torch

    from sd_vram.simulation.sdpa import choose_backend

    profile = gpu_profiles.GPUProfile(**STACKS[stack])
    s = Shape(H=512, W=512, n=1, B=2, cfg=True)
    eq = _backends(s, Options(attention=requested), profile)
    shapes = {"unet": (2, 8, 64 * 64, 40), "vae": (1, 1, 64 * 64, 512), "clip": (1, 12, 77, 64)}
    for model, (b, h, n, d) in shapes.items():
        q = torch.empty(b, n, h, d, dtype=torch.float16, device="meta").transpose(1, 2)
        assert eq[model] == choose_backend(profile, requested, q, q, q), model


def test_flash_cannot_run_the_vae_head_dim():
    """sdp_utils.cpp check_head_dim_size_flash: head dims <= 256. With attention="flash" the
    VAE's head dim 512 runs memory-efficient (the next in PyTorch's order), and the equation
    charges its fp32 output accumulator as it does for attention="efficient"."""
    s = Shape(H=512, W=512, n=1, B=2, cfg=True)
    for requested in ("flash", "cudnn"):
        assert _backends(s, Options(attention=requested), gpu_profiles.get("h200"))["vae"] == "efficient"
    flash, efficient = estimate(512, 512, attention="flash"), estimate(512, 512, attention="efficient")
    assert flash.stages["vae_encode"].components == efficient.stages["vae_encode"].components


def _vae_decode_peaks(**options):
    from sd_vram.simulation import simulate

    e = estimate(256, 256, prompt_length=5, gpu="h200", **options)
    sim = simulate(256, 256, prompt_length=5, gpu="h200", steps=1, **options)
    return e.stages["vae_decode"].allocated, sim.stages["vae_decode"].allocated


def test_one_fact_moves_the_equation_and_the_simulation(monkeypatch):
    """Change one fact of the kernel table, the VAE's 3x3 conv workspace rule: the equation
    and the simulation both move, by about the same bytes (the peak conv may change), and
    still agree within the allocated band of tests/test_equation_vs_simulation.py."""
    eq0, sim0 = _vae_decode_peaks()
    rules = tuple({**r, "formula": "2 * (input + output + weight)"}
                  if r == {"module": r"^vae\.", "kernel": 3, "formula": "input + output + weight"} else r
                  for r in kernels.CONV_RULE_SETS["nchw_transpose"])
    monkeypatch.setitem(kernels.CONV_RULE_SETS, "nchw_transpose", rules)
    kernels._rules.cache_clear()
    try:
        eq1, sim1 = _vae_decode_peaks()
    finally:
        monkeypatch.undo()
        kernels._rules.cache_clear()
    assert eq1 > eq0 and sim1 > sim0
    assert abs((eq1 - eq0) - (sim1 - sim0)) <= 0.05 * (sim1 - sim0)
    assert abs(eq1 - sim1) <= 0.01 * sim1


def test_a_probed_shape_reaches_the_simulation_too():
    """A probed profile's workspace for one exact conv shape replaces the rule in both."""
    from sd_vram.simulation import simulate

    key = kernels.conv_key("vae.decoder.up_blocks.2.upsamplers.0.conv", (1, 256, 256, 256))
    probed = gpu_profiles.get("h200").with_(source="probe", conv_workspaces={key: 512 * MiB})
    runs = {}
    for name, p in (("rule", gpu_profiles.get("h200")), ("probed", probed)):
        e = estimate(256, 256, prompt_length=5, gpu=p)
        sim = simulate(256, 256, prompt_length=5, profile=p, steps=1)
        runs[name] = (e.stages["vae_decode"].allocated, sim.stages["vae_decode"].allocated)
    rule_ws = 2 * 256 * 256 * 256 * 2 + 256 * 256 * 9 * 2       # 65.1 MiB
    for i in (0, 1):   # equation, simulation: the peak holds the measured 512 MiB instead
        assert 512 * MiB - rule_ws - 2 * MiB <= runs["probed"][i] - runs["rule"][i] <= 512 * MiB - rule_ws
    eq, sim = runs["probed"]
    assert abs(eq - sim) <= 0.01 * sim
