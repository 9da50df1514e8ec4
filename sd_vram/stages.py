"""Stage boundaries of an img2img call, shared by the GPU suite and the simulation.

A stage begins when its first module's forward starts and lasts until the next stage
begins, so the glue between modules belongs to the stage before it: latent sampling and
noising to vae_encode, CFG arithmetic and scheduler steps to unet, the denormalize and
PIL conversion before the safety checker to vae_decode, the final postprocess to
safety_checker.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

STAGES = ("setup", "text_encoder", "vae_encode", "unet", "vae_decode", "safety_checker")


def _entry_modules(pipe) -> dict[str, object]:
    return {
        "text_encoder": pipe.text_encoder,
        "vae_encode": pipe.vae.encoder,
        "unet": pipe.unet,
        "vae_decode": pipe.vae.post_quant_conv if pipe.vae.post_quant_conv is not None else pipe.vae.decoder,
        "safety_checker": pipe.safety_checker,
    }


@contextmanager
def stage_hooks(pipe, on_stage: Callable[[str], None]):
    """Call on_stage(name) each time the call enters a new stage ("setup" first)."""
    current = {"name": None}

    def enter(name):
        if current["name"] != name:
            current["name"] = name
            on_stage(name)

    handles = []
    for name, module in _entry_modules(pipe).items():
        if module is not None:
            handles.append(module.register_forward_pre_hook(lambda *_a, _n=name: enter(_n)))
    enter("setup")
    try:
        yield current
    finally:
        for h in handles:
            h.remove()
