"""Kernel facts: which kernel PyTorch runs for a call, and what it takes from the caching allocator.

The one table the equation, the simulation, the probe and the GPU suite read. A "stack" is
anything with the GPUProfile fields it names (compute_capability, torch_version,
cudnn_version, cuda_version, cudnn_sdpa_deprioritized, cudnn_frontend_d256); the functions
take plain numbers and names, never tensors, so the equation can ask them too.

1. SDPA backend (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, pytorch/pytorch
   001f694a): select_sdp_backend walks priority_order() and returns the first backend whose
   can_use_* filters pass; priority_order() puts cuDNN first when
   check_prefer_cudnn_attention() (cuDNN runtime > 9.15.0 on sm90/sm10x, for CUDA < 13 builds
   only minor 0 or 3; TORCH_CUDNN_SDPA_DEPRIORITIZED=1 turns it off), else the context's
   default flash, efficient, math, cudnn. Only enabled backends are tried: under
   ``sdpa_kernel([FLASH_ATTENTION])`` a head dim flash cannot run (> 256,
   check_head_dim_size_flash) finds no kernel and raises "No available kernel. Aborting
   execution." This project's ``attention="flash"`` (and cudnn, efficient) therefore means
   "that backend first, PyTorch's order after it, every backend enabled" (the GPU suite sets
   it with ``sdpa_kernel([requested, ...rest], set_priority=True)``): the VAE's head dim 512
   then runs memory-efficient, as on "auto". ``"math"`` forces math everywhere.
2. cuBLAS and cuBLASLt workspaces (aten/src/ATen/cuda/CublasHandlePool.cpp,
   parseChosenWorkspaceSize, getCUDABlasLtWorkspaceSize): allocated through the caching
   allocator at the first matmul of a handle and stream, and kept.
3. cuDNN convolution workspaces: rules fitted to measurements (CONV_RULE_SETS), first match
   on the module path, kernel size and batch; a probed profile's exact shapes win over them.
"""

from __future__ import annotations

import ast
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache

KiB, MiB = 1 << 10, 1 << 20

# --- 1. scaled_dot_product_attention --------------------------------------------------------------

FLASH, EFFICIENT, MATH, CUDNN = "flash", "efficient", "math", "cudnn"
DEFAULT_ORDER = (FLASH, EFFICIENT, MATH, CUDNN)          # at::Context's default sDPPriorityOrder
CUDNN_FIRST_ORDER = (CUDNN, FLASH, EFFICIENT, MATH)      # priority_order() when cuDNN is preferred
HALF = ("float16", "bfloat16")


@dataclass(frozen=True)
class SdpaCall:
    """One attention call as sdp_utils.cpp's filters see it (q: batch, heads, q_len, d_qk)."""

    batch: int
    heads: int
    q_len: int
    kv_len: int
    d_qk: int
    d_v: int | None = None            # None: d_qk
    d_k: int | None = None            # None: d_qk
    dtype: str = "float16"
    mask: bool = False
    dropout_p: float = 0.0
    is_causal: bool = False
    last_dim_contiguous: bool = True  # stride(-1) == 1 (or size 1) for q, k and v: flash, cuDNN
    last_dim_stride_1: bool = True    # stride(-1) == 1 strictly: memory-efficient
    offset_bytes: tuple[int, ...] = (0, 0, 0)   # storage_offset * element_size of q, k, v

    @property
    def dv(self) -> int:
        return self.d_qk if self.d_v is None else self.d_v

    @property
    def dk(self) -> int:
        return self.d_qk if self.d_k is None else self.d_k


def prefers_cudnn_attention(stack) -> bool:
    """check_prefer_cudnn_attention()."""
    major, minor = stack.compute_capability
    return (not getattr(stack, "cudnn_sdpa_deprioritized", False) and (stack.cudnn_version or 0) > 91500
            and major in (9, 10) and (tuple(stack.cuda_version) >= (13, 0) or minor in (0, 3)))


def sdpa_priority_order(stack) -> tuple[str, ...]:
    return CUDNN_FIRST_ORDER if prefers_cudnn_attention(stack) else DEFAULT_ORDER


def cudnn_head_dim_limit(stack, d_qk: int, d_v: int) -> int:
    """check_cudnn_tensor_shapes' head dim limit, per torch version.

    torch <= 2.12 (measured on torch 2.11 + cuDNN 9.19 on an H200, results/H200/
    20261126T052554Z_nogit.json: head dims 40, 80 and 160 all ran CUDNN_ATTENTION): 128,
    256 on sm90 exactly with cuDNN >= 9.10.0, 192 for the (192, 128) DeepSeek shape on sm10x
    with cuDNN >= 9.11.0.
    torch >= 2.13 (read from the sources, not measured yet): 256 on sm90/sm10x (not sm107
    before cuDNN 9.26) with cuDNN > 9.22 and cudnn-frontend >= 1.24, the same 192 case, else 128.
    """
    cc = tuple(stack.compute_capability)
    ver = stack.cudnn_version or 0
    if tuple(stack.torch_version) <= (2, 12):
        if ver >= 91000 and cc == (9, 0):
            return 256
        if ver >= 91100 and cc[0] == 10 and d_qk == 192 and d_v == 128:
            return 192
        return 128
    sm90_or_10x = cc == (9, 0) or cc[0] == 10
    unsupported_sm107 = cc == (10, 7) and ver <= 92500
    if sm90_or_10x and not unsupported_sm107 and ver > 92200 and getattr(stack, "cudnn_frontend_d256", True):
        return 256
    if sm90_or_10x and ver >= 91100 and d_qk == 192 and d_v == 128:
        return 192
    return 128


def _cc_in(cc, lo, hi) -> bool:
    return lo <= tuple(cc) <= hi


def can_use_cudnn(stack, c: SdpaCall) -> bool:
    cc, ver = tuple(stack.compute_capability), stack.cudnn_version or 0
    if ver < 90000 or not _cc_in(cc, (8, 0), (12, 1)) or c.dtype not in HALF:
        return False
    if c.dropout_p * 16.0 != math.floor(c.dropout_p * 16.0):
        return False
    if c.batch > 65535 or c.heads > 65535:
        return False
    limit = cudnn_head_dim_limit(stack, c.d_qk, c.dv)
    if c.d_qk > limit or c.dv > limit or c.d_qk % 8 or c.dv % 8:
        return False
    if c.kv_len == 1 or c.q_len == 0 or c.kv_len == 0:   # key length 1: the H200 ran flash
        return False
    return c.last_dim_contiguous


def can_use_flash(stack, c: SdpaCall) -> bool:
    if not _cc_in(stack.compute_capability, (8, 0), (12, 1)) or c.dtype not in HALF or c.mask:
        return False
    if not (c.d_qk == c.dk == c.dv) or c.d_qk > 256:     # check_head_dim_size_flash
        return False
    if c.is_causal and c.q_len != c.kv_len:
        return False
    return c.q_len > 0 and c.kv_len > 0 and c.last_dim_contiguous


def min_gemm_alignment(stack, dtype: str) -> int:
    """minimum_gemm_alignment: head dims must be multiples of this for memory-efficient."""
    major = stack.compute_capability[0]
    half = dtype in HALF
    use_tc = major >= 8 or (major >= 7 and half)
    align = 4 if major >= 8 else 1
    if use_tc:
        align = max(align, 128 // (16 if half else 32))
    return align


def can_use_efficient(stack, c: SdpaCall) -> bool:
    cc = tuple(stack.compute_capability)
    if not _cc_in(cc, (5, 0), (12, 1)):
        return False
    if c.dtype not in (("float16", "float32", "bfloat16") if cc[0] >= 8 else ("float16", "float32")):
        return False
    align = min_gemm_alignment(stack, c.dtype)
    if c.d_qk != c.dk or c.d_qk % align or c.dv % align or c.d_qk <= 0 or c.dv <= 0:
        return False
    if cc[0] >= 8:
        align_bytes = align * (2 if c.dtype in HALF else 4)
        if any(off % align_bytes for off in c.offset_bytes):
            return False
    return c.q_len > 0 and c.kv_len > 0 and c.last_dim_stride_1


CAN_USE = {CUDNN: can_use_cudnn, FLASH: can_use_flash, EFFICIENT: can_use_efficient, MATH: lambda s, c: True}


def sdpa_backend(stack, requested: str, call: SdpaCall) -> str:
    """The backend PyTorch runs this call on: "auto" as select_sdp_backend picks; a named
    backend first and PyTorch's order after it (module docstring); "math" always math."""
    if requested == MATH:
        return MATH
    order = sdpa_priority_order(stack)
    if requested != "auto":
        order = (requested,) + tuple(b for b in order if b != requested)
    for backend in order:
        if CAN_USE[backend](stack, call):
            return backend
    return MATH


def efficient_output_accumulator(dtype: str, d_qk: int, d_v: int) -> bool:
    """kNeedsOutputAccumulatorBuffer of the kernel attention.cu dispatches to: fp16/bf16 head
    dims > 128 use the 32x128 gmem kernel (kMaxK 65536), which accumulates in a global fp32
    buffer {B, M, heads, Kv}; fp32 never needs it (output_accum_t == output_t)."""
    return dtype in HALF and max(d_qk, d_v) > 128


def flash_num_splits(multiprocessor_count: int, batch, heads, seqlen_q, seqlen_k, head_dim) -> int:
    """flash_api.cpp num_splits_heuristic (dropout 0): above one split, flash allocates fp32
    softmax_lse_accum and out_accum buffers."""
    block_n = 256 if head_dim <= 64 else (128 if head_dim <= 128 else 64)
    num_n_blocks = (seqlen_k + block_n - 1) // block_n
    num_m_blocks = (seqlen_q + 64 - 1) // 64
    batch_nheads_mblocks = batch * heads * num_m_blocks
    num_sms = multiprocessor_count * 2
    if batch_nheads_mblocks >= 0.8 * num_sms:
        return 1
    max_splits = min(128, num_sms, num_n_blocks)
    if max_splits < 1:
        return 1

    def eligible(s):
        return s == 1 or -(-num_n_blocks // s) != -(-num_n_blocks // (s - 1))

    eff, max_eff = [], 0.0
    for s in range(1, max_splits + 1):
        if not eligible(s):
            eff.append(0.0)
            continue
        n_waves = batch_nheads_mblocks * s / num_sms
        e = n_waves / math.ceil(n_waves)
        max_eff = max(max_eff, e)
        eff.append(e)
    for s in range(1, max_splits + 1):
        if eligible(s) and eff[s - 1] >= 0.85 * max_eff:
            return s
    return 1


# --- 2. cuBLAS and cuBLASLt workspaces ------------------------------------------------------------

def cublas_workspace(compute_capability, env=None) -> int:
    """parseChosenWorkspaceSize: CUBLAS_WORKSPACE_CONFIG=":SIZE_KiB:COUNT[:SIZE:COUNT...]"
    sums SIZE x COUNT KiB (unparsable: the default); without it 4096 KiB x 8 = 32 MiB on sm90
    exactly (major 9, minor 0), ":4096:2:16:8" = 8.125 MiB on every other architecture."""
    env = os.environ if env is None else env
    cc = tuple(compute_capability)
    default = 4096 * 8 * KiB if cc == (9, 0) else 4096 * KiB * 2 + 16 * KiB * 8
    config = env.get("CUBLAS_WORKSPACE_CONFIG")
    if config:
        pairs = re.findall(r":([0-9]+):([0-9]+)", config)
        if pairs:
            return sum(int(size) * KiB * int(count) for size, count in pairs)
    return default


def cublaslt_workspace(compute_capability, env=None) -> int:
    """The cuBLASLt workspace allocated beside cuBLAS's: getCUDABlasLtWorkspaceSize,
    CUBLASLT_WORKSPACE_SIZE KiB (default 1024), capped at the cuBLAS workspace unless
    TORCH_CUBLASLT_UNIFIED_WORKSPACE=0; with TORCH_CUBLASLT_UNIFIED_WORKSPACE=1 cuBLASLt uses
    cuBLAS's buffer (getCUDABlasLtWorkspace) and allocates nothing."""
    env = os.environ if env is None else env
    unified = env.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE", "").strip().upper()
    if unified in ("1", "ON", "YES", "TRUE", "Y"):
        return 0
    try:
        size = int(env.get("CUBLASLT_WORKSPACE_SIZE", "1024")) * KiB
    except ValueError:                   # torch warns and keeps the default
        size = 1024 * KiB
    if unified not in ("0", "OFF", "NO", "FALSE", "N"):
        size = min(size, cublas_workspace(compute_capability, env))
    return size


# --- 3. cuDNN convolution workspaces -------------------------------------------------------------

# Named rule sets (GPUProfile.conv_workspace_rule). "nchw_transpose", measured on the H200
# (torch 2.11, cuDNN 9.19; results/H200/20261126T052749Z_nogit_memhistory_truck-4032x3024.json,
# raw allocations inside at::native::cudnn_convolution): the engine cuDNN picks for the VAE's
# fp16 NCHW 3x3 convolutions works in NHWC and takes one workspace holding the transposed
# input, output and filter (input + output + weight bytes, + < 512 B), e.g. decoder
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
        # exact with the rule below) bound its workspace by 1280 n H W B. Unprobed: taken as 0.
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


def _scaled(rules, scale: dict, replace: dict) -> tuple[dict, ...]:
    out = []
    for r in rules:
        key = (r["module"], r.get("min_batch", 1))
        if key in replace:
            r = {**r, "formula": replace[key]}
        elif (r["module"], r["formula"]) in scale:
            r = {**r, "formula": f"{scale[r['module'], r['formula']]} * ({r['formula']})"}
        out.append(r)
    return tuple(out)


# The heaviest workspaces the project has evidence for (the bounds' upper end): the H100 conv
# probe (results/H100-80GB-HBM3/20261126T055338Z_nogit_conv_probe.json, 7 sizes) saw cuDNN pick
# heavier engines than "nchw_transpose" for some shapes on the same sm90 stack: up to 1.2883 x
# (input + output + weight) for the VAE's 3x3 convs (decoder up_blocks.3.resnets.0.conv1 at
# 1 x 256 x 256 x 256) and 1.5162 x for the UNet's (up_blocks.3.resnets.1.conv1 at
# 2 x 640 x 32 x 32); the batch >= 2 upsampler is bounded by the archives' images2-* peaks at
# 1280 n H W bytes = 2.5 x its input. The floor is no workspace at all: cuDNN's fallback list
# ends in zero-workspace engines (DESIGN.md).
CONV_RULE_SETS["heaviest"] = _scaled(
    CONV_RULE_SETS["nchw_transpose"],
    scale={(r"^vae\.", "input + output + weight"): "1.29", (r"^unet\.", "input + output + weight"): "1.52"},
    replace={(r"^vae\.decoder\.up_blocks\.2\.upsamplers\.0\.conv$", 2): "input * 5 // 2"})
HEAVIEST_CONV_RULE_SET, NO_CONV_WORKSPACE = "heaviest", "none"
# Every workspace above and every probed profile's per-shape workspace was measured on fp16
# convolutions. The rules are byte formulas (input + output + weight bytes), so another dtype
# scales them with its element size; that cuDNN picks the same engines for bf16 and for fp32
# (TF32 on by default for convolutions: torch.backends.cudnn.allow_tf32) is derived, not measured.
MEASURED_CONV_DTYPE = "fp16"


@dataclass(frozen=True)
class ConvRule:
    """cuDNN workspace of the convolutions whose module path matches ``module`` (re.search),
    whose kernel is ``kernel`` (if given) and whose batch is at least ``min_batch``:
    ``formula`` over input, output, weight bytes."""

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
        compile_formula(rule.formula)          # a bad formula fails when the profile is read
        re.compile(rule.module)
        return rule

    def matches(self, module: str, kernel, batch: int = 1) -> bool:
        return ((self.kernel is None or tuple(kernel) == self.kernel) and batch >= self.min_batch
                and re.search(self.module, module) is not None)

    def bytes(self, input: int, output: int, weight: int) -> int:
        return int(compile_formula(self.formula)(input=input, output=output, weight=weight))


_NAMES = {"input", "output", "weight"}
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.FloorDiv: lambda a, b: a // b, ast.Div: lambda a, b: a / b}


@lru_cache(maxsize=None)
def compile_formula(formula: str):
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

    ev(tree, {n: 1 for n in _NAMES})          # checks every node: only arithmetic, max and min
    code = compile(tree, f"<conv workspace formula {formula!r}>", "eval")
    scope = {"__builtins__": {}, "max": max, "min": min}
    return lambda **env: eval(code, scope, env)   # noqa: S307 - the tree was checked above


@lru_cache(maxsize=None)
def _rules(spec) -> tuple[ConvRule, ...]:
    if isinstance(spec, str):
        if spec not in CONV_RULE_SETS:
            raise ValueError(f"unknown conv workspace rule {spec!r}; known: {', '.join(CONV_RULE_SETS)}")
        spec = CONV_RULE_SETS[spec]
        return tuple(ConvRule.from_dict(r) for r in spec)
    return tuple(r if isinstance(r, ConvRule) else ConvRule.from_dict(dict(r)) for r in spec)


def conv_rules(spec) -> tuple[ConvRule, ...]:
    """A rule set's name in CONV_RULE_SETS, or a sequence of rule dicts / ConvRules."""
    if spec is None or spec is False:
        return ()
    if not isinstance(spec, str):
        spec = tuple(r if isinstance(r, ConvRule) else ConvRule.from_dict(dict(r)) for r in spec)
    return _rules(spec)


NHWC_KEY = ":nhwc"


def conv_key(module: str, input_shape, nhwc: bool = False) -> str:
    """A measured workspace's key in a probed profile: module path @ N x C x H x W input (the
    logical shape), + ":nhwc" for a channels-last convolution (section 4b)."""
    return f"{module}@{'x'.join(str(int(d)) for d in input_shape)}{NHWC_KEY if nhwc else ''}"


def rule_workspace(rules, module: str, kernel, batch: int, input: int, output: int, weight: int) -> int:
    """The first matching rule's workspace in bytes; 0 where no rule matches."""
    k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    for r in rules:
        if r.matches(module, k, batch):
            return r.bytes(input, output, weight)
    return 0


class ConvWorkspace:
    """The convolution workspaces of one GPU profile: a probed profile's measurement for the
    exact (module, input shape) where it holds one, else the first matching rule. ``nhwc``: the
    convolutions run channels-last (the measurements' keys end in ":nhwc"). ``floor``
    (bounds): unmeasured convolutions take no workspace instead. ``used`` collects what
    answered ("measured", "rule"), for the breakdown. ``elastic``: cuDNN can run without it
    (try_configs' fallback); ``term``: its name in a live set."""

    elastic = True
    term = "cuDNN conv workspace"

    def __init__(self, rules=(), measured=None, floor: bool = False, nhwc: bool = False):
        self.rules, self.floor, self.nhwc = tuple(rules), floor, nhwc
        self.measured = {k: v for k, v in (measured or {}).items() if k.endswith(NHWC_KEY) == nhwc}
        self.used: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.rules or self.measured)

    def __call__(self, module: str, kernel, input_shape, input: int, output: int, weight: int) -> int:
        if self.measured:
            key = conv_key(module, input_shape, self.nhwc)
            if key in self.measured:
                self.used.add("measured")
                return self.measured[key]
        self.used.add("rule")
        if self.floor:
            return 0
        k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        rule = _first_match(self.rules, module, k, int(input_shape[0]))
        return rule.bytes(input, output, weight) if rule is not None else 0


@lru_cache(maxsize=4096)
def _first_match(rules: tuple, module: str, kernel: tuple, batch: int):
    """The first rule of `rules` for this convolution (the same for every call of it)."""
    return next((r for r in rules if r.matches(module, kernel, batch)), None)


# --- 4. Convolutions with cuDNN off, cuDNN's search and deterministic modes ------------------------

# torch.backends.cudnn.enabled = False (aten/src/ATen/native/Convolution.cpp, torch 2.13):
# ConvParams::use_cudnn is false, SD1.5's convolutions are not depthwise (groups 1) and not
# dilated, so _select_conv_backend returns ConvBackend::Slow2d on CUDA. _convolution then runs
# ``input.contiguous(backend_memory_format)`` with the Contiguous format (thnn_conv_use_channels_last
# in ConvUtils.h is true only for CPU tensors): a channels-last input is copied to NCHW, and
# at::thnn_conv2d -> slow_conv2d_forward_out_cuda (aten/src/ATen/native/cuda/ConvolutionMM2d.cu)
# allocates the contiguous output, then one ``columns`` buffer of
# (C_in x kH x kW) x (H_out x W_out) elements in the input's dtype, which im2col fills and a
# cuBLAS gemm consumes for each batch element in turn (the buffer is reused across the batch,
# so it does not grow with it). ``requires_columns`` is false for a 1x1 kernel with stride 1
# and no padding: the gemm then reads the input itself and no buffer is allocated. The columns
# and the input copy are freed when the convolution returns. The gemm uses the cuBLAS handle's
# workspace, resident since the text encoder's first matmul. Nothing here depends on the GPU:
# derived from the sources, not yet measured.
NATIVE_COLUMNS = "im2col columns (cuDNN off)"


def native_conv_columns(c_in: int, kernel, out_hw, itemsize: int = 2, stride=(1, 1), padding=None) -> int:
    """Bytes of slow_conv2d_forward's columns buffer; 0 when requires_columns is false.
    padding None: a 1x1 kernel has none and a larger one has some (every SD1.5 convolution)."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    padded = (kh, kw) != (1, 1) if padding is None else any(int(p) for p in padding)
    if (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and not padded:
        return 0
    return c_in * kh * kw * int(out_hw[0]) * int(out_hw[1]) * itemsize


class NativeConv:
    """The kernel-internal allocations of PyTorch's own CUDA convolution (cuDNN off), with the
    interface of ConvWorkspace: ``__call__`` gives the columns buffer. It is not elastic: the
    columns are no workspace a library can do without, so an allocation that fails is the
    call's out-of-memory error (no fallback, no floor)."""

    elastic = False
    term = NATIVE_COLUMNS
    floor = False

    def __init__(self, itemsize: int = 2):
        self.itemsize = itemsize            # the pipeline's dtype: the columns hold the input's
        self.used: set[str] = set()

    def __bool__(self) -> bool:
        return True

    def __call__(self, module: str, kernel, input_shape, input: int, output: int, weight: int,
                 output_shape=None) -> int:
        self.used.add("native")
        out_hw = tuple(output_shape[2:]) if output_shape is not None else tuple(input_shape[2:])
        return native_conv_columns(int(input_shape[1]), kernel, out_hw, self.itemsize)


# torch.backends.cudnn.benchmark = True (aten/src/ATen/native/cudnn/Conv_v8.cpp run_single_conv,
# torch 2.13): a shape not in the benchmark cache goes through get_plans_from_find:
# generate_and_filter_plans builds every heuristic config and the fallback list, keeps the plans
# whose workspace is at most get_available_workspace() (CUDACachingAllocator::cacheInfo: the free
# device memory from cudaMemGetInfo, raised to the largest cached free block) and allocates ONE
# workspace of the largest kept plan's size (halved after each OutOfMemoryError) through the
# caching allocator, times the plans on it, frees it, empties the allocator's cache
# (_cudnn_get_conv_benchmark_empty_cache, on by default) and runs the fastest plan (try_plans,
# with that plan's own workspace). How large the largest candidate's workspace is, and which plan
# wins, only a GPU shows; the source bounds it by the memory free at the search. So a call's peak
# lies between the call with cuDNN's fallback engines (no workspace) and the whole capacity of the
# card, and where in between depends on the memory free when each new shape is searched and on
# the process's earlier calls (the benchmark cache is per process).
BENCHMARK_NOTE = ("cudnn.benchmark=True: each new convolution shape times cuDNN's engines on one workspace as "
                  "large as the memory free at that moment allows (Conv_v8.cpp get_plans_from_find), so the peak "
                  "depends on run-time state; the point is the call with the default engines, the range runs "
                  "from no workspace to the card's capacity (derived, not measured on a GPU)")

# torch.backends.cudnn.deterministic = True: _convolution passes deterministic to
# cudnn_convolution; get_generator_sources' filterEngineConfigs drops every engine config with
# the CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC note, from the heuristic list and the fallback list,
# and the benchmark cache keys on the flag. The top remaining engine is the default one when it
# is deterministic; whether it is, and so its workspace, only a GPU shows. The equation keeps the
# profile's rules as the point (measured shapes were measured without the flag and are not used)
# and widens the bounds to the floor and the heaviest rule set (derived, not measured on a GPU).
DETERMINISTIC_NOTE = "cudnn.deterministic=True: the deterministic engines' workspaces are derived, not measured"


def conv_kernels(options, profile, floor: bool = False, heaviest: bool = False):
    """The kernel-internal allocations of this call's convolutions: PyTorch's native columns with
    cuDNN off (NativeConv), else cuDNN's workspaces from the GPU profile (ConvWorkspace: measured
    shapes of the call's layout, else its rules; floor: none; heaviest: the heaviest rule set).
    With cudnn_deterministic the profile's measured shapes (taken without the flag) are not used."""
    if not options.cudnn:
        return NativeConv(options.itemsize)
    return profile.conv_workspace(floor=floor, heaviest=heaviest, dtype=options.dtype,
                                  channels_last=options.channels_last,
                                  measured=not options.cudnn_deterministic)


def no_conv_workspace(options):
    """The call with cuDNN's fallback engines everywhere (no workspace): max-size's floor. With
    cuDNN off the columns stay: PyTorch's native convolution has no engine to fall back to."""
    return NativeConv(options.itemsize) if not options.cudnn else ConvWorkspace()

# --- 4b. Memory formats: channels_last (Options.channels_last) ---------------------------------------
# pipe.unet.to(memory_format=torch.channels_last) and the same for pipe.vae re-stride every 4-D
# parameter and buffer (nn.Module.to converts the 4-D and 5-D ones; SD1.5 has no 5-D), a
# (C_out, C_in, 1, 1) filter too: its contiguous strides do not suggest channels_last, so
# Tensor.to copies it. Then:
# - cuDNN convolutions (aten/src/ATen/native/ConvUtils.h cudnn_conv_suggest_memory_format): NHWC
#   when the input OR the weight suggests channels_last (a 4-D weight, cuDNN >= 7.6.3, not
#   float64). Convolution.cpp _convolution passes ``input.contiguous(backend_memory_format)`` to
#   at::cudnn_convolution: an NCHW input is copied to NHWC before the output is allocated, and
#   freed when the convolution returns; the output is NHWC; a channels-last filter needs no copy.
# - GroupNorm (aten/src/ATen/native/group_norm.cpp): through torch 2.13.0 the composite
#   group_norm makes a CUDA input contiguous (``input.contiguous()``: a copy of an NHWC map, alive
#   until native_group_norm returns) and native_group_norm writes NCHW (pytorch/pytorch#186414
#   moved that copy into native_group_norm, same order). pytorch/pytorch#191945 (merged
#   2026-08-13, after 2.13.0 branched: its composite still copies, tests/test_channels_last.py
#   checks the installed wheel) keeps the input's suggested format on CUDA
#   (group_norm_memory_format): no copy, an NHWC output. Taken as torch >= 2.14: read from the
#   sources, not measured. A 3-D (B, C, N) view of an NHWC map is copied either way.
# - Workspaces of NHWC convolutions: in the H100 conv probe (results/H100-80GB-HBM3/
#   20261126T055338Z_nogit_conv_probe.json, 64x64-256x256, torch 2.11, cuDNN 9.19) the
#   convolutions with a channels-last input (the encoder's conv_in, its stride-2 downsamplers,
#   two 1x1 shortcuts) took their 3x3 filter's bytes (its NHWC copy, which a channels-last filter
#   does not need) and nothing else. No stride-1 3x3 convolution of 128-1280 channels, the kind
#   the peaks sit at, ran NHWC there: the rule set "nhwc" (none) is derived for them, and the
#   bounds stay open (the heaviest rule set on record) unless a probe measured the call's NHWC
#   convolutions (`sd-vram probe --channels-last`: GPUProfile.conv_workspaces keys ending in
#   ":nhwc", the rule set they fit in GPUProfile.conv_workspace_rule_nhwc).
NHWC_CONV_RULE_SET = "nhwc"
CONV_RULE_SETS[NHWC_CONV_RULE_SET] = ()
GROUP_NORM_KEEPS_NHWC_FROM = (2, 14)


def group_norm_keeps_channels_last(stack) -> bool:
    """CUDA GroupNorm keeps an NHWC input's layout instead of copying it to NCHW (section 4b)."""
    return tuple(stack.torch_version) >= GROUP_NORM_KEEPS_NHWC_FROM


@dataclass(frozen=True)
class Layouts:
    """The layout copies the UNet's and the VAE's feature maps go through (section 4b).

    NCHW weights (the default): nothing here; the encoder's convolutions that get the
    channels-last image's layout are covered by the workspace rules above. Channels-last
    weights: every convolution writes NHWC; each GroupNorm copies its input and writes NCHW
    (norm_copies) unless the stack's GroupNorm keeps NHWC (norm_keeps_nhwc), and so the
    convolution after its SiLU copies it back; Transformer2DModel's ``.permute(0, 3, 1, 2)
    .contiguous()`` feeds proj_out an NCHW map it copies, while the permuted view LayerNorm
    reads is contiguous."""

    channels_last: bool = False
    norm_keeps_nhwc: bool = False

    @classmethod
    def of(cls, options, stack) -> "Layouts":
        return cls(options.channels_last, options.channels_last and group_norm_keeps_channels_last(stack))

    @property
    def norm_copies(self) -> bool:
        """GroupNorm copies its (NHWC) input, and the convolution after it copies its (NCHW) input."""
        return self.channels_last and not self.norm_keeps_nhwc


# --- 5. xformers memory_efficient_attention (forward, no grad) ------------------------------------
# pipe.enable_xformers_memory_efficient_attention() (DERIVATION.md, "xformers attention"): the
# release that pairs with torch 2.11 is xformers 0.0.35 (its wheel requires torch >= 2.10).
# Its forward dispatch (xformers/ops/fmha/dispatch.py _dispatch_fw_priority_list, then
# _run_priority_list: the first op whose not_supported_reasons is empty) tries, on CUDA:
#   fa3F   flash3.FwOp: only with the separate flash_attn_3 package (flash3.py imports it or
#          leaves the operator unbuilt); the xformers wheel does not bring it;
#   fa2F-pt flash.FwOp: PyTorch's own aten._flash_attention_forward (flash.py, _USE_PT_FLASH_ATTN
#          when the flash_attn package is absent): sm80+, fp16/bf16, head dim <= 256 and a
#          multiple of 8 (check_lastdim_alignment_stride1), no tensor bias;
#   cutlassF-pt cutlass.FwOp: PyTorch's aten._efficient_attention_forward with
#          compute_log_sumexp=False: sm <= 9.0, fp16/bf16/fp32, head dim <= 65536.
# (The split-KV triton op is prepended only for MQA/GQA keys, which diffusers never passes.)
# So the kernels and their scratch are PyTorch's, as section 1 gives them for SDPA's flash and
# memory-efficient backends; only the processor around them differs (activations.py).

XFORMERS_VERSION = "0.0.35"
XF_FLASH, XF_CUTLASS = "fa2F-pt", "cutlassF-pt"


@dataclass(frozen=True)
class XformersOp:
    """The xformers operator one attention call runs on, the PyTorch kernel it calls, and
    that kernel's split-KV count (flash only; 1 for memory-efficient)."""

    name: str
    kernel: str
    splits: int = 1

    def __str__(self) -> str:
        return f"xformers[{self.name}]"


def xformers_forward_op(stack, head_dim: int, dtype: str = "float16", bias: bool = False,
                        batch_heads: int = 1, q_len: int = 1, kv_len: int = 1) -> XformersOp | None:
    """The op xformers 0.0.35 dispatches a BMK call (q, k, v: batch_heads x tokens x head_dim,
    what diffusers' XFormersAttnProcessor passes) to in inference, or None: no operator
    (xformers raises NotImplementedError "No operator found")."""
    cc = tuple(stack.compute_capability)
    if cc >= (8, 0) and dtype in HALF and head_dim <= 256 and head_dim % 8 == 0 and not bias:
        splits = flash_num_splits(stack.multiprocessor_count, batch_heads, 1, q_len, kv_len, head_dim)
        return XformersOp(XF_FLASH, FLASH, splits)
    if cc <= (9, 0) and head_dim <= 65536:
        return XformersOp(XF_CUTLASS, EFFICIENT)
    return None


def flash_head_dim_rounded(head_dim: int) -> int:
    """flash_api.cpp round_multiple(head_size, head_size <= 128 ? 32 : 64): the last dim of
    the fp32 split-KV out_accum buffer."""
    return -(-head_dim // 32) * 32 if head_dim <= 128 else -(-head_dim // 64) * 64
