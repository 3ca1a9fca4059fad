"""The paged KV cache's block allocator with prefix caching (torch-free).

A block holds ``block_size`` consecutive tokens of one sequence. A *full*
block is keyed by a chained hash of its tokens and of every token before it,
so two sequences with the same prefix share the same blocks. Blocks are
reference counted; a cached block that no sequence uses any more stays
reusable until the allocator needs the space, and then the least recently
freed one is evicted first.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from gpu_worker.engine.sequence import Sequence

_NO_PARENT = 0x7E57


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """The prefix-cache key of a full block: its tokens and its parent's key."""
    return hash((parent_hash, token_ids))


class BlockManager:
    """Hands out KV-cache blocks to sequences and shares cached prefixes."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free = deque(range(num_blocks))               # never hashed, or evicted
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but still cached, LRU first
        self._hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0   # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0      # of those, tokens found

    # -- queries -------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by running sequences (0..1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks holding a prefix of ``seq`` (at least one token is left to compute)."""
        if not self.enable_prefix_caching:
            return []
        matched: list[int] = []
        parent = _NO_PARENT
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(parent, tokens)
            block_id = self._hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            matched.append(block_id)
            parent = h
        return matched

    # -- allocation ----------------------------------------------------------
    def allocate(self, seq: Sequence, cached_blocks: list[int], num_new_tokens: int) -> bool:
        """Give a waiting ``seq`` its cached prefix plus room for ``num_new_tokens`` more.

        Returns False, changing nothing, when there is not enough free space.
        """
        assert not seq.block_table
        num_cached_tokens = len(cached_blocks) * self.block_size
        num_needed = self.blocks_for(num_cached_tokens + num_new_tokens) - len(cached_blocks)
        reclaimable = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if num_needed > self.num_free_blocks - reclaimable:
            return False
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._evictable[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(block.hash)
        seq.block_table.extend(self._take_free_block() for _ in range(num_needed))
        seq.num_computed_tokens = num_cached_tokens
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += num_cached_tokens
        return True

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for ``num_new_tokens`` more tokens of a running ``seq``; False if full."""
        num_needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if num_needed > self.num_free_blocks:
            return False
        seq.block_table.extend(self._take_free_block() for _ in range(num_needed))
        return True

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks; cached ones stay reusable, the tail evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                if block.hash is None:
                    self._free.append(block_id)
                else:
                    self._evictable[block_id] = None
        seq.block_table.clear()
        seq.block_hashes.clear()

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks of ``seq`` that became full and computed since the last call."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else _NO_PARENT
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(parent, tokens)
            block = self.blocks[seq.block_table[i]]
            if h not in self._hash_to_block:
                block.hash, block.token_ids = h, tokens
                self._hash_to_block[h] = block.block_id
            seq.block_hashes.append(h)
            parent = h

    def _take_free_block(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self._hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        self.blocks[block_id].ref_count = 1
        return block_id
