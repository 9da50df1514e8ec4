"""Where a plot goes (``simulate --timeline``, ``compare --png``): checked before the work
that draws it, so a bad path is one line, not a lost run or a folder made by surprise."""

from __future__ import annotations

import os
from pathlib import Path

from sd_vram.formula import InputError


def check_plot_path(flag: str, path: str) -> None:
    """InputError unless `path` is a writable file in an existing folder whose suffix names a
    format matplotlib writes; ImportError without matplotlib."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise InputError(f"{flag} {path} is a directory: give a file name such as plot.png")
    if not folder.is_dir():
        raise InputError(f"{flag} {path}: no such folder {folder}")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise InputError(f"{flag} {path}: not writable")
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    if target.suffix.lower().lstrip(".") not in kinds:
        raise InputError(f"{flag} {path}: the file name must end in one of " + ", ".join("." + k for k in sorted(kinds)))
