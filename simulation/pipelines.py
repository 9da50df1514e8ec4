"""The diffusers pipeline a simulated call runs (formula/options.py PIPELINES), and its inputs.

txt2img and inpaint run diffusers' own StableDiffusionPipeline / StableDiffusionInpaintPipeline,
made by ``from_pipe`` from the img2img meta pipeline: the same module objects, so the same
weights on the simulated device (what plugin/gpu.py does on a GPU). The inpainting
checkpoint's UNet differs from SD1.5's only in conv_in: sd_vram.models.unet_in_channels swaps
a 9-channel conv_in into the shared meta UNet for the call, before the weights reach the device.

Host-side substitute (as patches.py's for the image): the inpaint pipeline's
``mask_processor.preprocess`` returns what its PIL path builds on the CPU, a float32
(1, 1, H, W) view of numpy_to_pt's (1, H, W, 1) array (binarized in place), at the call's size.

Imports torch and diffusers; patches.py for patch_attr.
"""

from __future__ import annotations

import contextlib

import torch

from .patches import patch_attr

_CLASSES = {"txt2img": "StableDiffusionPipeline", "inpaint": "StableDiffusionInpaintPipeline"}
_DERIVED: dict = {}


def pipeline_for(pipe, name: str):
    """`pipe` (img2img) itself, or the `name` pipeline sharing its components (from_pipe)."""
    if name == "img2img":
        return pipe
    key = (id(pipe), name)
    if key not in _DERIVED:
        import diffusers

        from sd_vram.models import quiet_libraries

        with quiet_libraries():
            # from_pipe casts every module to torch_dtype, float32 when not given: the shared ones too
            derived = getattr(diffusers, _CLASSES[name]).from_pipe(pipe, dtype=pipe.dtype)
        derived.set_progress_bar_config(disable=True)
        _DERIVED[key] = (pipe, derived)   # keeps pipe alive while its id is a key
    return _DERIVED[key][1]


def call_inputs(options, height: int, width: int) -> dict:
    """The pipeline-specific arguments of pipe(prompt, ...): the image (img2img, inpaint),
    the mask, strength, and the call's size (txt2img, inpaint)."""
    from PIL import Image

    if options.pipeline == "img2img":
        return {"image": Image.new("RGB", (8, 8)), "strength": options.strength}
    if options.pipeline == "txt2img":
        return {"height": height, "width": width}
    kw = {"image": Image.new("RGB", (8, 8)), "mask_image": Image.new("L", (8, 8), 255),
          "height": height, "width": width, "strength": options.strength}
    if options.padding_mask_crop is not None:
        kw["padding_mask_crop"] = options.padding_mask_crop
    return kw


@contextlib.contextmanager
def mask_substitute(pipe, height: int, width: int):
    """The inpaint pipeline's mask_processor.preprocess at the call's size (module docstring)."""
    mp = getattr(pipe, "mask_processor", None)
    if mp is None:
        yield
        return

    def preprocess(image, *args, **kwargs):
        return torch.empty(1, height, width, 1, dtype=torch.float32, device="cpu").permute(0, 3, 1, 2)

    with patch_attr(mp, "preprocess", preprocess, use_dict=True):
        yield


@contextlib.contextmanager
def host_scalars():
    """torch.tensor([t]) of a device scalar t (the inpaint loop's ``torch.tensor([noise_timestep])``)
    reads its value on the host: on fake tensors through ``.item()``, whose value the recorder
    shadows (recorder.py). The result is the same CPU tensor."""
    orig = torch.tensor

    def tensor(data, *args, **kwargs):
        if isinstance(data, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in data):
            dtype = next(x.dtype for x in data if isinstance(x, torch.Tensor))
            kwargs.setdefault("dtype", dtype)
            data = [x.item() if isinstance(x, torch.Tensor) else x for x in data]
        return orig(data, *args, **kwargs)

    with patch_attr(torch, "tensor", tensor):
        yield
