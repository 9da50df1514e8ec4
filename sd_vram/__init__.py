"""sd-vram: peak GPU memory of Stable Diffusion v1.5 img2img, predicted and proven.

This folder owns the roof and two shared floors:
- the ``sd-vram`` command line: cli.py (parsing and the commands), option_flags.py (one flag
  per field of formula/options.Options), output.py (the text it prints) and imagesize.py (an
  image file's size from its header);
- what the simulation and the GPU suite share about the real pipeline: models.py (SD1.5 built
  from the bundled config with random weights; imports torch, diffusers) and stages.py (the
  stage boundaries of a call).

The installed package maps sd_vram.formula, sd_vram.simulation and sd_vram.plugin to the
folders formula/, simulation/ and plugin/ (pyproject.toml). May import: sd_vram.formula
anywhere; sd_vram.plugin (cases, compare, probe) and sd_vram.simulation from cli.py only, inside
the commands that need them, so ``sd-vram estimate`` loads neither torch nor diffusers.
models.py and stages.py import nothing of plugin/ or simulation/.
"""

__version__ = "0.1.0"
