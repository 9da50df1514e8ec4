"""An image file's size as the pipeline will see it, read from the header (and, for a user's
file, a check that the data is whole).

diffusers.utils.load_image applies PIL.ImageOps.exif_transpose, so an image whose EXIF
orientation is 5-8 (transposed or rotated by 90/270 degrees) reaches the pipeline with width
and height swapped. PIL.Image.open parses the header (and the EXIF block) lazily; only the
completeness check reads the data (at 1/8 scale for a JPEG).
"""

from __future__ import annotations

import os
import warnings

from sd_vram.formula import InputError

EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def image_size(path: str, complete: bool = False) -> tuple[int, int]:
    """(width, height) of the image at ``path`` after the EXIF orientation is applied.
    complete: also check that the data is whole (a user's file: diffusers.utils.load_image's
    ``convert("RGB")`` decodes it all and fails on a truncated one): PNG chunks by their CRCs
    (Image.verify), a JPEG decoded at 1/8 scale (Image.draft), other formats decoded."""
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
    if complete:
        _check_complete(path)
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return width, height


def _check_complete(path: str) -> None:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format == "PNG":
                    img.verify()
                else:
                    if img.format == "JPEG":
                        img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
                    img.load()
    except (OSError, ValueError, SyntaxError, EOFError, IndexError) as e:   # what PIL raises for bad data
        raise InputError(f"{path}: the image data is damaged or cut short ({e or type(e).__name__}); "
                         "diffusers.utils.load_image would fail on it") from None
