"""An image file's size as the pipeline will see it, read from the header only.

diffusers.utils.load_image applies PIL.ImageOps.exif_transpose, so an image whose EXIF
orientation is 5-8 (transposed or rotated by 90/270 degrees) reaches the pipeline with width
and height swapped. PIL.Image.open parses the header (and the EXIF block) lazily and never
decodes the pixels here.
"""

from __future__ import annotations

import os
import warnings

from sd_vram.formula import InputError

EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of the image at ``path`` after the EXIF orientation is applied."""
    if not os.path.exists(path):
        raise InputError(f"no such image file: {path}")
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory, not an image file")
    if not os.path.isfile(path):  # a named pipe or a device would block the read
        raise InputError(f"{path} is not a regular file (a named pipe or a device?): give an image file")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - pillow is a core dependency
        raise InputError("reading an image file needs pillow: pip install pillow") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only the header is read
            img = Image.open(path)
        with img:
            width, height = img.size
            try:
                orientation = img.getexif().get(EXIF_ORIENTATION)
            except Exception:  # a damaged EXIF block: load_image's exif_transpose would skip it too
                orientation = None
    except UnidentifiedImageError:
        raise InputError(f"not an image file PIL can read: {path}") from None
    except Image.DecompressionBombError as e:
        # diffusers.utils.load_image opens it with the same limit: the pipeline cannot take it
        raise InputError(f"{path}: PIL refuses to open it ({e.args[0].split(',')[0]}), and so would "
                         "diffusers.utils.load_image") from None
    except OSError as e:
        raise InputError(f"cannot read image file {path}: {e.strerror or e}") from None
    except (ValueError, SyntaxError, OverflowError, EOFError) as e:  # a header PIL cannot parse
        raise InputError(f"cannot read image file {path}: {e}") from None
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return width, height
