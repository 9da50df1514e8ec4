"""The closed-form peak-VRAM equation of SD1.5 img2img (pure Python: imports neither torch nor diffusers).

    from sd_vram.formula import estimate
    est = estimate(427, 640, prompt="a hot air balloon")   # height, width
    est.peak_allocated, est.peak_reserved, est.peak_device, est.peak_stage

See DERIVATION.md beside this file for every term.
"""

from .options import InputError, Options
from .result import Estimate, StagePeak
from .equation import estimate, f

__all__ = ["estimate", "f", "Estimate", "StagePeak", "Options", "InputError"]
