"""LoRA adapters of pipe.load_lora_weights (diffusers 0.42.1 with peft): the modules they wrap and
their tensors, from "RANK[:TARGETS]" or from a LoRA file's header (DERIVATION.md, "LoRA adapters").

Pure Python: a .safetensors header is read with the file format's own rule (8-byte
little-endian header length, then a JSON header giving each tensor's dtype and shape); no
tensor is loaded.

Which targets are modelled: the nn.Linear layers of the UNet's transformers and of the text
encoder's layers. The attention projections are where diffusers' own LoRA trainers put
adapters (examples/text_to_image/train_text_to_image_lora.py: UNet LoraConfig target_modules
["to_k", "to_q", "to_v", "to_out.0"]; examples/dreambooth/train_dreambooth_lora.py with
--train_text_encoder: text encoder ["q_proj", "k_proj", "v_proj", "out_proj"]); the
feed-forward's (ff.net.0.proj, ff.net.2) and CLIP's MLP (fc1, fc2) are what kohya-style
trainers add. Every other target (proj_in/proj_out, SD1.5's 1x1 convolutions; the resnets'
convolutions and time projections) is refused: its unfused working memory is not derived.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

from . import architecture as arch
from .options import InputError

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")      # UNet Attention (attn1, attn2)
UNET_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")          # FeedForward: GEGLU's proj, the output Linear
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIPAttention
TEXT_MLP = ("fc1", "fc2")                                  # CLIPMLP
UNET_TARGETS = UNET_ATTENTION + UNET_FEED_FORWARD
TEXT_TARGETS = TEXT_ATTENTION + TEXT_MLP
DEFAULT_TARGETS = UNET_ATTENTION                           # train_text_to_image_lora.py's default
TARGETS = {"unet": UNET_TARGETS, "text_encoder": TEXT_TARGETS}
# load_lora_weights puts the UNet's adapters on the GPU first (load_lora_into_unet, then
# load_lora_into_text_encoder); the state dict's prefixes, and the module-path prefix of the
# text encoder's keys in LoRA files (transformers 4's CLIPTextModel kept its modules under
# text_model.; transformers 5's has none and its load_adapter maps the old keys). Read with
# or without it.
MODELS = ("unet", "text_encoder")
MODULE_PREFIX = {"unet": "", "text_encoder": "text_model."}

# The key suffixes of the formats read: peft's (lora_A/lora_B: what diffusers saves since 0.26
# and what load_lora_adapter converts to) and diffusers' older LoRA formats (lora.down/lora.up of
# the UNet attention processors, lora_linear_layer.down/up of the text encoder), which
# convert_unet_state_dict_to_peft / convert_state_dict_to_peft rename to lora_A/lora_B.
_DOWN = (".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")
_UP = (".lora_B.weight", ".lora.up.weight", ".lora_linear_layer.up.weight")
_HEADER_LIMIT = 100_000_000   # safetensors refuses larger headers (HeaderTooLarge)


@dataclass(frozen=True)
class Adapter:
    """One peft lora.Linear: lora_A = nn.Linear(in, r, bias=False), lora_B = nn.Linear(r, out,
    bias=False) (peft tuners/lora/layer.py LoraLayer.update_layer), cast to the base layer's
    dtype (fp16) on its device (tuners_utils._move_adapter_to_device_of_base_layer)."""

    model: str           # unet | text_encoder
    module: str          # module path inside the model, as named_modules() names it
    in_features: int
    out_features: int
    rank: int

    @property
    def target(self) -> str:
        return next(t for t in TARGETS[self.model] if self.module == t or self.module.endswith("." + t))

    def tensors(self) -> list[arch.Tensor]:
        return [(f"{self.module}.lora_A.weight", (self.rank, self.in_features), arch.FP16),
                (f"{self.module}.lora_B.weight", (self.out_features, self.rank), arch.FP16)]


@dataclass(frozen=True)
class Lora:
    """The adapters of one load_lora_weights call, in the order they reach the GPU."""

    source: str
    adapters: tuple[Adapter, ...]

    def tensors(self) -> list[arch.Tensor]:
        return [t for a in self.adapters for t in a.tensors()]

    def targets(self, model: str) -> frozenset[str]:
        """The targets (TARGETS) wrapped in `model`."""
        return frozenset(a.target for a in self.adapters if a.model == model)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({a.rank for a in self.adapters}))

    def state_dict_shapes(self) -> dict[str, tuple[int, ...]]:
        """Keys and shapes of the equivalent peft-format state dict (the simulation and the GPU
        suite load one of random values through load_lora_weights)."""
        return {f"{a.model}.{MODULE_PREFIX[a.model]}{name}": shape
                for a in self.adapters for name, shape, _ in a.tensors()}


@lru_cache(maxsize=None)
def linear_modules(model: str) -> tuple[tuple[str, int, int], ...]:
    """(module, in_features, out_features) of each nn.Linear of `model` in named_modules()
    order (a leaf's weight comes in architecture.py's order: the same depth-first walk)."""
    return tuple((name.removesuffix(".weight"), shape[1], shape[0]) for name, shape, _ in arch.MODELS[model]()
                 if name.endswith(".weight") and len(shape) == 2
                 and not name.startswith("embeddings."))   # CLIP's token and position nn.Embedding


@lru_cache(maxsize=None)
def conv_modules(model: str) -> frozenset[str]:
    """The nn.Conv2d modules of `model` (SD1.5's proj_in/proj_out among them: 1x1 convolutions)."""
    return frozenset(name.removesuffix(".weight") for name, shape, _ in arch.MODELS[model]()
                     if name.endswith(".weight") and len(shape) == 4)


def _matches(module: str, target: str) -> bool:
    """peft check_target_module_exists for a list: the name, or a dotted suffix of it."""
    return module == target or module.endswith("." + target)


def from_rank(rank: int, targets: tuple[str, ...]) -> Lora:
    adapters = []
    for model in MODELS:
        wanted = [t for t in targets if t in TARGETS[model]]
        for module, n_in, n_out in linear_modules(model):
            if any(_matches(module, t) for t in wanted):
                adapters.append(Adapter(model, module, n_in, n_out, rank))
    return Lora(f"rank {rank} on {','.join(targets)}", tuple(adapters))


def parse(spec: str) -> Lora:
    """'RANK[:TARGETS]' (TARGETS a comma list of TARGETS' names; default DEFAULT_TARGETS) or the
    path of a .safetensors LoRA file. Raises InputError with one line."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"lora must be RANK[:TARGETS] or a .safetensors LoRA file, got {spec!r}")
    m = re.fullmatch(r"\s*(-?\d+)\s*(?::(.*))?", spec)
    if m is None:
        return from_file(spec)
    rank = int(m.group(1))
    if rank < 1:
        raise InputError(f"LoRA rank must be a positive integer, got {rank}")
    targets = DEFAULT_TARGETS if m.group(2) is None else tuple(t.strip() for t in m.group(2).split(","))
    known = UNET_TARGETS + TEXT_TARGETS
    for t in targets:
        if t not in known:
            modules = [m for model in MODELS for m in [n for n, _, _ in linear_modules(model)] + sorted(conv_modules(model))]
            what = "is not modelled" if any(_matches(m, t) for m in modules) else "is no module of SD1.5's UNet or text encoder"
            raise InputError(f"LoRA target {t!r} {what}: the modelled targets are {', '.join(UNET_TARGETS)} (UNet) "
                             f"and {', '.join(TEXT_TARGETS)} (text encoder)")
    return from_rank(rank, tuple(dict.fromkeys(targets)))


def read_safetensors_header(path: str) -> dict:
    """The JSON header of a .safetensors file (tensor name -> {"dtype", "shape", "data_offsets"},
    and "__metadata__"), without reading any tensor."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"LoRA file {path}: too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n > _HEADER_LIMIT:
                raise InputError(f"LoRA file {path}: a header of {n:,} B is not a safetensors header")
            text = f.read(n)
    except OSError as e:
        raise InputError(f"cannot read LoRA file {path}: {e.strerror or e}") from None
    if len(text) < n:
        raise InputError(f"LoRA file {path}: truncated safetensors header")
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"LoRA file {path}: the header is not safetensors JSON") from None
    if not isinstance(header, dict):
        raise InputError(f"LoRA file {path}: the header is not safetensors JSON")
    return header


def from_file(path: str) -> Lora:
    """The adapters a LoRA file's header describes (peft or diffusers keys; see _DOWN/_UP)."""
    header = read_safetensors_header(path)
    shapes: dict[tuple[str, str], dict[str, tuple]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
            raise InputError(f"LoRA file {path}: kohya keys ({key}) are not read; save it with diffusers "
                             "(peft lora_A/lora_B keys)")
        if key.endswith(".alpha") or "dora_scale" in key:   # a scalar; diffusers drops dora_scale
            continue
        if not isinstance(info, dict):
            raise InputError(f"LoRA file {path}: the header is not safetensors JSON")
        model = next((m for m in MODELS if key.startswith(m + ".")), None)
        end = next((e for e in _DOWN + _UP if key.endswith(e)), None)
        if model is None or end is None:
            raise InputError(f"LoRA file {path}: unrecognised key {key!r} (read: unet./text_encoder. keys "
                             "ending in lora_A/lora_B or lora.down/lora.up .weight)")
        module = key[len(model) + 1:-len(end)].removeprefix(MODULE_PREFIX[model])
        shapes.setdefault((model, module), {})["A" if end in _DOWN else "B"] = tuple(info.get("shape", ()))
    adapters = []
    for model in MODELS:
        for mod, n_in, n_out in linear_modules(model):
            pair = shapes.pop((model, mod), None)
            if pair is None:
                continue
            if not any(_matches(mod, t) for t in TARGETS[model]):
                raise InputError(f"LoRA file {path}: an adapter on {model}.{mod} is not modelled (modelled: "
                                 f"{', '.join(TARGETS[model])})")
            a, b = pair.get("A"), pair.get("B")
            if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1] or (a[1], b[0]) != (n_in, n_out):
                raise InputError(f"LoRA file {path}: {model}.{mod} has lora_A {a} and lora_B {b}, not "
                                 f"(r, {n_in}) and ({n_out}, r)")
            if a[0] < 1:
                raise InputError(f"LoRA file {path}: {model}.{mod} has rank {a[0]}")
            adapters.append(Adapter(model, mod, n_in, n_out, a[0]))
    if shapes:
        (model, mod), _ = next(iter(shapes.items()))
        if mod in conv_modules(model):
            raise InputError(f"LoRA file {path}: an adapter on {model}.{mod}, a convolution, is not modelled "
                             f"(modelled: the Linear layers {', '.join(TARGETS[model])})")
        raise InputError(f"LoRA file {path}: no module {mod} in the SD1.5 {model} for its adapter")
    if not adapters:
        raise InputError(f"LoRA file {path}: no LoRA tensors in it")
    return Lora(path, tuple(adapters))
