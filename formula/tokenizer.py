"""The exact SD1.5 CLIP BPE tokenizer, offline and in pure Python (no torch, no transformers).

It counts a prompt's tokens the way transformers 5's `CLIPTokenizer` does for the pipeline:
NFC-normalized, whitespace-collapsed, lower-cased text split by CLIP's pattern, the two
special tokens kept whole, byte-level BPE over the 48,894 merges
bundled in data/clip_merges.txt.gz. The vocabulary is derived from the merges exactly as
OpenAI's CLIP builds it: 256 byte tokens, the same 256 with "</w>", one token per merge, and
the two specials, 49,408 entries in all.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import tempfile
import unicodedata
from functools import lru_cache
from importlib import resources

MAX_LENGTH = 77  # the pipeline pads and truncates to this, BOS and EOS included
MAX_PROMPT_TOKENS = MAX_LENGTH - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

try:  # the pattern CLIP was trained with uses Unicode classes; `regex` has them
    import regex as _re

    _PATTERN = _re.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        _re.IGNORECASE,
    )
except ImportError:  # same classes spelled with the standard library (letters = \w minus digits and _)
    _PATTERN = re.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+""",
        re.IGNORECASE,
    )


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def merges() -> list[tuple[str, str]]:
    raw = resources.files(__package__).joinpath("data/clip_merges.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:] if line.strip()]


@lru_cache(maxsize=1)
def vocab() -> dict[str, int]:
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges()]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


@lru_cache(maxsize=1)
def _ranks() -> dict[tuple[str, str], int]:
    return {m: i for i, m in enumerate(merges())}


@lru_cache(maxsize=10_000)
def _bpe(word: str) -> tuple[str, ...]:
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    ranks = _ranks()
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return tuple(parts)


def _clean(text: str) -> str:
    """transformers 5 (tokenizers' CLIP normalizer): NFC, collapse whitespace, lower-case."""
    text = unicodedata.normalize("NFC", text)
    return re.sub(r"\s+", " ", text).strip().lower()


def tokenize(text: str) -> list[str]:
    """BPE tokens of `text`, without BOS/EOS."""
    byte_map = bytes_to_unicode()
    out: list[str] = []
    for piece in _PATTERN.findall(_clean(text)):
        if piece in (BOS, EOS):  # special tokens are matched whole, never split by BPE
            out.append(piece)
            continue
        out.extend(_bpe("".join(byte_map[b] for b in piece.encode("utf-8"))))
    return out


def encode(text: str) -> list[int]:
    """Token ids as the pipeline feeds them before padding: BOS, tokens (truncated), EOS."""
    v = vocab()
    ids = [v[t] for t in tokenize(text)][:MAX_PROMPT_TOKENS]
    return [v[BOS], *ids, v[EOS]]


def count_tokens(text: str) -> int:
    """Number of CLIP BPE tokens in `text` (BOS/EOS not counted, no truncation)."""
    return len(tokenize(text))


def write_vocab_files(folder: str | None = None) -> tuple[str, str]:
    """vocab.json and merges.txt for transformers' CLIPTokenizer, from the bundled merges."""
    folder = folder or os.path.join(tempfile.gettempdir(), "sd_vram_clip_tokenizer")
    os.makedirs(folder, exist_ok=True)
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if not (os.path.exists(vocab_file) and os.path.exists(merges_file)):
        tmp = f"{vocab_file}.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(vocab(), f, ensure_ascii=False)
        os.replace(tmp, vocab_file)
        tmp = f"{merges_file}.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges()) + "\n")
        os.replace(tmp, merges_file)
    return vocab_file, merges_file
