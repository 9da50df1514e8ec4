"""The closed-form peak-VRAM equation of SD1.5 img2img (pure Python: imports neither torch nor diffusers).

    from sd_vram.formula import estimate
    est = estimate(380, 396, prompt="a hot air balloon")   # height, width
    est.peak_allocated, est.peak_reserved, est.peak_device, est.peak_stage
    estimate(380, 396, vram=8 << 30).boundary              # under a budget: fits / fallbacks / OOM

The ground floor: formula/ owns every model the project has of the world, and imports
nothing of the project (simulation/ and plugin/ import it, never the other way):
- options.py, allocconf.py: the call's options and PYTORCH_CUDA_ALLOC_CONF;
- architecture.py (with data/sd15.json), tokenizer.py: the model and its prompt;
- allocator.py: the one caching-allocator model, its OOM path included;
- kernels.py, gpu_profiles.py (profiles/*.json): the kernel facts and the GPU profile;
- activations.py, schedule.py, equation.py, maxsize.py: the equation and its searches;
- result.py, report.py, baselines.py, files.py: what it reports and writes.
See DERIVATION.md beside this file for every term.
"""

from .options import InputError, Options
from .result import Estimate, StagePeak
from .equation import estimate, f

__all__ = ["estimate", "f", "Estimate", "StagePeak", "Options", "InputError"]
