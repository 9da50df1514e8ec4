"""A model of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp).

It replays a stream of storage allocations and frees and tracks what
torch.cuda.memory_allocated() / memory_reserved() would report. Rules, as in the C++ source
(DeviceCachingAllocator, torch 2.x):

- malloc: ``size = round_size(orig)``: at least kMinBlockSize = 512 B, else a multiple of
  512 (roundup_power2_divisions not set). Pool: small if size <= kSmallSize (1 MiB), else large.
- get_free_block: ``pool.blocks.lower_bound(size)`` over blocks ordered by (size, ptr), i.e.
  best fit, lowest address among equal sizes. (max_split_size is unlimited by default, so
  the "oversized block" rules never fire.)
- alloc_block (no free block fits): cudaMalloc of get_allocation_size(size): kSmallBuffer
  (2 MiB) for small, kLargeBuffer (20 MiB) for sizes < kMinLargeAlloc (10 MiB), else the size
  rounded up to kRoundLarge (2 MiB). reserved += that segment size.
- should_split: small pool: remaining >= kMinBlockSize; large pool: remaining > kSmallSize
  (1 MiB); with expandable segments: remaining >= kMinBlockSize for both pools. An unsplit
  block keeps its whole size, and allocated_bytes counts ``block->size``.
- free_block: try_merge_blocks with prev and next when they are free (and, for expandable
  segments, equally mapped); the merged block goes back to the pool. Nothing is returned to
  the driver during a call (no OOM retry paths), one stream; ``empty_cache()`` (between
  calls) releases whole free segments or, with expandable segments, unmaps free pages.
- expandable_segments:True: one segment per pool reserves 1 1/8 x total GPU memory of
  address space; pages of kSmallBuffer (2 MiB, small pool) or kLargeBuffer (20 MiB, large
  pool) are mapped on demand (ExpandableSegment::map rounds the range out to whole pages).
  find_expandable_block takes the lowest-address unmapped block (joined with a free block
  just before it); try_allocate_expandable_block maps only ``size`` (the rounded request,
  not get_allocation_size), and get_free_block compares expandable blocks by the size they
  can grow to (block + the unmapped block after it).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

kMinBlockSize = 512
kSmallSize = 1 << 20
kSmallBuffer = 2 << 20
kLargeBuffer = 20 << 20
kMinLargeAlloc = 10 << 20
kRoundLarge = 2 << 20

_SEGMENT_ALIGN = kRoundLarge  # cudaMalloc returns addresses aligned far beyond 512 B


def round_size(size: int) -> int:
    """CUDACachingAllocator round_size (default config)."""
    if size < kMinBlockSize:
        return kMinBlockSize
    return kMinBlockSize * ((size + kMinBlockSize - 1) // kMinBlockSize)


def get_allocation_size(size: int) -> int:
    """Segment size cudaMalloc'ed for a (rounded) request that found no cached block."""
    if size <= kSmallSize:
        return kSmallBuffer
    if size < kMinLargeAlloc:
        return kLargeBuffer
    return kRoundLarge * ((size + kRoundLarge - 1) // kRoundLarge)


class Block:
    __slots__ = ("ptr", "size", "allocated", "prev", "next", "pool", "segment", "mapped")

    def __init__(self, ptr, size, pool, segment=None, mapped=True):
        self.ptr = ptr
        self.size = size
        self.allocated = False
        self.prev = None
        self.next = None
        self.pool = pool
        self.segment = segment      # an _ExpandableSegment, or None for cudaMalloc segments
        self.mapped = mapped

    def is_split(self):
        return self.prev is not None or self.next is not None

    def __repr__(self):
        return f"Block(ptr={self.ptr:#x}, size={self.size}, allocated={self.allocated}, mapped={self.mapped})"


class _SortedBlocks:
    """std::set<Block*> ordered by a key: (size, ptr) for free blocks, ptr for unmapped ones."""

    def __init__(self, by_size: bool):
        self.by_size = by_size
        self.keys: list[tuple] = []
        self.blocks: list[Block] = []

    def _key(self, b):
        return (b.size, b.ptr) if self.by_size else (b.ptr,)

    def insert(self, b):
        k = self._key(b)
        i = bisect.bisect_left(self.keys, k)
        self.keys.insert(i, k)
        self.blocks.insert(i, b)

    def erase(self, b):
        k = self._key(b)
        i = bisect.bisect_left(self.keys, k)
        assert i < len(self.keys) and self.blocks[i] is b, "block not in pool"
        del self.keys[i]
        del self.blocks[i]

    def lower_bound(self, key) -> int:
        return bisect.bisect_left(self.keys, key)

    def __len__(self):
        return len(self.blocks)


class _Pool:
    def __init__(self, is_small: bool):
        self.is_small = is_small
        self.blocks = _SortedBlocks(by_size=True)      # free, mapped blocks
        self.unmapped = _SortedBlocks(by_size=False)   # expandable segments only


class _ExpandableSegment:
    def __init__(self, base, page, max_pages):
        self.base = base
        self.page = page
        self.max_pages = max_pages
        self.mapped_pages: set[int] = set()


@dataclass
class AllocatorStats:
    allocated: int = 0
    reserved: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    segments: int = 0
    num_device_alloc: int = 0


class CachingAllocator:
    """Replays malloc/free like DeviceCachingAllocator on one device and one stream."""

    def __init__(self, expandable_segments: bool = False, total_memory: int = 80 << 30):
        self.expandable_segments = expandable_segments
        self.total_memory = total_memory
        self.small = _Pool(True)
        self.large = _Pool(False)
        self.stats = AllocatorStats()
        self._next_address = 1 << 32
        self.segment_sizes: list[int] = []     # cudaMalloc'ed segments, in order

    # -- public -----------------------------------------------------------------------
    def malloc(self, orig_size: int) -> Block:
        size = round_size(orig_size)
        pool = self.small if size <= kSmallSize else self.large
        block = self._get_free_block(pool, size)
        if block is None:
            block = self._alloc_block(pool, size)
        if self._should_split(block, size):
            block = self._split(block, size)
        block.allocated = True
        self.stats.allocated += block.size
        self.stats.peak_allocated = max(self.stats.peak_allocated, self.stats.allocated)
        return block

    def free(self, block: Block) -> None:
        assert block.allocated, "double free"
        block.allocated = False
        self.stats.allocated -= block.size
        pool = block.pool
        for cand in (block.prev, block.next):
            self._try_merge(block, cand, pool)
        pool.blocks.insert(block)

    def empty_cache(self) -> None:
        """release_cached_blocks: cudaFree every free block that is a whole segment; with
        expandable segments, unmap the whole pages inside every free block (unmap_block:
        the range is rounded inwards to pages, the partial pages at either end stay mapped)."""
        for pool in (self.small, self.large):
            to_unmap = []
            for b in list(pool.blocks.blocks):
                if b.segment is not None:
                    to_unmap.append(b)
                elif b.prev is None and b.next is None:
                    pool.blocks.erase(b)
                    self.stats.reserved -= b.size
                    self.stats.segments -= 1
            for b in to_unmap:
                self._unmap_block(b)

    def _unmap_block(self, block: Block) -> None:
        seg, pool = block.segment, block.pool
        off = block.ptr - seg.base
        begin = -(-off // seg.page)
        end = (off + block.size) // seg.page
        if begin >= end:
            return
        pool.blocks.erase(block)
        u_ptr, u_size = seg.base + begin * seg.page, (end - begin) * seg.page
        before = u_ptr - block.ptr
        if before > 0:
            b = Block(block.ptr, before, pool, seg, mapped=True)
            b.prev, b.next = block.prev, block
            if block.prev is not None:
                block.prev.next = b
            block.prev = b
            pool.blocks.insert(b)
        after = block.size - before - u_size
        if after > 0:
            a = Block(u_ptr + u_size, after, pool, seg, mapped=True)
            a.prev, a.next = block, block.next
            if block.next is not None:
                block.next.prev = a
            block.next = a
            pool.blocks.insert(a)
        block.ptr, block.size, block.mapped = u_ptr, u_size, False
        self._try_merge(block, block.prev, pool)
        self._try_merge(block, block.next, pool)
        pool.unmapped.insert(block)
        self.stats.reserved -= u_size

    def reset_peak(self) -> None:
        self.stats.peak_allocated = self.stats.allocated
        self.stats.peak_reserved = self.stats.reserved

    @property
    def allocated(self) -> int:
        return self.stats.allocated

    @property
    def reserved(self) -> int:
        return self.stats.reserved

    # -- internals (names follow the C++) ----------------------------------------------
    def _should_split(self, block: Block, size: int) -> bool:
        remaining = block.size - size
        if block.pool.is_small or self.expandable_segments:
            return remaining >= kMinBlockSize
        return remaining > kSmallSize

    def _get_free_block(self, pool: _Pool, size: int):
        blocks = pool.blocks
        i = blocks.lower_bound((size, -1))
        if i >= len(blocks):
            return None
        if blocks.blocks[i].segment is not None and self.expandable_segments:
            # "for the purposes of best fit we consider its size to be the size it can
            # expand to" (get_free_block): walk on while the next candidate is smaller.
            def expandable_size(b):
                nxt = b.next
                return b.size + (nxt.size if nxt is not None and not nxt.mapped else 0)

            j = i + 1
            while (blocks.blocks[i].segment is not None and j < len(blocks)
                   and expandable_size(blocks.blocks[j]) < expandable_size(blocks.blocks[i])):
                i = j
                j += 1
        block = blocks.blocks[i]
        blocks.erase(block)
        return block

    def _alloc_block(self, pool: _Pool, size: int) -> Block:
        if self.expandable_segments:
            return self._try_allocate_expandable_block(pool, size)
        alloc_size = get_allocation_size(size)
        ptr = self._reserve_address(alloc_size)
        block = Block(ptr, alloc_size, pool)
        self.stats.reserved += alloc_size
        self.stats.peak_reserved = max(self.stats.peak_reserved, self.stats.reserved)
        self.stats.segments += 1
        self.stats.num_device_alloc += 1
        self.segment_sizes.append(alloc_size)
        return block

    def _reserve_address(self, nbytes: int) -> int:
        ptr = self._next_address
        self._next_address += -(-nbytes // _SEGMENT_ALIGN) * _SEGMENT_ALIGN + _SEGMENT_ALIGN
        return ptr

    def _split(self, block: Block, size: int) -> Block:
        """alloc_found_block with split_remainder: the front becomes the allocation."""
        remaining = block
        new = Block(block.ptr, size, block.pool, block.segment, True)
        new.prev = remaining.prev
        if new.prev is not None:
            new.prev.next = new
        new.next = remaining
        remaining.prev = new
        remaining.ptr += size
        remaining.size -= size
        block.pool.blocks.insert(remaining)
        return new

    def _try_merge(self, dst: Block, src, pool: _Pool) -> int:
        if src is None or src.allocated or dst.mapped != src.mapped:
            return 0
        if dst.prev is src:          # [src dst]
            dst.ptr = src.ptr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:                        # [dst src]
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        (pool.blocks if src.mapped else pool.unmapped).erase(src)
        return src.size

    # -- expandable segments ----------------------------------------------------------
    def _find_expandable_block(self, pool: _Pool, size: int) -> Block:
        def allocatable(b):
            return b is not None and not b.allocated

        def has_space(b):
            total = 0
            while total < size and allocatable(b):
                total += b.size
                b = b.next
            return total >= size

        for c in list(pool.unmapped.blocks):   # lowest address first
            if allocatable(c.prev):
                c = c.prev
            if has_space(c):
                return c
        page = kSmallBuffer if pool.is_small else kLargeBuffer
        address_space = self.total_memory + self.total_memory // 8
        max_pages = -(-address_space // page)
        base = self._reserve_address(max_pages * page)
        seg = _ExpandableSegment(base, page, max_pages)
        cand = Block(base, max_pages * page, pool, seg, mapped=False)
        pool.unmapped.insert(cand)
        return cand

    def _map_block(self, to_map: Block, size: int) -> None:
        seg = to_map.segment
        pool = to_map.pool
        offset = to_map.ptr - seg.base
        assert offset % seg.page == 0
        begin = offset // seg.page
        end = -(-(offset + size) // seg.page)
        mapped = (end - begin) * seg.page
        pool.unmapped.erase(to_map)
        to_map.mapped = True
        if mapped < to_map.size:
            rest = Block(to_map.ptr + mapped, to_map.size - mapped, pool, seg, mapped=False)
            rest.prev, rest.next = to_map, to_map.next
            if to_map.next is not None:
                to_map.next.prev = rest
            to_map.next = rest
            pool.unmapped.insert(rest)
            to_map.size = mapped
        self._try_merge(to_map, to_map.prev, pool)
        self._try_merge(to_map, to_map.next, pool)
        pool.blocks.insert(to_map)
        self.stats.reserved += mapped
        self.stats.peak_reserved = max(self.stats.peak_reserved, self.stats.reserved)
        self.stats.num_device_alloc += 1

    def _try_allocate_expandable_block(self, pool: _Pool, size: int) -> Block:
        cand = self._find_expandable_block(pool, size)
        if not cand.mapped:
            self._map_block(cand, min(cand.size, size))
        while cand.size < size:
            nxt = cand.next
            self._map_block(nxt, min(size - cand.size, nxt.size))
            cand = nxt
        pool.blocks.erase(cand)
        return cand


@dataclass
class Replay:
    """What a replay of an event stream produced."""

    allocated: list[int] = field(default_factory=list)   # after each event
    reserved: list[int] = field(default_factory=list)
    peak_allocated: int = 0
    peak_reserved: int = 0
    peak_index: int = -1                                 # event index of the first maximum


def replay(events, expandable_segments: bool = False, total_memory: int = 80 << 30,
           start: int = 0, allocator: CachingAllocator | None = None) -> Replay:
    """Replay (kind, key, nbytes) events: kind "alloc", "free" or "empty_cache".

    Events before `start` (the resident weights) are replayed but the peaks count from
    `start` on, as torch.cuda.reset_peak_memory_stats() before the call would.
    """
    alloc = allocator or CachingAllocator(expandable_segments, total_memory)
    blocks: dict = {}
    out = Replay()
    peak_a, peak_i = -1, -1
    for i, ev in enumerate(events):
        kind, key, nbytes = ev[0], ev[1], ev[2]
        if kind == "alloc":
            blocks[key] = alloc.malloc(nbytes)
        elif kind == "free":
            alloc.free(blocks.pop(key))
        else:
            alloc.empty_cache()
        a = alloc.stats.allocated
        out.allocated.append(a)
        out.reserved.append(alloc.stats.reserved)
        if i >= start and a > peak_a:
            peak_a, peak_i = a, i
    out.peak_allocated = max(peak_a, 0)
    out.peak_index = peak_i
    out.peak_reserved = alloc.stats.reserved if events else 0
    return out
