"""PyTorch's CUDA caching allocator, as arithmetic (c10/cuda/CUDACachingAllocator.cpp).

- A request is rounded up to a multiple of 512 B (kMinBlockSize).
- Requests <= 1 MiB (kSmallSize) come from 2 MiB segments (kSmallBuffer), the small pool.
- Larger requests come from the large pool: under 10 MiB (kMinLargeAlloc) a new segment is
  20 MiB (kLargeBuffer); otherwise the request rounded up to 2 MiB (kRoundLarge).
- The free block chosen is the smallest that fits (best fit). It is split when the rest is
  >= 512 B (small pool) or > 1 MiB (large pool); otherwise the request keeps the whole
  block, and max_memory_allocated counts the whole block.
- A freed block merges with free neighbours of its segment. Segments are never returned
  during a call (no empty_cache), so reserved memory only grows.

PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: each pool is one segment that grows at its
end by whole pages of its segment size (2 MiB small, 20 MiB large), and a block is split
whenever the rest is >= 512 B, in both pools (shouldSplit).
"""

from __future__ import annotations

import bisect
import itertools

MB = 1024 * 1024
MIN_BLOCK = 512
SMALL_SIZE = 1 * MB
SMALL_BUFFER = 2 * MB
LARGE_BUFFER = 20 * MB
MIN_LARGE_ALLOC = 10 * MB
ROUND_LARGE = 2 * MB


def round_size(n: int) -> int:
    return MIN_BLOCK if n < MIN_BLOCK else -(-n // MIN_BLOCK) * MIN_BLOCK


def segment_size(n: int) -> int:
    if n <= SMALL_SIZE:
        return SMALL_BUFFER
    if n < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-n // ROUND_LARGE) * ROUND_LARGE


class Block:
    __slots__ = ("size", "small", "free", "prev", "next", "id")

    def __init__(self, size, small, bid, prev=None, nxt=None):
        self.size, self.small, self.free, self.prev, self.next, self.id = size, small, True, prev, nxt, bid


class Segments:
    """Blocks of the small and large pools, in address order within each segment."""

    def __init__(self, expandable: bool = False):
        self.expandable = expandable
        self._tail: dict[bool, Block | None] = {True: None, False: None}  # expandable: last block
        self.reserved = 0
        # free blocks per pool as sorted (size, id, block): best fit = first with size >= request
        self._free: dict[bool, list[tuple[int, int, Block]]] = {True: [], False: []}
        self._ids = itertools.count()
        self._live: list[Block] = []

    def _add_free(self, b: Block) -> None:
        b.free = True
        bisect.insort(self._free[b.small], (b.size, b.id, b))

    def _take_free(self, b: Block) -> None:
        lst = self._free[b.small]
        del lst[bisect.bisect_left(lst, (b.size, b.id))]

    def alloc_one(self, n: int) -> Block:
        size = round_size(n)
        small = size <= SMALL_SIZE
        lst = self._free[small]
        i = bisect.bisect_left(lst, (size,))
        if i < len(lst):
            b = lst.pop(i)[2]
        elif self.expandable:
            b = self._grow(size, small)
        else:
            b = Block(segment_size(size), small, next(self._ids))
            self.reserved += b.size
        rest = b.size - size
        if rest >= MIN_BLOCK and (small or self.expandable or rest > SMALL_SIZE):
            r = Block(rest, small, next(self._ids), prev=b, nxt=b.next)
            if b.next is not None:
                b.next.prev = r
            b.next, b.size = r, size
            self._add_free(r)
            if self._tail[small] is b:
                self._tail[small] = r
        b.free = False
        return b

    def _grow(self, size: int, small: bool) -> Block:
        """Map pages at the end of the pool's expandable segment, merged with a free tail."""
        page = SMALL_BUFFER if small else LARGE_BUFFER
        tail = self._tail[small]
        have = tail.size if tail is not None and tail.free else 0
        mapped = -(-(size - have) // page) * page
        self.reserved += mapped
        if have:
            self._take_free(tail)
            tail.size += mapped
            return tail
        b = Block(mapped, small, next(self._ids), prev=tail)
        if tail is not None:
            tail.next = b
        self._tail[small] = b
        return b

    def free_one(self, b: Block) -> None:
        nxt = b.next
        if nxt is not None and nxt.free:
            self._take_free(nxt)
            if self._tail[b.small] is nxt:
                self._tail[b.small] = b
            b.size += nxt.size
            b.next = nxt.next
            if nxt.next is not None:
                nxt.next.prev = b
        prev = b.prev
        if prev is not None and prev.free:
            self._take_free(prev)
            prev.size += b.size
            prev.next = b.next
            if b.next is not None:
                b.next.prev = prev
            if self._tail[b.small] is b:
                self._tail[b.small] = prev
            b = prev
        self._add_free(b)

    def alloc(self, n: int) -> int:
        """Allocate and keep until free_all(); returns the block size the allocator counts."""
        b = self.alloc_one(n)
        self._live.append(b)
        return b.size

    def free_all(self) -> None:
        while self._live:
            self.free_one(self._live.pop())

    def snapshot(self):
        """Reserved bytes and the free blocks: all that later allocations can see of a state
        whose live blocks stay allocated (their free neighbours can never merge across them);
        with expandable segments, whether each free block is its pool's growing tail."""
        free = [b for pool in self._free.values() for _, _, b in pool]
        return self.expandable, self.reserved, [(b.size, b.small, self._tail[b.small] is b) for b in free]

    @classmethod
    def from_snapshot(cls, snap) -> "Segments":
        expandable, reserved, free = snap
        seg = cls(expandable)
        seg.reserved = reserved
        for size, small, is_tail in free:
            b = Block(size, small, next(seg._ids))
            seg._add_free(b)
            if is_tail:
                seg._tail[small] = b
        return seg


def pack(sizes: list[int], expandable: bool = False) -> tuple[int, int]:
    """(allocated, reserved) bytes after allocating `sizes` in order and freeing nothing."""
    seg = Segments(expandable)
    allocated = sum(seg.alloc(n) for n in sizes)
    return allocated, seg.reserved
