"""The one caching-allocator model (formula/allocator.py), hand-worked from the rules of
c10/cuda/CUDACachingAllocator.cpp: rounding, pools, splitting, best fit, merging, expandable
segments, the release of cached segments, and the OOM path under a capacity."""

from __future__ import annotations

import pytest

from sd_vram.formula.allocator import (CachingAllocator, OutOfMemoryError, format_size, get_allocation_size,
                                       kLargeBuffer, kSmallBuffer, replay, round_size)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def test_round_size_and_segment_sizes():
    assert round_size(1) == 512 and round_size(512) == 512 and round_size(513) == 1024
    assert get_allocation_size(512) == 2 * MiB            # small pool: 2 MiB segment
    assert get_allocation_size(1 * MiB) == 2 * MiB         # 1 MiB is still "small"
    assert get_allocation_size(1 * MiB + 512) == 20 * MiB  # 1-10 MiB: kLargeBuffer
    assert get_allocation_size(10 * MiB) == 10 * MiB       # >= 10 MiB: own segment
    assert get_allocation_size(11 * MiB + 1) == 12 * MiB   # rounded up to 2 MiB


def test_small_requests_share_a_2mib_segment():
    a = CachingAllocator()
    x = a.malloc(100)
    y = a.malloc(700)
    assert (a.allocated, a.reserved) == (512 + 1024, 2 * MiB)
    assert y.ptr == x.ptr + 512                            # split front-to-back
    a.free(x)
    z = a.malloc(200)                                      # best fit: x's 512 B block
    assert z.ptr == x.ptr and a.reserved == 2 * MiB


def test_medium_request_splits_a_20mib_segment():
    a = CachingAllocator()
    a.malloc(int(1.5 * MiB))
    a.malloc(int(1.5 * MiB))
    assert a.reserved == 20 * MiB
    assert a.allocated == 3 * MiB


def test_large_unsplit_remainder_counts_as_allocated():
    a = CachingAllocator()
    a.malloc(int(19.5 * MiB))            # segment 20 MiB; remainder 0.5 MiB <= 1 MiB: no split
    assert a.reserved == 20 * MiB
    assert a.allocated == 20 * MiB


def test_large_split_when_remainder_above_1mib_and_best_fit():
    a = CachingAllocator()
    b = a.malloc(int(18.5 * MiB))        # 20 MiB segment, remainder 1.5 MiB > 1 MiB: split
    assert a.allocated == int(18.5 * MiB)
    c = a.malloc(int(1.2 * MiB))         # fits the 1.5 MiB remainder; 0.3 MiB left: no split
    assert c.ptr == b.ptr + int(18.5 * MiB)
    assert a.allocated == 20 * MiB and a.reserved == 20 * MiB


def test_best_fit_prefers_smallest_cached_block():
    a = CachingAllocator()
    x = a.malloc(12 * MiB)
    y = a.malloc(14 * MiB)
    a.free(x)
    a.free(y)
    z = a.malloc(11 * MiB)               # 12 MiB block fits best; 1 MiB left is not > 1 MiB
    assert z.ptr == x.ptr and z.size == 12 * MiB
    assert a.reserved == 26 * MiB


def test_free_blocks_coalesce():
    a = CachingAllocator()
    blocks = [a.malloc(2 * MiB) for _ in range(3)]   # one 20 MiB segment
    a.free(blocks[0])
    a.free(blocks[1])                                # merges with blocks[0]
    big = a.malloc(4 * MiB)
    assert big.ptr == blocks[0].ptr
    assert a.reserved == 20 * MiB and a.allocated == 6 * MiB


def test_freed_memory_is_cached_not_returned():
    a = CachingAllocator()
    x = a.malloc(100 * MiB)
    a.free(x)
    assert a.allocated == 0 and a.reserved == 100 * MiB
    a.malloc(50 * MiB)                               # reuses the cached segment (split)
    assert a.reserved == 100 * MiB


def test_expandable_segments_map_pages_on_demand():
    a = CachingAllocator(expandable_segments=True, total_memory=80 << 30)
    a.malloc(100)
    assert a.reserved == kSmallBuffer                # one 2 MiB page of the small segment
    a.malloc(int(1.5 * MiB))
    assert a.reserved == kSmallBuffer + kLargeBuffer  # one 20 MiB page of the large segment
    a.malloc(25 * MiB)                               # 18.5 MiB free in the page + 1 new page
    assert a.reserved == kSmallBuffer + 2 * kLargeBuffer
    assert a.allocated == 512 + int(1.5 * MiB) + 25 * MiB
    # without expandable segments the 25 MiB request gets its own 26 MiB segment
    b = CachingAllocator()
    b.malloc(100), b.malloc(int(1.5 * MiB)), b.malloc(25 * MiB)
    assert b.reserved == kSmallBuffer + kLargeBuffer + 26 * MiB


def test_replay_reuses_cached_segments():
    events = [("alloc", 1, 100 * MiB), ("free", 1, 100 * MiB), ("alloc", 2, 10 * MiB),
              ("alloc", 3, 20 * MiB), ("free", 3, 20 * MiB)]
    a = replay(events)
    assert a.stats.peak_allocated == 100 * MiB and a.allocated == 10 * MiB
    assert a.stats.peak_reserved == a.reserved == 100 * MiB   # the 100 MiB segment was reused



def test_empty_cache_releases_whole_free_segments_only():
    a = CachingAllocator()
    x = a.malloc(100 * MiB)                          # own 100 MiB segment
    y = a.malloc(30 * MiB)
    a.free(y)
    z = a.malloc(20 * MiB)                           # splits y's 30 MiB segment (10 MiB left)
    s = a.malloc(100)                                # small pool, 2 MiB
    a.free(x)
    a.empty_cache()
    assert a.reserved == 30 * MiB + 2 * MiB          # x's segment went back to the driver
    a.free(z), a.free(s)
    a.empty_cache()
    assert (a.allocated, a.reserved) == (0, 0)


def test_empty_cache_unmaps_whole_free_pages_of_expandable_segments():
    a = CachingAllocator(expandable_segments=True, total_memory=80 << 30)
    x = a.malloc(50 * MiB)                           # pages 0-2 (60 MiB)
    base = x.ptr
    y = a.malloc(30 * MiB)                           # [50, 80): page 3 more
    assert a.reserved == 80 * MiB
    a.free(x)
    a.empty_cache()                                  # [0, 50) free: pages 0 and 1 only
    assert (a.allocated, a.reserved) == (30 * MiB, 40 * MiB)
    z = a.malloc(45 * MiB)                           # remaps from the lowest unmapped block
    assert a.reserved == 80 * MiB and z.ptr == base
    a.free(y), a.free(z)
    a.empty_cache()
    assert a.reserved == 0




# --------------------------------------------------------------------------------------
# under a capacity: release_cached_blocks, the retry, the OOM (malloc's OOM path)
# --------------------------------------------------------------------------------------

def test_a_full_capacity_releases_cached_segments_and_retries():
    a = CachingAllocator(capacity=100 * MiB)
    a.free(a.malloc(60 * MiB))                       # a cached 60 MiB segment
    y = a.malloc(70 * MiB)                           # 60 + 70 > 100: release the 60, retry
    assert (a.allocated, a.reserved) == (70 * MiB, 70 * MiB)
    assert a.stats.num_alloc_retries == 1 and a.stats.num_ooms == 0
    a.free(y)
    a.malloc(70 * MiB)                               # the cached block fits: no new segment
    assert a.stats.num_alloc_retries == 1


def test_out_of_memory_reports_what_pytorch_prints():
    a = CachingAllocator(capacity=100 * MiB)
    x = a.malloc(30 * MiB)
    a.malloc(50 * MiB)
    a.free(x)
    with pytest.raises(OutOfMemoryError) as info:
        a.malloc(60 * MiB)                           # 50 + 60 > 100 even after releasing x's 30
    e = info.value
    assert (e.requested, e.allocated, e.reserved) == (60 * MiB, 50 * MiB, 50 * MiB)
    assert a.stats.num_ooms == 1 and a.stats.num_alloc_retries == 1
    assert e.message() == (
        "CUDA out of memory. Tried to allocate 60.00 MiB. GPU 0 has a total capacity of 100.00 MiB "
        "of which 50.00 MiB is free. Including non-PyTorch memory, this process has 50.00 MiB memory in use. "
        "Of the allocated memory 50.00 MiB is allocated by PyTorch, and 0 bytes is reserved by PyTorch but "
        "unallocated.")
    # the card's total and the context beside the allocator, as the suite's budgets have them
    # (c10 prints 1 GiB as "1024.00 MiB": it switches to GiB above 2^30 B)
    assert "total capacity of 1024.00 MiB of which 374.00 MiB is free" in e.message(total=GiB, used_outside=600 * MiB)


def test_out_of_memory_names_the_segment_not_the_request():
    a = CachingAllocator(capacity=10 * MiB)
    with pytest.raises(OutOfMemoryError) as info:
        a.malloc(11 * MiB + 1)                       # rounds to 11 MiB + 512: a 12 MiB segment
    assert info.value.requested == 12 * MiB and info.value.size == 11 * MiB + 512


def test_split_segments_are_not_released():
    a = CachingAllocator(capacity=100 * MiB)
    a.free(a.malloc(50 * MiB))
    a.malloc(30 * MiB)                               # splits the 50 MiB segment: 20 MiB free in it
    with pytest.raises(OutOfMemoryError) as info:
        a.malloc(60 * MiB)
    assert (info.value.allocated, info.value.reserved) == (30 * MiB, 50 * MiB)
    assert "and 20.00 MiB is reserved by PyTorch but unallocated" in info.value.message()


def test_expandable_segments_map_up_to_the_capacity():
    a = CachingAllocator(expandable_segments=True, capacity=100 * MiB)
    a.free(a.malloc(50 * MiB))                       # 3 pages mapped (60 MiB), free
    a.malloc(70 * MiB)                               # the free 60 MiB + 1 more page
    assert a.reserved == 80 * MiB
    a.malloc(30 * MiB)                               # 10 MiB left free + 1 page: 100 MiB
    assert a.reserved == 100 * MiB and a.stats.num_alloc_retries == 0
    with pytest.raises(OutOfMemoryError):
        a.malloc(20 * MiB)
    assert a.stats.num_alloc_retries == 1 and a.reserved == 100 * MiB


def test_a_memory_fraction_checks_the_whole_segment_size_first():
    """set_per_process_memory_fraction: alloc_block compares get_allocation_size(size) with the
    allowance before it maps any page, so expandable segments release and retry where a full
    card would still map the one page missing (test above: 80 MiB with no retry)."""
    a = CachingAllocator(expandable_segments=True, capacity=100 * MiB, limit="fraction")
    a.free(a.malloc(50 * MiB))                       # 60 MiB mapped
    a.malloc(70 * MiB)                               # 60 + 70 > 100: unmap, retry, map 80 MiB
    assert a.reserved == 80 * MiB and a.stats.num_alloc_retries == 1
    assert "100.00 MiB allowed; " in OutOfMemoryError(2, 2, 0, 0, 100 * MiB).message(allowed=100 * MiB)


def test_format_size_follows_c10():
    assert [format_size(n) for n in (0, 1024, 1025, MiB, MiB + 1, GiB, 3 * GiB // 2)] == [
        "0 bytes", "1024 bytes", "1.00 KiB", "1024.00 KiB", "1.00 MiB", "1024.00 MiB", "1.50 GiB"]


# --------------------------------------------------------------------------------------
# snapshot / restore: the equation's resident state, pinned
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("expandable", [False, True])
def test_a_restored_state_allocates_as_the_original(expandable):
    import random

    rng = random.Random(7)
    a = CachingAllocator(expandable)
    kept = [a.malloc(rng.choice([300, 700 * KiB, 3 * MiB, 25 * MiB, 70 * MiB])) for _ in range(60)]
    for b in kept[::3]:                              # holes between pinned blocks
        a.free(b)
    b = CachingAllocator.restore(a.snapshot())
    assert (b.allocated, b.reserved, b.free_blocks()) == (a.allocated, a.reserved, a.free_blocks())
    live_a, live_b = [], []
    for _ in range(300):                             # the same stream on both: the same blocks
        if live_a and rng.random() < 0.45:
            i = rng.randrange(len(live_a))
            a.free(live_a.pop(i)), b.free(live_b.pop(i))
        else:
            n = rng.choice([100, 600 * KiB, 2 * MiB, 15 * MiB, 40 * MiB, 130 * MiB])
            x, y = a.malloc(n), b.malloc(n)
            assert (x.ptr, x.size) == (y.ptr, y.size)
            live_a.append(x), live_b.append(y)
        assert (b.allocated, b.reserved) == (a.allocated, a.reserved)


# --------------------------------------------------------------------------------------
# PYTORCH_CUDA_ALLOC_CONF (formula/allocconf.py): parsing as c10 parses it, and each rule
# --------------------------------------------------------------------------------------

from sd_vram.formula.allocconf import AllocConf, AllocConfError, parse  # noqa: E402


def test_alloc_conf_parses_as_pytorch():
    c = parse(" max_split_size_mb:512 , expandable_segments:True,garbage_collection_threshold:0.6")
    assert (c.max_split_size, c.expandable_segments, c.garbage_collection_threshold) == (512 * MiB, True, 0.6)
    assert parse("roundup_power2_divisions:4").roundup_power2_divisions == (4,) * 16
    # the first interval also covers those below it; ">" covers the ones after the last
    assert parse("roundup_power2_divisions:[256:4,512:2,>:1]").roundup_power2_divisions == (4,) * 9 + (2,) + (1,) * 6
    assert parse("release_lock_on_cudamalloc:True").ignored == ("release_lock_on_cudamalloc",)
    assert parse("") == parse(None) == AllocConf()


@pytest.mark.parametrize("text, message", [
    ("foo:1", "Unrecognized CachingAllocator option: foo"),
    ("max_split_size_mb:19", "max_split_size_mb too small, must be >= 20"),
    ("max_non_split_rounding_mb:5", "max_non_split_rounding_mb too small, must be >= 20"),
    ("release_lock_on_cudamalloc:1", "Expected a single True/False argument for release_lock_on_cudamalloc"),
    ("expandable_segments:yes", "Expected a single True/False argument for expandable_segments"),
    ("roundup_power2_divisions:3", "the divisions has to be power of 2"),
    ("roundup_power2_divisions:[300:4]", "the intervals have to be power of 2"),
    ("garbage_collection_threshold:1.0", "must be in (0, 1)"),
    ("backend:cudaMallocAsync", "not modelled"),
    ("max_split_size_mb", "expected ':'"),
])
def test_alloc_conf_refusals(text, message):
    with pytest.raises(AllocConfError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(text)


def test_roundup_power2_divisions_round_to_a_division():
    four = parse("roundup_power2_divisions:4")
    assert round_size(1_363_149, four) == 1_572_864        # 1.3 MiB -> 1.5 MiB (steps of 256 KiB)
    assert round_size(MiB, four) == MiB                    # a power of two stays
    assert round_size(1500, four) == 1536                  # not above 512 x 4: plain 512-B steps
    a = CachingAllocator(conf=four)
    assert a.malloc(1_363_149).size == 1_572_864 == a.allocated   # allocated counts the block


def test_max_split_size_keeps_oversize_blocks_whole():
    conf = parse("max_split_size_mb:100")
    a = CachingAllocator(conf=conf)
    a.free(a.malloc(200 * MiB))
    a.malloc(50 * MiB)                     # a small request never takes an oversize block
    assert a.reserved == 250 * MiB
    b = CachingAllocator()
    b.free(b.malloc(200 * MiB))
    b.malloc(50 * MiB)                     # without the option the cached block is split
    assert b.reserved == 200 * MiB
    c = CachingAllocator(conf=conf)
    c.free(c.malloc(200 * MiB))
    x = c.malloc(190 * MiB)                # within max_non_split_rounding (20 MiB): taken whole
    assert (x.size, c.reserved) == (200 * MiB, 200 * MiB)
    c.free(x)
    c.malloc(150 * MiB)                    # 200 >= 150 + 20: refused, a segment of its own
    assert c.reserved == 350 * MiB


def test_max_split_size_releases_an_oversize_block_before_the_retry():
    a = CachingAllocator(capacity=300 * MiB, conf=parse("max_split_size_mb:100"))
    a.free(a.malloc(200 * MiB))
    a.malloc(150 * MiB)                    # refused the 200, no room: release_available_cached_blocks
    assert a.reserved == 150 * MiB and a.stats.num_alloc_retries == 0


def test_garbage_collection_releases_old_cached_blocks_past_the_threshold():
    conf = parse("garbage_collection_threshold:0.5")
    a = CachingAllocator(capacity=1000 * MiB, conf=conf, limit="fraction")
    x, y = a.malloc(300 * MiB), a.malloc(300 * MiB)
    a.free(x), a.free(y)
    a.malloc(400 * MiB)                    # 600 MiB reserved > 0.5 x 1000: both cached blocks go
    assert a.reserved == 400 * MiB
    b = CachingAllocator(capacity=1000 * MiB, conf=conf)   # a full card, no memory fraction: none
    x, y = b.malloc(300 * MiB), b.malloc(300 * MiB)
    b.free(x), b.free(y)
    b.malloc(400 * MiB)
    assert b.reserved == 1000 * MiB
