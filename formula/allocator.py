"""PyTorch's CUDA caching allocator, as a model (c10/cuda/CUDACachingAllocator.cpp, torch 2.x).

The one allocator model of the project: the equation replays its schedules through it and the
simulation replays its recorded event streams through it. Rules, named as in the C++ source
(DeviceCachingAllocator; one device, one stream, the default config unless noted):

- malloc: ``size = round_size(orig)``: at least kMinBlockSize = 512 B, else a multiple of 512.
  Pool: small if size <= kSmallSize (1 MiB), else large.
- get_free_block: ``pool.blocks.lower_bound(size)`` over blocks ordered by (size, ptr): best
  fit, the lowest address among equal sizes. New segments get increasing addresses, as a fresh
  process's cudaMalloc hands them out. (max_split_size is unlimited by default, so the
  "oversized block" rules never fire.)
- alloc_block (no free block fits): cudaMalloc of get_allocation_size(size): kSmallBuffer
  (2 MiB) for small, kLargeBuffer (20 MiB) for sizes < kMinLargeAlloc (10 MiB), else the size
  rounded up to kRoundLarge (2 MiB).
- should_split: small pool: remaining >= kMinBlockSize; large pool: remaining > kSmallSize;
  with expandable segments: remaining >= kMinBlockSize in both pools. An unsplit block keeps
  its whole size, and allocated_bytes counts ``block->size``.
- free_block: try_merge_blocks with prev and next when they are free (and equally mapped).
- The OOM path (malloc): when alloc_block fails, release_available_cached_blocks frees
  oversize cached blocks (only with max_split_size_mb), then release_cached_blocks frees every
  cached block that is a whole segment (expandable segments: unmaps their free pages) and
  alloc_block runs again with isRetry=true (``num_alloc_retries += 1``). If that fails too,
  ``num_ooms += 1`` and malloc raises OutOfMemoryError "CUDA out of memory. Tried to allocate
  <alloc_size>. ...". alloc_block fails in one of two ways (``limit``):
  "card": cudaMalloc (expandable segments: cuMemCreate for each page) finds the card full,
  i.e. reserved memory would pass ``capacity``; "fraction": set_per_process_memory_fraction's
  check ``total_allocated_memory + alloc_size > allowed_memory_maximum``, made with
  get_allocation_size(size) before any expandable mapping, and only then does
  garbage_collection_threshold act (``set_fraction``).
- expandable_segments:True: one segment per pool reserves 1 1/8 x total GPU memory of
  address space; pages of kSmallBuffer (small pool) or kLargeBuffer (large pool) are mapped
  on demand (ExpandableSegment::map rounds the range out to whole pages).
  find_expandable_block takes the lowest-address unmapped block (joined with a free block just
  before it); try_allocate_expandable_block maps only ``size`` (the rounded request, not
  get_allocation_size), and get_free_block compares expandable blocks by the size they can
  grow to (block + the unmapped block after it).
- empty_cache() = release_cached_blocks.

This model's choice of tie-break (address, not creation order) was checked against the GPU:
replaying the simulation's streams of the archived H200 cases, both orders give the same
reserved memory with the native allocator, and only the address order gives it with
expandable segments (bench-3840x2560: +0.00 % against +2.06 %; DERIVATION.md section 8).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from .allocconf import NATIVE, AllocConf

kMinBlockSize = 512
kSmallSize = 1 << 20
kSmallBuffer = 2 << 20
kLargeBuffer = 20 << 20
kMinLargeAlloc = 10 << 20
kRoundLarge = 2 << 20

_SEGMENT_ALIGN = kRoundLarge  # cudaMalloc returns addresses aligned far beyond 512 B
_BASE_ADDRESS = 1 << 32


def round_size(size: int, conf: AllocConf = NATIVE) -> int:
    """CUDACachingAllocator round_size: 512 B steps, or with roundup_power2_divisions N (for
    sizes above N x 512 B) the next of N equal steps between two powers of two."""
    if size >= kMinBlockSize:
        divisions = conf.divisions(size)
        if divisions > 1 and size > kMinBlockSize * divisions:
            return _roundup_power2_next_division(size, divisions)
    return _round_512(size)


def _round_512(size: int) -> int:
    """round_size without roundup_power2_divisions: at least 512 B, in steps of 512 B."""
    return kMinBlockSize if size < kMinBlockSize else -(-size // kMinBlockSize) * kMinBlockSize


def block_bytes(nbytes: int) -> int:
    """The bytes a request of `nbytes` holds in the allocator (default config): round_size, or
    none for 0 B (CUDA hands out a null pointer, no block). The one 512-B rounding of the
    project: the live sets, the GPU suite and the probes use it."""
    return round_size(nbytes) if nbytes else 0


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def get_allocation_size(size: int) -> int:
    """Segment size cudaMalloc'ed for a (rounded) request that found no cached block."""
    if size <= kSmallSize:
        return kSmallBuffer
    if size < kMinLargeAlloc:
        return kLargeBuffer
    return kRoundLarge * ((size + kRoundLarge - 1) // kRoundLarge)


def format_size(n: int) -> str:
    """c10's format_size, as the OOM message prints sizes: two decimals, binary units."""
    if n <= 1024:
        return f"{n} bytes"
    for unit, scale in (("KiB", 1 << 10), ("MiB", 1 << 20)):
        if n <= scale << 10:
            return f"{n / scale:.2f} {unit}"
    return f"{n / (1 << 30):.2f} GiB"


class OutOfMemoryError(Exception):
    """What torch.OutOfMemoryError reports for an allocation that failed after the retry.

    requested: alloc_size, the segment malloc tried to create (what the message's "Tried to
    allocate" prints); size: the rounded request; allocated / reserved: the allocator's bytes
    after release_cached_blocks; capacity: the bytes it may hold."""

    def __init__(self, requested: int, size: int, allocated: int, reserved: int, capacity: int):
        self.requested, self.size = requested, size
        self.allocated, self.reserved, self.capacity = allocated, reserved, capacity
        super().__init__(self.message())

    def message(self, total: int | None = None, used_outside: int = 0, allowed: int | None = None) -> str:
        """PyTorch's text (the fixed tail left out). total: the card's memory (cudaMemGetInfo);
        used_outside: what the process holds beside the allocator (CUDA context, library
        handles: NVML's "this process has ... in use" adds it to reserved memory); allowed:
        set_per_process_memory_fraction's allowance, when the limit is a fraction."""
        total = self.capacity + used_outside if total is None else total
        free = max(total - used_outside - self.reserved, 0)
        allowed_info = f"{format_size(allowed)} allowed; " if allowed is not None else ""
        return (f"CUDA out of memory. Tried to allocate {format_size(self.requested)}. GPU 0 has a total "
                f"capacity of {format_size(total)} of which {format_size(free)} is free. Including non-PyTorch "
                f"memory, this process has {format_size(self.reserved + used_outside)} memory in use. "
                f"{allowed_info}Of the allocated memory {format_size(self.allocated)} is allocated by PyTorch, and "
                f"{format_size(self.reserved - self.allocated)} is reserved by PyTorch but unallocated.")


class Block:
    __slots__ = ("ptr", "size", "allocated", "prev", "next", "pool", "segment", "mapped", "gc_base")

    def __init__(self, ptr, size, pool, segment=None, mapped=True):
        self.gc_base = 0            # the pool's get_free_block count when it was cached
        self.ptr = ptr
        self.size = size
        self.allocated = False
        self.prev = None
        self.next = None
        self.pool = pool
        self.segment = segment      # an _ExpandableSegment, or None for cudaMalloc segments
        self.mapped = mapped

    def __repr__(self):
        return f"Block(ptr={self.ptr:#x}, size={self.size}, allocated={self.allocated}, mapped={self.mapped})"


class _SortedBlocks:
    """std::set<Block*> ordered by a key: (size, ptr) for free blocks, ptr for unmapped ones.
    Kept as one sorted list of (key..., block); keys are unique, so blocks never compare."""

    __slots__ = ("by_size", "items", "calls")

    def __init__(self, by_size: bool):
        self.by_size = by_size
        self.items: list[tuple] = []
        self.calls = 0              # get_free_blocks_call_count (counted with garbage collection on)

    def insert(self, b):
        b.gc_base = self.calls      # insert_into_blocks: the block's age starts now
        bisect.insort(self.items, (b.size, b.ptr, b) if self.by_size else (b.ptr, b))

    def erase(self, b):
        items = self.items
        i = bisect.bisect_left(items, (b.size, b.ptr) if self.by_size else (b.ptr,))
        assert i < len(items) and items[i][-1] is b, "block not in pool"
        del items[i]

    def lower_bound(self, key) -> int:
        return bisect.bisect_left(self.items, key)

    @property
    def blocks(self) -> list[Block]:
        return [t[-1] for t in self.items]

    def __getitem__(self, i) -> Block:
        return self.items[i][-1]

    def __len__(self):
        return len(self.items)


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


@dataclass
class AllocatorStats:
    """The counters of torch.cuda.memory_stats() that the project reads."""

    allocated: int = 0
    reserved: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    segments: int = 0
    num_device_alloc: int = 0
    num_alloc_retries: int = 0
    num_ooms: int = 0


class CachingAllocator:
    """Replays malloc/free like DeviceCachingAllocator on one device and one stream.

    capacity: the bytes the allocator may reserve (None: unlimited): the card's memory less
    what the process holds beside it (limit "card"), or set_per_process_memory_fraction's
    allowance (limit "fraction"); the module docstring says how the two fail.
    conf: the PYTORCH_CUDA_ALLOC_CONF settings (allocconf.parse); `expandable_segments` is
    the shorthand for conf=AllocConf(expandable_segments=True)."""

    def __init__(self, expandable_segments: bool = False, total_memory: int = 80 << 30,
                 capacity: int | None = None, conf: AllocConf | None = None, limit: str = "card"):
        if limit not in ("card", "fraction"):
            raise ValueError(f"limit must be 'card' or 'fraction', got {limit!r}")
        if conf is None:
            conf = AllocConf(expandable_segments=True) if expandable_segments else NATIVE
        elif expandable_segments and not conf.expandable_segments:
            raise ValueError("expandable_segments=True contradicts conf")
        self.conf = conf
        self._roundup = any(conf.roundup_power2_divisions)
        self.expandable_segments = conf.expandable_segments
        self.limit = limit
        # garbage_collection_threshold acts only under a memory fraction (set_fraction)
        self._gc = conf.garbage_collection_threshold > 0 and capacity is not None and limit == "fraction"
        self.total_memory = total_memory
        self.capacity = capacity
        self.small = _Pool(True)
        self.large = _Pool(False)
        self.stats = AllocatorStats()
        self._next_address = _BASE_ADDRESS

    # -- public -----------------------------------------------------------------------
    def malloc(self, orig_size: int) -> Block:
        size = round_size(orig_size, self.conf) if self._roundup else _round_512(orig_size)
        pool = self.small if size <= kSmallSize else self.large
        block = self._get_free_block(pool, size)
        if block is None:
            if self._gc:
                self._garbage_collect()
            block = self._alloc_block(pool, size, retry=False)
            if block is None and self._release_available(pool, size):
                block = self._alloc_block(pool, size, retry=False)
            if block is None:                       # the OOM path: release, retry, raise
                self.empty_cache()
                block = self._alloc_block(pool, size, retry=True)
                if block is None:
                    self.stats.num_ooms += 1
                    raise OutOfMemoryError(get_allocation_size(size), size, self.stats.allocated,
                                           self.stats.reserved, self.capacity)
        remaining = block.size - size
        if remaining >= kMinBlockSize and (pool.is_small or self.expandable_segments or
                                           (remaining > kSmallSize and self._below_max_split(size))):
            block = self._split(block, size)        # should_split
        block.allocated = True
        stats = self.stats
        stats.allocated += block.size
        if stats.allocated > stats.peak_allocated:
            stats.peak_allocated = stats.allocated
        return block

    def free(self, block: Block) -> None:
        assert block.allocated, "double free"
        block.allocated = False
        self.stats.allocated -= block.size
        pool = block.pool
        prev, nxt = block.prev, block.next
        if prev is not None and not prev.allocated:
            self._try_merge(block, prev, pool)
        if nxt is not None and not nxt.allocated:
            self._try_merge(block, nxt, pool)
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
                    self._release_block(b)
            for b in to_unmap:
                self._unmap_block(b)

    def reset_peak(self) -> None:
        self.stats.peak_allocated = self.stats.allocated
        self.stats.peak_reserved = self.stats.reserved

    @property
    def allocated(self) -> int:
        return self.stats.allocated

    @property
    def reserved(self) -> int:
        return self.stats.reserved

    # -- states -----------------------------------------------------------------------
    def free_blocks(self) -> tuple:
        """The reserved bytes and every free block by (pool, size, ptr): all that later
        allocations can see of a state whose live blocks stay where they are."""
        return (self.stats.reserved,
                tuple((p.is_small, b.size, b.ptr) for p in (self.small, self.large) for b in p.blocks.blocks))

    def snapshot(self):
        """A compact copy of this state whose allocated blocks are pinned: `restore` gives an
        allocator where they can never be freed (the resident weights of a call), so each run
        of adjacent allocated blocks is kept as one block."""
        segments = []
        seen = set()
        # a segment with no free or unmapped block is wholly pinned and left out: reach the
        # others from their free blocks
        for b in [b for p in (self.small, self.large) for s in (p.blocks, p.unmapped) for b in s.blocks]:
            head = b
            while head.prev is not None:
                head = head.prev
            if id(head) in seen:
                continue
            seen.add(id(head))
            parts = []
            while head is not None:
                state = "a" if head.allocated else ("f" if head.mapped else "u")
                if parts and state == "a" == parts[-1][2]:
                    parts[-1][1] += head.size
                else:
                    parts.append([head.ptr, head.size, state])
                head = head.next
            if all(state == "a" for _, _, state in parts):
                continue        # wholly pinned: only its bytes in the stats can matter again
            seg = b.segment
            segments.append((b.pool.is_small, (seg.base, seg.page, seg.max_pages) if seg else None,
                             tuple(tuple(p) for p in parts)))
        return (self.conf, self.total_memory, self._next_address,
                AllocatorStats(**vars(self.stats)), tuple(segments))

    @classmethod
    def restore(cls, snap, capacity: int | None = None, limit: str = "card") -> "CachingAllocator":
        conf, total, next_address, stats, segments = snap
        a = cls(total_memory=total, capacity=capacity, conf=conf, limit=limit)
        a._next_address = next_address
        a.stats = AllocatorStats(**vars(stats))
        for is_small, seg_args, parts in segments:
            pool = a.small if is_small else a.large
            seg = _ExpandableSegment(*seg_args) if seg_args else None
            prev = None
            for ptr, size, state in parts:
                b = Block(ptr, size, pool, seg, mapped=state != "u")
                b.prev = prev
                if prev is not None:
                    prev.next = b
                if state == "a":
                    b.allocated = True       # pinned: the caller holds no handle to free it
                else:
                    (pool.blocks if state == "f" else pool.unmapped).insert(b)
                prev = b
        return a

    # -- internals (names follow the C++) ----------------------------------------------
    def _below_max_split(self, size: int) -> bool:
        return self.conf.max_split_size is None or size < self.conf.max_split_size

    def _release_block(self, b: Block) -> None:
        """cudaFree of a whole free segment."""
        b.pool.blocks.erase(b)
        self.stats.reserved -= b.size
        self.stats.segments -= 1

    def _release_available(self, pool: _Pool, size: int) -> bool:
        """release_available_cached_blocks: with max_split_size set, free the smallest
        oversize cached block that holds the request, else oversize ones largest first
        until as many bytes are free."""
        limit = self.conf.max_split_size
        if limit is None or not len(pool.blocks):
            return False
        want = max(size, limit)
        i = pool.blocks.lower_bound((want, -1))
        if i < len(pool.blocks):
            if pool.blocks[i].segment is not None:
                return False
            self._release_block(pool.blocks[i])
            return True
        released = 0
        for b in reversed(pool.blocks.blocks):
            if released >= want or b.size < limit:
                break
            if b.segment is None:
                self._release_block(b)
                released += b.size
        return released >= want

    def _garbage_collect(self) -> None:
        """garbage_collect_cached_blocks: past threshold x capacity, release unsplit cached
        large blocks whose age (get_free_block calls since they were cached) is at least
        the average, until reserved is back under the threshold."""
        threshold = int(self.conf.garbage_collection_threshold * self.capacity)
        if self.stats.reserved <= threshold:
            return
        target, reclaimed = self.stats.reserved - threshold, 0
        pool = self.large
        age = lambda b: pool.blocks.calls - b.gc_base  # noqa: E731
        freeable = [b for b in pool.blocks.blocks if b.prev is None and b.next is None]
        total, count, freed = sum(age(b) for b in freeable), len(freeable), True
        while reclaimed < target and freed and count > 0:
            mean, freed = total / count, False
            for b in list(pool.blocks.blocks):
                if b.prev is None and b.next is None and b.segment is None and age(b) >= mean:
                    freed, reclaimed, total, count = True, reclaimed + b.size, total - age(b), count - 1
                    self._release_block(b)

    def _get_free_block(self, pool: _Pool, size: int):
        blocks = pool.blocks
        if self._gc:
            blocks.calls += 1
        i = blocks.lower_bound((size, -1))
        if i >= len(blocks):
            return None
        if self.expandable_segments and blocks[i].segment is not None:
            # "for the purposes of best fit we consider its size to be the size it can
            # expand to" (get_free_block): walk on while the next candidate is smaller.
            def expandable_size(b):
                nxt = b.next
                return b.size + (nxt.size if nxt is not None and not nxt.mapped else 0)

            j = i + 1
            while (blocks[i].segment is not None and j < len(blocks)
                   and expandable_size(blocks[j]) < expandable_size(blocks[i])):
                i = j
                j += 1
        limit = self.conf.max_split_size
        if limit is not None and self._oversize_refused(blocks[i].size, size, limit):
            return None
        block = blocks[i]
        del blocks.items[i]
        return block

    def _oversize_refused(self, block_size: int, size: int, limit: int) -> bool:
        """get_free_block with max_split_size: no oversize block for a small request, and an
        oversize request takes one at most max_non_split_rounding larger."""
        if size < limit <= block_size:
            return True
        return size >= limit and block_size >= size + self.conf.max_non_split_rounding

    def _fits(self, nbytes: int) -> bool:
        return self.capacity is None or self.stats.reserved + nbytes <= self.capacity

    def _alloc_block(self, pool: _Pool, size: int, retry: bool):
        """A new segment (or mapped pages) for `size`, or None when it would exceed capacity."""
        if retry:
            self.stats.num_alloc_retries += 1
        alloc_size = get_allocation_size(size)
        if self.limit == "fraction" and not self._fits(alloc_size):
            return None
        if self.expandable_segments:
            return self._try_allocate_expandable_block(pool, size)
        if not self._fits(alloc_size):
            return None
        block = Block(self._reserve_address(alloc_size), alloc_size, pool)
        self._count_device_alloc(alloc_size)
        self.stats.segments += 1
        return block

    def _count_device_alloc(self, nbytes: int) -> None:
        self.stats.reserved += nbytes
        self.stats.peak_reserved = max(self.stats.peak_reserved, self.stats.reserved)
        self.stats.num_device_alloc += 1

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
        # a request beyond the address space fails at mapping on a real card; the model
        # without a capacity has no card to fail on, so its segment spans the request
        address_space = max(self.total_memory + self.total_memory // 8, size)
        max_pages = -(-address_space // page)
        base = self._reserve_address(max_pages * page)
        seg = _ExpandableSegment(base, page, max_pages)
        cand = Block(base, max_pages * page, pool, seg, mapped=False)
        pool.unmapped.insert(cand)
        return cand

    def _pages(self, b: Block, size: int) -> int:
        """Bytes ExpandableSegment::map maps for `size` bytes from b's start."""
        seg = b.segment
        offset = b.ptr - seg.base
        return (-(-(offset + size) // seg.page) - offset // seg.page) * seg.page

    def _map_block(self, to_map: Block, size: int) -> None:
        seg = to_map.segment
        pool = to_map.pool
        assert (to_map.ptr - seg.base) % seg.page == 0
        mapped = self._pages(to_map, size)
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
        self._count_device_alloc(mapped)

    def _try_allocate_expandable_block(self, pool: _Pool, size: int):
        cand = self._find_expandable_block(pool, size)
        # the pages this would map, checked before mapping any (cuMemCreate fails on a full card)
        need, b, have = 0, cand, 0
        while have < size:
            if not b.mapped:
                need += self._pages(b, min(size - have, b.size))
            have += b.size
            b = b.next
        if self.limit == "card" and not self._fits(need):   # a fraction was checked in _alloc_block
            return None
        if not cand.mapped:
            self._map_block(cand, min(cand.size, size))
        while cand.size < size:
            nxt = cand.next
            self._map_block(nxt, min(size - cand.size, nxt.size))
            cand = nxt
        pool.blocks.erase(cand)
        return cand


def apply(allocator: CachingAllocator, blocks: dict, event):
    """One event of a recorded stream, (kind, key, nbytes) with kind "alloc", "free" or
    "empty_cache"; `blocks` maps the keys alive to their blocks. Returns the block allocated,
    or None. The one replay step of the equation's tests and the simulation."""
    kind, key, nbytes = event[0], event[1], event[2]
    if kind == "alloc":
        blocks[key] = block = allocator.malloc(nbytes)
        return block
    if kind == "free":
        allocator.free(blocks.pop(key))
    else:
        allocator.empty_cache()
    return None


def replay(events, allocator: CachingAllocator | None = None) -> CachingAllocator:
    """Apply every event; returns the allocator (its stats hold the peaks)."""
    allocator = allocator or CachingAllocator()
    blocks: dict = {}
    for ev in events:
        apply(allocator, blocks, ev)
    return allocator
