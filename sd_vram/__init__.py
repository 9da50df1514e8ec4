"""sd-vram: peak GPU memory of Stable Diffusion v1.5 img2img, predicted and proven."""

__version__ = "0.1.0"
