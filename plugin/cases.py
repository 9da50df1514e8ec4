"""The case catalogue (cases/catalogue.toml): loading, validation, selection and input images."""

from __future__ import annotations

import fnmatch
import re
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from sd_vram.formula.options import InputError, Options

try:
    import tomllib                      # Python 3.11+
except ModuleNotFoundError:             # 3.10: tomli, or the copy pip vendors
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        from pip._vendor import tomli as tomllib

CATALOGUE_SCHEMA = "sd-vram/cases/1"
OPTION_FIELDS = tuple(Options.__dataclass_fields__)
# Options that are arguments of pipe(...); the others configure the pipeline around the call.
CALL_FIELDS = ("guidance_scale", "num_images_per_prompt", "strength", "num_inference_steps", "output_type")
FULL_CALL = {"num_inference_steps": 50, "strength": 0.8}   # diffusers' defaults
FULL_CALL_SUFFIX = "/full-call"


@dataclass(frozen=True)
class Case:
    name: str
    width: int
    height: int
    prompt: str
    options: dict = field(default_factory=dict)   # complete: every Options field but gpu
    own_options: dict = field(default_factory=dict)   # those its catalogue entry sets itself
    tags: tuple = ()
    image: str | None = None                      # file name under cases/images/
    variant: str = "short"                        # "short" or "full" (the full default call)

    @property
    def id(self) -> str:
        return self.name + (FULL_CALL_SUFFIX if self.variant == "full" else "")

    @property
    def opts(self) -> Options:
        return Options(**self.options)

    def call_kwargs(self) -> dict:
        """The options that are pipe(...) arguments; txt2img has no strength, and txt2img and
        inpaint take pipe(height=, width=) (inpaint: when the case sets them, else 512)."""
        o = self.opts
        kw = {k: getattr(o, k) for k in CALL_FIELDS if k != "strength" or o.pipeline != "txt2img"}
        if o.pipeline == "txt2img":
            kw.update(height=self.height, width=self.width)
        if o.pipeline == "inpaint":
            kw.update({k: v for k, v in (("height", o.pipe_height), ("width", o.pipe_width),
                                         ("padding_mask_crop", o.padding_mask_crop)) if v is not None})
        return kw

    @property
    def unet_evals(self) -> int:
        return self.opts.unet_evaluations

    @property
    def cost(self) -> float:
        """Rough relative run time, to run cheap cases first (pixels x UNet work)."""
        o = self.opts
        return self.width * self.height * (o.unet_batch * self.unet_evals + 2)

    def full_call(self) -> "Case":
        full = {k: v for k, v in FULL_CALL.items() if k != "strength" or self.opts.pipeline == "img2img"}
        return replace(self, options={**self.options, **full}, variant="full")

    # --- the input image -------------------------------------------------------------------
    def image_path(self, images_dir: Path | None) -> Path | None:
        if self.image and images_dir is not None:
            p = Path(images_dir) / self.image
            if p.is_file():
                return p
        return None

    def size(self, images_dir: Path | None) -> tuple[int, int]:
        """(height, width) of the image the case runs: the real file's (after EXIF rotation) if present."""
        p = self.image_path(images_dir)
        if p is None:
            return self.height, self.width
        from PIL import Image

        with Image.open(p) as im:
            w, h = im.size
            # EXIF orientations 5-8 rotate by 90 degrees: width and height swap.
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
        return h, w

    def load_image(self, images_dir: Path | None):
        """(PIL RGB image, description): the real file as diffusers.utils.load_image reads it, or a drawn one."""
        p = self.image_path(images_dir)
        if p is not None:
            from PIL import Image, ImageOps

            im = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
            return im, {"source": "file", "file": p.name}
        return synthetic_image(self.width, self.height, self.name), {"source": "generated", "file": None}


def synthetic_mask(width: int, height: int):
    """The inpaint cases' mask_image: white (repaint) over the middle half of each side, black
    elsewhere, an "L" image of the image's size. Memory does not depend on its content."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((width // 4, height // 4, width - width // 4 - 1, height - height // 4 - 1),
                                   fill=255)
    return mask


def synthetic_image(width: int, height: int, seed_text: str):
    """Deterministic RGB image (gradient plus seeded noise); content does not change memory."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(zlib.crc32(seed_text.encode()))
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    base = np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)),
                     np.broadcast_to((x + y) / 2, (height, width))], axis=-1)
    noise = rng.integers(0, 64, size=(height, width, 3), dtype=np.uint8)
    arr = (base * 0.75).astype(np.uint8) + noise
    return Image.fromarray(arr, "RGB")


class CatalogueError(InputError):
    pass


@dataclass
class Catalogue:
    path: Path
    cases: list[Case]

    @property
    def images_dir(self) -> Path:
        return self.path.parent / "images"

    def tags(self) -> list[str]:
        return sorted({t for c in self.cases for t in c.tags})

    def get(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(name)

    def select(self, names: str | None = None, tags: str | None = None) -> list[Case]:
        return [c for c in self.cases if matches(c, names, tags)]


def split_list(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def matches(case: Case, names: str | None, tags: str | None) -> bool:
    """--cases: comma-separated name globs (any); --tags: comma-separated tags (any)."""
    globs, want = split_list(names), split_list(tags)
    if globs and not any(fnmatch.fnmatchcase(case.name, g) for g in globs):
        return False
    if want and not set(want) & set(case.tags):
        return False
    return True


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CASE_KEYS = {"name", "width", "height", "prompt", "options", "tags", "image"}
_VARIANT_KEYS = {"name", "of", "options", "tags"}


def load_catalogue(path: str | Path) -> Catalogue:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CatalogueError(f"case catalogue not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise CatalogueError(f"{path}: not valid TOML: {e}") from None
    if data.get("schema") != CATALOGUE_SCHEMA:
        raise CatalogueError(f"{path}: schema must be {CATALOGUE_SCHEMA!r}, got {data.get('schema')!r}")
    defaults = data.get("defaults", {})
    base_opts = {k: v for k, v in Options().to_dict().items() if k != "gpu"}
    base_opts.update(defaults.get("options", {}))
    raws = list(data.get("case", []))
    raws += _variant_cases(path, data.get("variant", []), {r.get("name"): r for r in raws})
    cases, seen = [], set()
    for i, raw in enumerate(raws):
        where = f"{path}: case #{i + 1} ({raw.get('name', '?')})"
        extra = set(raw) - _CASE_KEYS
        if extra:
            raise CatalogueError(f"{where}: unknown keys {sorted(extra)}")
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise CatalogueError(f"{where}: name must be letters, digits, '.', '_' or '-'")
        if name in seen:
            raise CatalogueError(f"{where}: duplicate name")
        seen.add(name)
        w, h = raw.get("width"), raw.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w >= 8 and h >= 8):
            raise CatalogueError(f"{where}: width and height must be integers >= 8")
        opts = dict(base_opts)
        unknown = set(raw.get("options", {})) - set(OPTION_FIELDS)
        if unknown:
            raise CatalogueError(f"{where}: unknown options {sorted(unknown)} (fields of Options: {', '.join(OPTION_FIELDS)})")
        opts.update(raw.get("options", {}))
        opts.pop("gpu", None)
        if opts.get("pipeline", "img2img") != "img2img":
            # [defaults]' strength is img2img's short call: another pipeline keeps its own default
            if "strength" not in raw.get("options", {}):
                opts["strength"] = None
            # an inpaint case's mask is synthetic_mask at the image's size unless it says otherwise
            if opts["pipeline"] == "inpaint" and opts.get("mask_size") is None:
                opts["mask_size"] = [h, w]
        try:
            Options(**opts)
        except InputError as e:
            raise CatalogueError(f"{where}: {e}") from None
        prompt = raw.get("prompt", defaults.get("prompt", ""))
        if not isinstance(prompt, str):
            raise CatalogueError(f"{where}: prompt must be a string")
        tags = raw.get("tags", [])
        if not all(isinstance(t, str) and _NAME.match(t) for t in tags):
            raise CatalogueError(f"{where}: tags must be simple words")
        case = Case(name=name, width=w, height=h, prompt=prompt, options=opts,
                    own_options=dict(raw.get("options", {})), tags=tuple(tags), image=raw.get("image"))
        cases.append(case)
    return Catalogue(path=path, cases=cases)


def _variant_cases(path: Path, variants: list, by_name: dict) -> list[dict]:
    """[[variant]] tables: the same settings over several cases. Each listed case (`of`) gets a
    copy named "<variant name>.<case>", with its image, size and prompt, its options and the
    variant's on top, and the variant's tags (not the case's: `-m seed` stays the seed cases)."""
    out = []
    for i, v in enumerate(variants):
        where = f"{path}: variant #{i + 1} ({v.get('name', '?')})"
        extra = set(v) - _VARIANT_KEYS
        if extra:
            raise CatalogueError(f"{where}: unknown keys {sorted(extra)}")
        if not isinstance(v.get("name"), str) or not _NAME.match(v["name"]):
            raise CatalogueError(f"{where}: name must be letters, digits, '.', '_' or '-'")
        of = v.get("of")
        if not isinstance(of, list) or not of:
            raise CatalogueError(f"{where}: `of` must list the cases it applies to")
        for base_name in of:
            base = by_name.get(base_name)
            if base is None:
                raise CatalogueError(f"{where}: no case named {base_name!r}")
            out.append({**base, "name": f"{v['name']}.{base_name}",
                        "options": {**base.get("options", {}), **v.get("options", {})}, "tags": v.get("tags", [])})
    return out
