"""GPU profiles: the facts only hardware gives, for one GPU and software stack.

A profile holds what changes memory on a given GPU + stack:
- compute capability and library versions, which decide PyTorch's SDPA backend
  (kernels.sdpa_backend) and the derived cuBLAS/cuBLASLt workspaces (kernels.cublas_workspace);
- measured cuBLAS/cuBLASLt workspaces (None: derived from the architecture);
- the CUDA context and library handles that NVML shows beside the allocator's memory;
- the cuDNN convolution workspaces: a rule set (kernels.CONV_RULE_SETS, or explicit rules) and,
  in a probed profile, the workspace measured for each exact (module, input shape).

Bundled profiles live in formula/profiles/*.json (each names the archive it was measured
from); `sd-vram probe` writes profiles of the same schema into the user profile folder
(user_dir()). `get(name_or_path)` finds a name in the user folder first, then the bundled one,
or reads a path. One class serves the equation, the simulation and the GPU suite.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path

from . import kernels
from .files import write_text_atomic
from .options import InputError

MiB = 1 << 20
SCHEMA = "sd-vram/gpu-profile/1"
SOURCES = ("bundled", "probe", "custom")
# The CUDA context and library handles on record, for a profile that did not measure them on
# its GPU: 250 MiB, the smallest bare lazily loaded context in public reports on consumer
# cards (DESIGN.md), to 1 GiB, the `default` profile's cover (measured: 697 MiB on the H200
# and the H100 after a warm-up call, + up to 18 MiB loaded lazily by larger calls).
CONTEXT_RANGE = (250 * MiB, 1 << 30)


@lru_cache(maxsize=None)
def _default_json() -> dict:
    return json.loads(resources.files(__package__).joinpath("profiles", "default.json").read_text())


def _d(name: str, convert=lambda v: v):
    # Fields left out take the "default" profile's value (formula/profiles/default.json).
    return field(default_factory=lambda: convert(_default_json()[name]))


@dataclass(frozen=True)
class GPUProfile:
    name: str = _d("name")
    gpu: str = _d("gpu")                                   # as torch.cuda.get_device_name() reports it
    compute_capability: tuple[int, int] = _d("compute_capability", tuple)
    torch_version: tuple[int, int] = _d("torch_version", tuple)
    cudnn_version: int | None = _d("cudnn_version")       # torch.backends.cudnn.version(), e.g. 91900
    cuda_version: tuple[int, int] = _d("cuda_version", tuple)
    cuda_context: int = _d("cuda_context")                 # bytes NVML shows beyond torch's reserved memory
    total_memory: int = _d("total_memory")
    multiprocessor_count: int = _d("multiprocessor_count")
    # bytes through the caching allocator at the first matmul; None: derived (kernels.py)
    cublas_workspace: int | None = None
    cublaslt_workspace: int | None = None
    conv_workspace_rule: str = "nchw_transpose"            # a name in kernels.CONV_RULE_SETS
    # explicit rules ({"module": regex, "kernel": 3 or [kh, kw], "min_batch": n, "formula":
    # expression in input, output, weight}); non-empty: they replace conv_workspace_rule's set
    conv_workspace_rules: tuple = ()
    # channels-last convolutions' rule set (kernels.py section 4b; a probe fits it)
    conv_workspace_rule_nhwc: str = kernels.NHWC_CONV_RULE_SET
    # a probe's measurements: kernels.conv_key(module, input shape[, nhwc]) -> workspace bytes
    conv_workspaces: dict = field(default_factory=dict)
    cuda_context_measured: bool = False                    # on this GPU (else a cover: bounds)
    source: str = "custom"                                 # bundled, probe, custom
    stack: dict = field(default_factory=dict)              # what it was measured on (probe)
    measured: dict = field(default_factory=dict)           # where the numbers come from
    path: str = ""                                         # the file it was read from
    # TORCH_CUDNN_SDPA_DEPRIORITIZED=1, and cudnn-frontend >= 1.24 compiled in (torch >= 2.13)
    cudnn_sdpa_deprioritized: bool = False
    cudnn_frontend_d256: bool = True

    def __hash__(self):
        return hash((self.name, self.path, self.source))

    def with_(self, **changes) -> "GPUProfile":
        return replace(self, **changes)

    # --- kernel facts for this stack (formula/kernels.py) ---------------------------------------
    def sdpa_backend(self, requested: str, call: "kernels.SdpaCall | int") -> str:
        """The SDPA kernel PyTorch runs for this call (an int: a head dim, over 4096 tokens)."""
        if isinstance(call, int):
            call = kernels.SdpaCall(batch=1, heads=1, q_len=4096, kv_len=4096, d_qk=call)
        return kernels.sdpa_backend(self, requested, call)

    @property
    def cublas_workspace_bytes(self) -> int:
        """The measured cuBLAS workspace, else CublasHandlePool.cpp's for this architecture."""
        if self.cublas_workspace is not None:
            return self.cublas_workspace
        return kernels.cublas_workspace(self.compute_capability)

    @property
    def cublaslt_workspace_bytes(self) -> int:
        if self.cublaslt_workspace is not None:
            return self.cublaslt_workspace
        return kernels.cublaslt_workspace(self.compute_capability)

    @property
    def conv_rules(self) -> tuple[kernels.ConvRule, ...]:
        return kernels.conv_rules(self.conv_workspace_rules or self.conv_workspace_rule)

    def conv_workspace(self, floor: bool = False, heaviest: bool = False, dtype: str = "fp16",
                       channels_last: bool = False, measured: bool = True) -> kernels.ConvWorkspace:
        """Measured shapes of this layout (channels_last: the ":nhwc" keys), else the layout's rules
        (floor: 0; heaviest: the heaviest rule set; measured=False: the rules alone).
        The measured shapes are fp16 convolutions (kernels.MEASURED_CONV_DTYPE): a pipeline of
        another dtype gets the rules' byte formulas alone (derived, DERIVATION.md "dtype")."""
        if heaviest:
            rules = kernels.conv_rules(kernels.HEAVIEST_CONV_RULE_SET)
        else:
            rules = kernels.conv_rules(self.conv_workspace_rule_nhwc) if channels_last else self.conv_rules
        shapes = self.conv_workspaces if measured and dtype == kernels.MEASURED_CONV_DTYPE else None
        return kernels.ConvWorkspace(rules, shapes, floor=floor, nhwc=channels_last)


# --- reading and writing profile files -------------------------------------------------------------

def _pair(v):
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise ValueError("expected [major, minor]")
    return tuple(v)


def _int(v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError("expected a whole number of bytes >= 0")
    return v


def _opt_int(v):
    return None if v is None else _int(v)


def _str(v):
    if not isinstance(v, str):
        raise ValueError("expected text")
    return v


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _dict(v):
    if not isinstance(v, dict):
        raise ValueError("expected an object")
    return dict(v)


def _rule_name(v):
    if v not in kernels.CONV_RULE_SETS:
        raise ValueError(f"unknown rule set; known: {', '.join(kernels.CONV_RULE_SETS)}")
    return v


def _rules(v):
    if not isinstance(v, list):
        raise ValueError("expected a list of rules")
    out = tuple(dict(r) for r in v)
    kernels.conv_rules(out)                 # regex and formula checked here
    return out


def _workspaces(v):
    v = _dict(v)
    for k, n in v.items():
        if "@" not in k:
            raise ValueError(f"key {k!r} is not MODULE@NxCxHxW")
        _int(n)
    return v


def _source(v):
    if v not in SOURCES:
        raise ValueError(f"expected one of {', '.join(SOURCES)}")
    return v


# JSON key -> (required, converter)
FIELDS = {
    "name": (True, _str), "gpu": (True, _str), "compute_capability": (True, _pair),
    "torch_version": (True, _pair), "cudnn_version": (True, _opt_int), "cuda_version": (True, _pair),
    "cuda_context": (True, _int), "total_memory": (True, _int), "multiprocessor_count": (False, _int),
    "cublas_workspace": (False, _opt_int), "cublaslt_workspace": (False, _opt_int),
    "conv_workspace_rule": (False, _rule_name), "conv_workspace_rule_nhwc": (False, _rule_name),
    "conv_workspace_rules": (False, _rules),
    "conv_workspaces": (False, _workspaces), "cuda_context_measured": (False, _bool),
    "source": (False, _source), "stack": (False, _dict), "measured": (False, _dict),
    "cudnn_sdpa_deprioritized": (False, _bool), "cudnn_frontend_d256": (False, _bool),
}
_INFO_KEYS = {"schema", "sdpa", "probe"}     # kept in the file for readers, not in the profile


def from_json(data, where: str) -> GPUProfile:
    """A profile from a parsed file; InputError names the file and the field."""
    if not isinstance(data, dict):
        raise InputError(f"GPU profile {where}: not a JSON object")
    schema = data.get("schema", SCHEMA)
    if schema != SCHEMA:
        raise InputError(f"GPU profile {where}: field 'schema' is {schema!r}, this sd-vram reads {SCHEMA!r} "
                         "(probe the GPU again: sd-vram probe)")
    kw = {}
    for key, (required, convert) in FIELDS.items():
        if key not in data:
            if required:
                raise InputError(f"GPU profile {where}: field {key!r} is missing")
            continue
        try:
            kw[key] = convert(data[key])
        except (ValueError, TypeError) as e:
            raise InputError(f"GPU profile {where}: field {key!r}: {e} (got {data[key]!r:.60})") from None
    unknown = sorted(set(data) - set(FIELDS) - _INFO_KEYS)
    if unknown:
        raise InputError(f"GPU profile {where}: unknown field {unknown[0]!r}")
    return GPUProfile(path=where, **kw)


def to_json(p: GPUProfile, **extra) -> dict:
    """The file form of a profile (read back by from_json); `extra`: informational keys."""
    out = {"schema": SCHEMA}
    for f in fields(GPUProfile):
        if f.name not in FIELDS:
            continue
        v = getattr(p, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    out["conv_workspace_rules"] = [dict(r) for r in p.conv_workspace_rules]
    if p.conv_workspace_rule_nhwc == kernels.NHWC_CONV_RULE_SET:   # the default: files older readers take
        del out["conv_workspace_rule_nhwc"]
    out.update({k: v for k, v in extra.items() if k in _INFO_KEYS})
    return out


def read(path) -> GPUProfile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"GPU profile {path}: cannot read it ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"GPU profile {path}: not JSON (line {e.lineno}: {e.msg})") from None
    return from_json(data, str(path))


def write(p: GPUProfile, path, **extra) -> Path:
    return write_text_atomic(path, json.dumps(to_json(p, **extra), indent=1) + "\n")


def user_dir() -> Path:
    """Where probe saves profiles: $SD_VRAM_PROFILES, else platformdirs' user data dir."""
    env = os.environ.get("SD_VRAM_PROFILES")
    if env:
        return Path(env).expanduser()
    try:
        from platformdirs import user_data_dir
    except ImportError:                          # platformdirs is a dependency; a bare copy of formula/
        return Path.home() / ".local" / "share" / "sd-vram" / "profiles"
    return Path(user_data_dir("sd-vram", appauthor=False)) / "profiles"


@lru_cache(maxsize=None)
def profiles() -> dict[str, GPUProfile]:
    """The bundled profiles."""
    out = {}
    folder = resources.files(__package__).joinpath("profiles")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            p = from_json(json.loads(entry.read_text()), f"formula/profiles/{entry.name}")
            out[p.name] = replace(p, source="bundled")
    return out


def user_profiles() -> dict[str, Path]:
    """Profile files in the user folder, by file name without .json."""
    d = user_dir()
    if not d.is_dir():
        return {}
    return {p.name[:-5]: p for p in sorted(d.glob("*.json"))}


@lru_cache(maxsize=64)
def _read_cached(path: str, mtime: float) -> GPUProfile:
    return read(path)


def _read(path: Path) -> GPUProfile:
    return _read_cached(str(path), path.stat().st_mtime)


def get(name) -> GPUProfile:
    """A profile by name (user folder first, then bundled), by path (ends in .json or holds a
    path separator), or a GPUProfile as is."""
    if isinstance(name, GPUProfile):
        return name
    if not isinstance(name, str) or not name:
        raise InputError(f"a GPU profile is a name or a path, got {name!r}")
    if name.endswith(".json") or os.sep in name or "/" in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise InputError(f"GPU profile {name}: no such file")
        return _read(path)
    user = user_profiles()
    if name in user:
        return _read(user[name])
    known = profiles()
    if name not in known:
        names = sorted(set(known) | set(user))
        raise InputError(f"unknown GPU profile {name!r}; known: {', '.join(names)} "
                         f"(or a path to a profile file; probed profiles live in {user_dir()})")
    return known[name]


def for_device(device_name: str) -> str:
    """The bundled profile measured on a GPU of this name, else "default"."""
    for p in profiles().values():
        if p.name != "default" and p.gpu == device_name:
            return p.name
    return "default"


# The stack fields a probed profile must share with this process to be picked automatically.
STACK_KEYS = ("torch", "cuda", "cudnn", "driver", "cudnn_benchmark", "cudnn_deterministic", "cudnn_enabled",
              "PYTORCH_CUDA_ALLOC_CONF", "CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE",
              "TORCH_CUBLASLT_UNIFIED_WORKSPACE", "TORCH_CUDNN_SDPA_DEPRIORITIZED")


def for_stack(gpu_name: str, stack: dict) -> GPUProfile | None:
    """The newest probed profile in the user folder of this GPU and this stack, or None.
    Unreadable files are skipped here (naming them is get()'s job)."""
    best = None
    for path in user_profiles().values():
        try:
            p = _read(path)
        except InputError:
            continue
        if p.source != "probe" or p.gpu != gpu_name:
            continue
        if any(p.stack.get(k) != stack.get(k) for k in STACK_KEYS):
            continue
        if best is None or path.stat().st_mtime > Path(best.path).stat().st_mtime:
            best = p
    return best
