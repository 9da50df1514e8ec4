# Sourced by scripts/gpu_validate.sh and scripts/gpu_probe_validate.sh (from the repository root).
# sd_vram without installing it: $SITE/sitecustomize.py puts a finder first on sys.meta_path
# that maps sd_vram -> sd_vram/, sd_vram.formula -> formula/, sd_vram.plugin -> plugin/,
# sd_vram.simulation -> simulation/ (pyproject.toml's package-dir). A finder, not a folder on
# sys.path: python -m and pytest put the checkout first on sys.path, where sd_vram/ lacks the
# subpackages. Any other sitecustomize further down sys.path still runs.
make_shim() {
    mkdir -p "$SITE" && rm -rf "$SITE/sd_vram" && cat > "$SITE/sitecustomize.py" <<SHIM
# Written by scripts/gpu_validate.sh: import sd_vram from the checkout $PWD without installing it.
import importlib.abc, importlib.util, os, runpy, sys

_REPO = ${PWD@Q}
_MAP = {"sd_vram": "sd_vram", "sd_vram.formula": "formula", "sd_vram.plugin": "plugin",
        "sd_vram.simulation": "simulation"}


class _SdVramShimFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        folder = _MAP.get(name)
        if folder is None or not os.path.isdir(os.path.join(_REPO, folder)):
            return None
        d = os.path.join(_REPO, folder)
        return importlib.util.spec_from_file_location(name, os.path.join(d, "__init__.py"),
                                                      submodule_search_locations=[d])


sys.meta_path.insert(0, _SdVramShimFinder())
_here = os.path.dirname(os.path.abspath(__file__))
for _p in sys.path:
    _f = os.path.join(_p or ".", "sitecustomize.py")
    if os.path.abspath(_p or ".") != _here and os.path.isfile(_f):
        runpy.run_path(_f, run_name="sitecustomize")
        break
SHIM
}

