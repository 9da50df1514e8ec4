"""PYTORCH_CUDA_ALLOC_CONF, parsed as c10's allocator config parses it (CUDAAllocatorConfig /
AcceleratorAllocatorConfig::parseArgs, torch 2.x), into the settings the allocator model obeys.

lexArgs drops spaces and splits on ',', ':', '[' and ']'; then each option is `key:value`,
separated by commas. The options that change memory:

- expandable_segments:True|False
- max_split_size_mb:N (N >= 20): cached blocks of at least N MiB are never split, and a request
  below N MiB never takes one (parseMaxSplitSize);
- max_non_split_rounding_mb:N (N >= 20): how much larger than the request an unsplit oversize
  block may be (default 20 MiB, kLargeBuffer);
- roundup_power2_divisions:N or [256:4,512:2,>:1]: requests round up to one of N divisions
  between two powers of two, per size interval of 1 MiB .. 64 GiB (N a power of two);
- garbage_collection_threshold:T (0 < T < 1): with a memory fraction set, cached unsplit
  blocks are released, oldest first, once reserved memory passes T x the allowance.

Options that change no memory figure (lock and pinned-host behaviour) are accepted and kept
under `ignored`. `backend:cudaMallocAsync` hands memory to the CUDA driver's stream-ordered
pool, whose reserved memory the driver decides: not modelled, and refused in one line. Any
other key is refused as PyTorch refuses it: "Unrecognized CachingAllocator option: KEY".
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
ROUNDUP_INTERVALS = 16            # kRoundUpPowerOfTwoIntervals: 1 MiB, 2 MiB, ... 32 GiB and above
_LARGE_BUFFER_MB = 20             # kLargeBuffer / MiB: the floor of max_split_size_mb
# The limits follow the current c10/core/AllocatorConfig.cpp (older releases wanted > 20).
_SWITCHES_WITHOUT_MEMORY_EFFECT = ("release_lock_on_cudamalloc", "pinned_use_cuda_host_register",
                                   "pinned_use_host_register", "pinned_use_background_threads",
                                   "graph_capture_record_stream_reuse")        # True or False
_NUMBERS_WITHOUT_MEMORY_EFFECT = ("pinned_num_register_threads", "pinned_reserve_segment_size_mb")


class AllocConfError(ValueError):
    """A PYTORCH_CUDA_ALLOC_CONF that PyTorch refuses (or that the model cannot follow)."""


@dataclass(frozen=True)
class AllocConf:
    expandable_segments: bool = False
    max_split_size: int | None = None            # bytes; None: unlimited (SIZE_MAX)
    max_non_split_rounding: int = _LARGE_BUFFER_MB * MiB
    roundup_power2_divisions: tuple[int, ...] = (0,) * ROUNDUP_INTERVALS
    garbage_collection_threshold: float = 0.0    # 0: off
    ignored: tuple[str, ...] = ()                # accepted options without a memory effect

    def divisions(self, size: int) -> int:
        """roundup_power2_divisions(size): the setting of size's interval (1 MiB .. 64 GiB)."""
        index = max(size.bit_length() - 1 - 20, 0)
        return self.roundup_power2_divisions[min(index, ROUNDUP_INTERVALS - 1)]


NATIVE = AllocConf()


# c10/core/AllocatorConfig.cpp, AllocatorConfig::instance: PYTORCH_ALLOC_CONF when it is set,
# else the older PYTORCH_CUDA_ALLOC_CONF
ENVIRONMENT = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def environment_variable(env) -> str | None:
    """The variable a process reads its allocator settings from, or None."""
    return next((name for name in ENVIRONMENT if env.get(name) is not None), None)


def from_environment(env) -> str:
    """The allocator settings a process reads from its environment ("" for none)."""
    name = environment_variable(env)
    return str(env.get(name) or "") if name else ""


def _lex(text: str) -> list[str]:
    tokens, buf = [], ""
    for ch in text:
        if ch in ",:[]":
            if buf:
                tokens.append(buf)
                buf = ""
            tokens.append(ch)
        elif ch != " ":
            buf += ch
    if buf:
        tokens.append(buf)
    return tokens


def _int(tok: str, key: str) -> int:
    if not tok.isdigit():
        raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: {key} needs a whole number, got {tok!r}")
    return int(tok)


def _power_of_two(n: int, key: str) -> int:
    if n and n & (n - 1):
        raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: {key}: for roundups, the divisions has to be power of 2, got {n}")
    return n


def parse(text: str | None) -> AllocConf:
    """The settings of a PYTORCH_CUDA_ALLOC_CONF string ("" or None: the defaults)."""
    if not text:
        return NATIVE
    if not isinstance(text, str):
        raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF must be text, got {type(text).__name__}")
    tokens = _lex(text)
    out: dict = {}
    ignored = []
    i = 0

    def expect(tok: str) -> None:
        nonlocal i
        if i >= len(tokens) or tokens[i] != tok:
            got = tokens[i] if i < len(tokens) else "the end"
            raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: expected {tok!r} in {text!r}, got {got!r}")
        i += 1

    def value() -> str:
        nonlocal i
        if i >= len(tokens) or tokens[i] in ",:[]":
            raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: {key} needs a value in {text!r}")
        i += 1
        return tokens[i - 1]

    while i < len(tokens):
        key = tokens[i]
        i += 1
        expect(":")
        if key == "expandable_segments":
            v = value()
            if v not in ("True", "False"):
                raise AllocConfError("PYTORCH_CUDA_ALLOC_CONF: Expected a single True/False argument for expandable_segments")
            out["expandable_segments"] = v == "True"
        elif key in ("max_split_size_mb", "max_non_split_rounding_mb"):
            mb = _int(value(), key)
            if mb < _LARGE_BUFFER_MB:
                raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: CachingAllocator option {key} too small, "
                                     f"must be >= {_LARGE_BUFFER_MB}")
            out["max_split_size" if key == "max_split_size_mb" else "max_non_split_rounding"] = mb * MiB
        elif key == "garbage_collection_threshold":
            v = value()
            try:
                t = float(v)
            except ValueError:
                raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: garbage_collection_threshold needs a number, got {v!r}") from None
            if not 0 < t < 1:
                raise AllocConfError("PYTORCH_CUDA_ALLOC_CONF: garbage_collect_threshold must be in (0, 1), "
                                     f"got {v}")
            out["garbage_collection_threshold"] = t
        elif key == "roundup_power2_divisions":
            if i < len(tokens) and tokens[i] == "[":
                # c10/core/AllocatorConfig.cpp parseRoundUpPower2Divisions: MiB interval
                # starts (powers of two) -> divisions (a power of two, or 0: no roundup);
                # the first also covers every interval below it, ">" every one after the last
                i += 1
                divs, last, first = [0] * ROUNDUP_INTERVALS, 0, True
                while i < len(tokens) and tokens[i] != "]":
                    start = value()
                    expect(":")
                    n = _power_of_two(_int(value(), key), key)
                    if start == ">":
                        divs[last + 1:] = [n] * (ROUNDUP_INTERVALS - last - 1)
                    else:
                        mb = _int(start, key)
                        if mb == 0 or mb & (mb - 1):
                            raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: {key}: for roundups, the intervals have "
                                                 f"to be power of 2, got {mb}")
                        index = min(mb.bit_length() - 1, ROUNDUP_INTERVALS - 1)
                        if first:
                            divs[:index] = [n] * index
                            first = False
                        divs[index] = n
                        last = index
                    if i < len(tokens) and tokens[i] == ",":
                        i += 1
                expect("]")
                out["roundup_power2_divisions"] = tuple(divs)
            else:
                n = _int(value(), key)
                if n == 0 or n & (n - 1):
                    raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: {key}: for roundups, the divisions has to be "
                                         f"power of 2, got {n}")
                out["roundup_power2_divisions"] = (n,) * ROUNDUP_INTERVALS
        elif key == "backend":
            v = value()
            if v == "cudaMallocAsync":
                raise AllocConfError("PYTORCH_CUDA_ALLOC_CONF: backend:cudaMallocAsync hands memory to the CUDA "
                                     "driver's pool, whose reserved memory the driver decides: not modelled")
            if v != "native":
                raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: Unknown allocator backend, options are native and "
                                     f"cudaMallocAsync, got {v!r}")
        elif key in _SWITCHES_WITHOUT_MEMORY_EFFECT:
            if value() not in ("True", "False"):
                raise AllocConfError(f"PYTORCH_CUDA_ALLOC_CONF: Expected a single True/False argument for {key}")
            ignored.append(key)
        elif key in _NUMBERS_WITHOUT_MEMORY_EFFECT:
            _int(value(), key)
            ignored.append(key)
        else:
            raise AllocConfError(f"Unrecognized CachingAllocator option: {key}")
        if i < len(tokens):
            expect(",")
    return AllocConf(**out, ignored=tuple(ignored))
