"""The GPU and software stack the simulation pretends to run on: an adapter over the
equation's profiles (sd_vram.formula.gpu_profiles, formula/profiles/*.json), so that
``simulate(..., gpu="h200")`` and ``estimate(..., gpu="h200")`` read the same numbers.

What the simulation takes from a profile:
- compute capability, torch/cuDNN/CUDA versions: PyTorch's SDPA backend choice (sdpa.py);
- the SM count: flash attention's split-KV heuristic;
- the cuBLAS and cuBLASLt workspaces, resident through the caching allocator;
- the cuDNN convolution workspace rules (see ``conv_rules``);
- the total memory: the address space of an expandable segment.
Simulation-only fields (not in the JSON files): ``cudnn_sdpa_deprioritized``
(TORCH_CUDNN_SDPA_DEPRIORITIZED=1) and ``cudnn_frontend_d256`` (cudnn-frontend >= 1.24
compiled in, which torch >= 2.13 checks for head dims up to 256).
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache

MiB = 1 << 20
GiB = 1 << 30

# Named conv workspace rule sets (GPUProfile.conv_workspace_rule in the JSON profiles).
# "nchw_transpose", measured on the H200 (torch 2.11, cuDNN 9.19; results/H200/
# 20261126T052749Z_nogit_memhistory_truck-4032x3024.json, raw allocations inside
# at::native::cudnn_convolution): the engine cuDNN picks for the VAE's fp16 NCHW 3x3
# convolutions works in NHWC and takes one workspace holding the transposed input, output
# and filter (input + output + weight bytes, + < 512 B), e.g. decoder
# up_blocks.3.resnets.0.conv1 (256 -> 128) at 4032x3024: 9,364,636,032 B; the 1x1
# conv_shortcut (256 -> 128) took input + output (9,364,046,080 B). The UNet's and the
# batch-2 upsampler's rules are at their entries below.
CONV_RULE_SETS: dict[str, tuple[dict, ...]] = {
    "none": (),
    "nchw_transpose": (
        # Channels-last inputs need no transposition: the weight's bytes for a 3x3 conv,
        # nothing for a 1x1 (H100 conv probe at 64x64-256x256, results/H100-80GB-HBM3/
        # 20261126T055338Z_nogit_conv_probe.json; same torch 2.11, cuDNN 9.19 and sm90 as the
        # H200). Which convs see one: the encoder's conv_in gets the channels-last image
        # (its output is channels-last too), and the residual adds carry that layout to
        # down_blocks.0-2's downsamplers and down_blocks.1-2's first conv_shortcut. Named by
        # module because FakeTensor on a CPU-only build lays convolution outputs out
        # contiguous (and computes other strides for size-1 dims than eager), so the
        # simulated tensors do not carry the layout.
        {"module": r"^vae\.encoder\.(conv_in|down_blocks\.\d\.downsamplers\.0\.conv)$", "kernel": 3,
         "formula": "weight"},
        {"module": r"^vae\.encoder\.down_blocks\.[12]\.resnets\.0\.conv_shortcut$", "kernel": 1, "formula": "0"},
        # Batch >= 2 through the decoder (num_images_per_prompt=2): cuDNN picks another engine
        # for the upsampler conv; the archive's images2-* peaks (at up_blocks.3.resnets.0.conv1,
        # exact with the rule below) bound its workspace by 1280 n H W B. Unprobed: taken as 0,
        # as the equation does (formula/activations.py vae_decode_upsampler).
        {"module": r"^vae\.decoder\.up_blocks\.2\.upsamplers\.0\.conv$", "kernel": 3, "min_batch": 2,
         "formula": "0"},
        # The 4-channel latent into conv_in takes no workspace (H100 conv probe, 64x64-256x256:
        # 0 B for unet.conv_in and vae.decoder.conv_in).
        {"module": r"^(unet|vae\.decoder)\.conv_in$", "kernel": 3, "formula": "0"},
        {"module": r"^vae\.", "kernel": 3, "formula": "input + output + weight"},
        {"module": r"^vae\.", "kernel": 1, "formula": "input + output"},
        # The UNet (H100 conv probe): 3x3 convs take input + output + weight (up_blocks.0/1
        # conv1 at small sizes: 56-61 MiB, the peak below 160x160). The H200 traces agree:
        # truck-4032x3024 (latent 378 x 504, batch 2) has 35 allocations of 489,553,920 B
        # (+147) = input + output + weight of the 7 320 -> 320 3x3 convs per step, 30 of
        # 251,228,160 B for the 6 640 -> 640 3x3 convs at half the latent size, 10 of
        # 735,252,480 B for the two 640 -> 320 conv1 at the latent size; balloon-640x427:
        # 12,697,616 B and 12,902,416 B for the same 3x3 convs. The 1x1 proj_in/proj_out/
        # conv_shortcut take their output at large sizes (truck: 50 of 243,855,360 B).
        {"module": r"^unet\.", "kernel": 3, "formula": "input + output + weight"},
        {"module": r"^unet\.", "kernel": 1, "formula": "output"},
    ),
}


@dataclass(frozen=True)
class ConvRule:
    """cuDNN workspace of the convolutions whose module path matches ``module`` (re.search)
    and, if given, whose kernel is ``kernel``: ``formula`` over input, output, weight bytes."""

    module: str
    formula: str
    kernel: tuple[int, int] | None = None
    min_batch: int = 1

    @classmethod
    def from_dict(cls, d: dict) -> "ConvRule":
        k = d.get("kernel")
        if isinstance(k, int):
            k = (k, k)
        elif k is not None:
            k = tuple(int(x) for x in k)
        rule = cls(module=str(d.get("module", "")), formula=str(d["formula"]), kernel=k,
                   min_batch=int(d.get("min_batch", 1)))
        _compile(rule.formula)          # a bad formula fails when the profile is read
        return rule

    def matches(self, module: str, kernel: tuple[int, int], batch: int = 1) -> bool:
        return ((self.kernel is None or tuple(kernel) == self.kernel) and batch >= self.min_batch
                and re.search(self.module, module) is not None)

    def bytes(self, input: int, output: int, weight: int) -> int:
        return int(_compile(self.formula)(input=input, output=output, weight=weight))


_NAMES = {"input", "output", "weight"}
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.FloorDiv: lambda a, b: a // b, ast.Div: lambda a, b: a / b}


@lru_cache(maxsize=None)
def _compile(formula: str):
    """An arithmetic expression over input, output, weight (+ - * / //, numbers, max, min)."""
    tree = ast.parse(formula, mode="eval")

    def ev(node, env):
        if isinstance(node, ast.Expression):
            return ev(node.body, env)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name) and node.id in _NAMES:
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left, env), ev(node.right, env))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("max", "min")
                and not node.keywords):
            return (max if node.func.id == "max" else min)(ev(a, env) for a in node.args)
        raise ValueError(f"conv workspace formula {formula!r}: unsupported {ast.dump(node)[:60]}")

    probe = {n: 1 for n in _NAMES}
    ev(tree, probe)
    return lambda **env: ev(tree, env)


def _formula_default(name: str):
    from sd_vram.formula import gpu_profiles

    return getattr(gpu_profiles.get("default"), name)


def _d(name: str):
    return field(default_factory=lambda: _formula_default(name))


@dataclass(frozen=True)
class GPUProfile:
    """A formula GPU profile as the simulation reads it. Fields left out take the values of
    the formula's "default" profile (formula/profiles/default.json)."""

    name: str = field(default_factory=lambda: _formula_default("name"))
    compute_capability: tuple[int, int] = _d("compute_capability")
    torch_version: tuple[int, int] = _d("torch_version")
    # cuDNN runtime version as torch reports it (torch.backends.cudnn.version(), e.g. 91900).
    cudnn_version: int | None = _d("cudnn_version")
    cuda_version: tuple[int, int] = _d("cuda_version")
    total_memory: int = _d("total_memory")        # sizes the expandable segment's address space only
    multiprocessor_count: int = _d("multiprocessor_count")
    # None: the default of the torch build for this GPU (see cublas_workspace_bytes).
    cublas_workspace: int | None = _d("cublas_workspace")
    cublaslt_workspace: int = _d("cublaslt_workspace")
    cuda_context: int = _d("cuda_context")        # NVML beyond torch's reserved memory (not simulated)
    # a name in CONV_RULE_SETS, or a sequence of rule dicts (see ConvRule)
    conv_workspace: object = _d("conv_workspace_rule")
    # simulation only
    cudnn_frontend_d256: bool = True
    cudnn_sdpa_deprioritized: bool = False

    def with_(self, **changes) -> "GPUProfile":
        return replace(self, **changes)

    @classmethod
    def from_formula(cls, fp, **changes) -> "GPUProfile":
        """The simulation's view of a sd_vram.formula.gpu_profiles.GPUProfile."""
        conv = tuple(fp.conv_workspace_rules) if getattr(fp, "conv_workspace_rules", ()) else fp.conv_workspace_rule
        kw = dict(name=fp.name, compute_capability=tuple(fp.compute_capability),
                  torch_version=tuple(fp.torch_version), cudnn_version=fp.cudnn_version,
                  cuda_version=tuple(fp.cuda_version), total_memory=fp.total_memory,
                  multiprocessor_count=fp.multiprocessor_count, cublas_workspace=fp.cublas_workspace,
                  cublaslt_workspace=getattr(fp, "cublaslt_workspace", 0), cuda_context=fp.cuda_context,
                  conv_workspace=conv)
        kw.update(changes)
        return cls(**kw)

    @property
    def conv_rules(self) -> tuple[ConvRule, ...]:
        cw = self.conv_workspace
        if cw is None or cw is False:
            return ()
        if isinstance(cw, str):
            if cw not in CONV_RULE_SETS:
                raise ValueError(f"unknown conv workspace rule {cw!r}; known: {', '.join(CONV_RULE_SETS)}")
            cw = CONV_RULE_SETS[cw]
        return tuple(r if isinstance(r, ConvRule) else ConvRule.from_dict(r) for r in cw)

    @property
    def cublas_workspace_bytes(self) -> int:
        """cuBLAS workspace per handle/stream, allocated once via the caching allocator.

        A profile's measured value wins. Without one: aten/src/ATen/cuda/CublasHandlePool.cpp,
        CUBLAS_WORKSPACE_CONFIG=":SIZE_KiB:COUNT..." sums SIZE*COUNT; without it 32 MiB on
        sm90+ and 4096 KiB x 2 + 16 KiB x 8 before that.
        """
        if self.cublas_workspace is not None:
            return self.cublas_workspace
        env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        if env:
            total = 0
            for size, count in re.findall(r":(\d+):(\d+)", env):
                total += int(size) * 1024 * int(count)
            if total:
                return total
        if self.compute_capability[0] >= 9:
            return 32 * MiB
        return 4096 * 1024 * 2 + 16 * 1024 * 8


@lru_cache(maxsize=None)
def _named(name: str) -> GPUProfile:
    from sd_vram.formula import gpu_profiles

    return GPUProfile.from_formula(gpu_profiles.get(name))


def get_profile(gpu) -> GPUProfile:
    """A GPUProfile from a formula profile name ("default", "h200", ...), a formula profile
    object, a GPUProfile (returned as is) or None (the default)."""
    if isinstance(gpu, GPUProfile):
        return gpu
    if gpu is None:
        return _named("default")
    if isinstance(gpu, str):
        return _named(gpu.lower())
    if hasattr(gpu, "conv_workspace_rule"):
        return GPUProfile.from_formula(gpu)
    from sd_vram.formula.options import InputError

    raise InputError(f"a GPU profile is a name or a profile object, got {gpu!r}")


def profile_names() -> list[str]:
    from sd_vram.formula import gpu_profiles

    return sorted(gpu_profiles.profiles())


def __getattr__(name):
    # DEFAULT_PROFILE is read lazily: the formula's profiles may change while a process runs tests
    if name == "DEFAULT_PROFILE":
        return _named("default")
    raise AttributeError(name)
