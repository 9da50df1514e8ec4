"""The closed-form equation against the GPU-free simulation of the real pipeline code.

Two independent derivations of the same numbers: the equation sums the tensors it derives
from the architecture (formula/activations.py, schedule.py); the simulation runs diffusers'
own code on fake CUDA tensors and records what it allocates. Both use the same GPU profile
(kernel workspaces, cuBLAS), so a disagreement is a tensor one of them gets wrong.

Bands (issue 3): peak_allocated within 1 % and the same peak stage; peak_reserved within 3 %.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sd_vram.formula import estimate, gpu_profiles, schedule  # noqa: E402
from sd_vram.formula.activations import Shape  # noqa: E402
from sd_vram.formula.allocator import CachingAllocator, kSmallSize, round_size  # noqa: E402
from sd_vram.simulation import simulate  # noqa: E402

ALLOCATED_BAND, RESERVED_BAND = 0.01, 0.03
PROFILE = {"gpu": "h200"}

# (id, height, width, options)
CASES = [
    *[(f"square-{s}", s, s, {}) for s in (64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)],
    ("balloon", 380, 396, {}), ("groceries", 534, 800, {}),
    ("bench", 2048, 2048, {}), ("truck", 1200, 1800, {}),
    ("stand-in-truck-4032x3024", 3024, 4032, {}),
    ("odd-389x517", 389, 517, {}), ("odd-777x1001", 777, 1001, {}), ("not-64-1000x712", 1000, 712, {}),
    ("wide-256x4096", 256, 4096, {}), ("tall-4096x256", 4096, 256, {}), ("strip-64x2048", 64, 2048, {}),
    ("no-cfg-512", 512, 512, {"guidance_scale": 1.0}), ("no-cfg-1024", 1024, 1024, {"guidance_scale": 1.0}),
    ("images2-512", 512, 512, {"num_images_per_prompt": 2}),
    ("images3-384", 384, 384, {"num_images_per_prompt": 3}),
    ("flash-512", 512, 512, {"attention": "flash"}), ("efficient-512", 512, 512, {"attention": "efficient"}),
    ("cudnn-512", 512, 512, {"attention": "cudnn"}),
    ("math-128", 128, 128, {"attention": "math"}), ("math-256", 256, 256, {"attention": "math"}),
    ("math-384", 384, 384, {"attention": "math"}),
    ("slicing-auto-512", 512, 512, {"attention_slicing": "auto"}),
    ("slicing-max-768", 768, 768, {"attention_slicing": "max"}),
    ("vae-tiling-1024", 1024, 1024, {"vae_tiling": True}),
    ("max-split-512-1024", 1024, 1024, {"alloc_conf": "max_split_size_mb:512"}),   # PYTORCH_CUDA_ALLOC_CONF
    ("roundup-4-768", 768, 768, {"alloc_conf": "roundup_power2_divisions:4"}),
    ("vae-tiling-1536", 1536, 1536, {"vae_tiling": True}),
    # the UNet's order decides the segments; the second evaluation adds one (DERIVATION.md 8)
    ("vae-tiling-2048", 2048, 2048, {"vae_tiling": True}),
    ("vae-slicing-images2-768", 768, 768, {"vae_slicing": True, "num_images_per_prompt": 2}),
    ("no-safety-512", 512, 512, {"safety_checker": False}), ("no-safety-64", 64, 64, {"safety_checker": False}),
    ("latent-512", 512, 512, {"output_type": "latent"}), ("latent-2048", 2048, 2048, {"output_type": "latent"}),
    ("expandable-1024", 1024, 1024, {"expandable_segments": True}),
    ("expandable-truck", 3024, 4032, {"expandable_segments": True}),
]


@pytest.mark.parametrize("height,width,options", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_equation_matches_simulation(height, width, options):
    opts = {**PROFILE, **options}
    expandable = opts.pop("expandable_segments", False)
    e = estimate(height, width, prompt_length=20, expandable_segments=expandable, **opts)
    sim = simulate(height, width, prompt_length=20, expandable_segments=expandable, **opts)
    err_alloc = (e.peak_allocated - sim.peak_allocated) / sim.peak_allocated
    err_res = (e.peak_reserved - sim.peak_reserved) / sim.peak_reserved
    msg = (f"equation {e.peak_allocated:,} B allocated / {e.peak_reserved:,} reserved at {e.peak_stage} "
           f"({e.stages[e.peak_stage].operation}); simulation {sim.peak_allocated:,} / {sim.peak_reserved:,} "
           f"at {sim.peak_stage} ({sim.peak_operator} in {sim.peak_module})")
    assert abs(err_alloc) <= ALLOCATED_BAND, f"allocated {err_alloc:+.2%}: {msg}"
    assert e.peak_stage == sim.peak_stage, msg
    assert abs(err_res) <= RESERVED_BAND, f"reserved {err_res:+.2%}: {msg}"


class _OrderLog:
    """Allocations above 1 MiB and their frees, in order: ("alloc", rounded bytes, n) for the
    n-th such allocation, ("free", 0, n) when it is freed."""

    def __init__(self):
        self.log: list[tuple[str, int, int]] = []
        self._number: dict[object, int] = {}         # key of a live allocation -> n
        self._allocs = 0

    def alloc(self, key, nbytes: int) -> None:
        if round_size(nbytes) > kSmallSize:
            self._number[key] = self._allocs
            self.log.append(("alloc", round_size(nbytes), self._allocs))
            self._allocs += 1

    def free(self, key) -> None:
        if key in self._number:
            self.log.append(("free", 0, self._number.pop(key)))


class _RecordingAllocator(CachingAllocator):
    """The equation's allocator model, logging what it is asked for (_OrderLog)."""

    def __init__(self):
        super().__init__()
        self.order = _OrderLog()

    def malloc(self, n):
        b = super().malloc(n)
        self.order.alloc(id(b), n)
        return b

    def free(self, b):
        self.order.free(id(b))
        super().free(b)


def _unet_order(events) -> list[tuple[str, int, int]]:
    """The simulation's UNet allocations and frees, as _OrderLog logs them."""
    order = _OrderLog()
    for ev in events:
        if ev.kind == "alloc" and ev.module.startswith("unet"):
            order.alloc(ev.key, ev.nbytes)
        elif ev.kind == "free":
            order.free(ev.key)
    return order.log


def test_unet_schedule_follows_simulation():
    """schedule.unet (the UNet's order for reserved memory under VAE tiling) makes and drops
    every tensor above 1 MiB in the order diffusers' code does, frees included (which decide
    the segments). 1024 x 1040: levels 128x130, 64x65, 32x33, 16x17 test the ceil and the
    upsamplers' target sizes; every level's maps are above 1 MiB."""
    sim = simulate(1024, 1040, prompt_length=20, steps=1, **PROFILE)
    seg = _RecordingAllocator()
    levels = [Shape(H=1024, W=1040, n=1, B=2, cfg=True).level(i) for i in range(4)]
    schedule.unet(seg, 2, levels, gpu_profiles.get("h200").conv_workspace())
    expected = _unet_order(sim.events)
    assert len(expected) > 1000
    for i, (got, want) in enumerate(zip(seg.order.log, expected)):
        assert got == want, f"event {i}: equation {got}, simulation {want}; around it: {expected[max(0, i - 3):i + 3]}"
    assert len(seg.order.log) == len(expected)
