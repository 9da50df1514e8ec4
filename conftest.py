# Loads the sd-vram pytest plugin (--gpu and the archived-results regression). An installed
# sd-vram registers the same module through its pytest11 entry point under this exact name,
# and pytest skips a pytest_plugins entry already registered under its name, so it is never
# loaded twice. In a checkout that is not installed (a GPU machine, a fresh clone) the
# subpackages live beside sd_vram/ (formula/, plugin/, ...): a finder maps them as
# pyproject.toml's package-dir does, so `pytest` runs there too.
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def package_dirs() -> dict[str, Path]:
    """pyproject.toml's [tool.setuptools.package-dir]: {"sd_vram.plugin": ROOT / "plugin", ...}."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    table = re.search(r"^\[tool\.setuptools\.package-dir\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    return {name: ROOT / folder for name, folder in re.findall(r'^"([\w.]+)"\s*=\s*"([^"]+)"', table.group(1), re.M)}


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Imports the packages of package_dirs() from this checkout (first on sys.meta_path)."""

    def __init__(self, dirs: dict[str, Path]):
        self.dirs = dirs

    def find_spec(self, name, path=None, target=None):
        folder = self.dirs.get(name)
        if folder is None or not folder.is_dir():
            return None
        init = folder / "__init__.py"
        if init.is_file():
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)  # a folder without __init__.py
        spec.submodule_search_locations = [str(folder)]
        return spec


def _installed() -> bool:
    try:
        return importlib.util.find_spec("sd_vram.plugin") is not None
    except ImportError:  # no sd_vram at all
        return False


if not _installed():
    for name in [m for m in sys.modules if m == "sd_vram" or m.startswith("sd_vram.")]:
        del sys.modules[name]  # a bare sd_vram/ imported from the checkout without its subpackages
    sys.meta_path.insert(0, CheckoutFinder(package_dirs()))
pytest_plugins = ["sd_vram.plugin.pytest_plugin"]
