"""BlockManager: allocation, reference counts, prefix hits, LRU eviction (no torch, no model)."""
from common.sampling import SamplingParams
from gpu_worker.engine.block_manager import BlockManager
from gpu_worker.engine.sequence import Sequence


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams(temperature=0))


def run_prefill(bm, s):
    cached = bm.match_prefix(s)
    num_cached = len(cached) * bm.block_size
    assert bm.allocate(s, cached, s.num_tokens - num_cached)
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s)
    return num_cached


def test_allocate_takes_enough_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(range(10))
    assert run_prefill(bm, s) == 0
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_shared_prefix_is_reused_and_reference_counted():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(list(range(12)) + [99], "a")
    run_prefill(bm, a)
    b = seq(list(range(12)) + [7, 8], "b")
    assert run_prefill(bm, b) == 12
    assert b.block_table[:3] == a.block_table[:3]
    assert all(bm.blocks[i].ref_count == 2 for i in a.block_table[:3])
    bm.free(a)
    assert all(bm.blocks[i].ref_count == 1 for i in b.block_table[:3])


def test_at_least_one_token_is_always_left_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    run_prefill(bm, seq(range(8), "a"))
    again = seq(range(8), "b")             # identical prompt, exactly two full blocks
    assert run_prefill(bm, again) == 4     # the last block is recomputed so a token can be sampled


def test_freed_cached_blocks_stay_hittable_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = seq([1, 2, 3, 4, 9], "b")
    assert run_prefill(bm, b) == 4         # hit after free
    bm.free(b)
    big = seq(range(100, 108), "big")      # needs all 4 blocks: evicts every cached one
    assert run_prefill(bm, big) == 0
    bm.free(big)
    assert run_prefill(bm, seq([1, 2, 3, 4, 5], "c")) == 0


def test_different_tokens_never_hit():
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, seq([1, 2, 3, 4, 5]))
    assert bm.match_prefix(seq([1, 2, 3, 5, 5])) == []


def test_allocate_fails_without_side_effects_when_full():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(range(9))
    assert not bm.allocate(s, [], 9)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_prefix_caching_can_be_disabled():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    run_prefill(bm, seq(range(9), "a"))
    assert run_prefill(bm, seq(range(9), "b")) == 0
