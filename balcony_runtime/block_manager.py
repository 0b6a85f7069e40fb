"""Paged KV-cache bookkeeping: which cache blocks each request holds, per layer it runs. No torch.

One pool of fixed-size blocks serves every cache layer (backbone layers and balconies alike). A
request served at exit k holds blocks for k backbone layers plus its balcony, not for the whole
depth, so shallow requests cost proportionally less memory and more of them fit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice

from balcony_runtime.prefix_cache import PrefixCache, PrefixMatch


class OutOfBlocks(Exception):
    """Raised when an allocation is attempted without the blocks for it (callers check first)."""


@dataclass(slots=True)
class RequestBlocks:
    num_layers: int  # cache layers this request writes
    capacity_tokens: int  # tokens each layer's blocks can hold
    tables: list[list[int]]  # [num_layers][blocks] physical block ids, token order
    layers: tuple[int, ...] = ()  # the cache layers of the tables, in order (the prefix cache's keys)
    prefix_nodes: list[int] = field(default_factory=list)  # trie node of each leading block cached


class BlockManager:
    """Blocks are reference-counted: a block of a cached prefix may sit in several requests' tables.
    A block nobody holds is free; a free block that still holds a cached prefix stays findable until
    a new allocation needs it, so finished requests' prompts keep serving later ones."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() takes low ids first
        self._refs = [0] * num_blocks  # holders of each block
        self._requests: dict[str, RequestBlocks] = {}
        self.prefix_cache = PrefixCache(block_size, num_blocks) if prefix_caching else None
        # Free blocks still holding a cached prefix, in the order they were let go; a request lets
        # go of its blocks last to first (free()), so a prefix's tail is reused before its head,
        # which more prompts share. An OrderedDict, not a dict: taking the oldest of a plain dict
        # (next(iter(d)) then del) scans past every slot deleted since its last resize, so once a
        # served pool is all cached prefixes, each block taken cost time growing with the pool.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        # Request id -> the blocks it took in the last try_grow_all, layer after layer (a decoding
        # row: one per layer). The runner writes a crossing row's new ids from here: the list was
        # just built, where reading them back out of the row's tables touches one list per layer.
        self.grown: dict[str, list[int]] = {}

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1 (cached prefixes nobody holds count as free)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_per_layer(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, num_layers: int, num_tokens: int) -> int:
        return num_layers * self.blocks_per_layer(num_tokens)

    def can_allocate(self, num_layers: int, num_tokens: int, reuse: PrefixMatch | None = None) -> bool:
        """Whether a new request fits, taking ``reuse``'s cached blocks instead of new ones for its
        leading blocks (those lying free leave the free pool too)."""
        if reuse is None or not reuse.num_blocks:
            return self.blocks_needed(num_layers, num_tokens) <= self.num_free_blocks
        new = num_layers * (self.blocks_per_layer(num_tokens) - reuse.num_blocks)
        idle = sum(1 for table in reuse.blocks for b in table if self._refs[b] == 0)
        return new + idle <= self.num_free_blocks

    def fits_at_all(self, num_layers: int, num_tokens: int) -> bool:
        """Whether the request could ever run, with the whole pool to itself."""
        return self.blocks_needed(num_layers, num_tokens) <= self.num_blocks

    def has(self, request_id: str) -> bool:
        return request_id in self._requests

    def block_tables(self, request_id: str) -> list[list[int]]:
        return self._requests[request_id].tables

    def tables_of(self, request_ids: list[str]) -> list[list[list[int]]]:
        """block_tables of each request, in one call (the runner asks for every row each step)."""
        held = self._requests
        return [held[rid].tables for rid in request_ids]

    def capacity(self, request_id: str) -> int:
        return self._requests[request_id].capacity_tokens

    def cached_prefix(self, layers: tuple[int, ...], token_ids: list[int], num_tokens: int) -> PrefixMatch | None:
        """The leading whole blocks of ``token_ids`` (a request's prompt; it has ``num_tokens`` in
        all) already computed in every one of ``layers``, short of its last token, whose logits the
        request still needs; None without a cache."""
        if self.prefix_cache is None or not layers:
            return None
        limit = min(len(token_ids), num_tokens - 1) // self.block_size
        return self.prefix_cache.match(layers, token_ids, limit)

    # ---- changes ---------------------------------------------------------------------------

    def allocate(self, request_id: str, num_layers: int, num_tokens: int, layers: tuple[int, ...] = (),
                 reuse: PrefixMatch | None = None) -> None:
        """Give a new request room for ``num_tokens`` tokens in each of ``num_layers`` layers, its
        leading blocks taken from ``reuse`` (a match of cached_prefix over the same ``layers``)."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already holds blocks")
        if num_layers < 1:
            raise ValueError("a request runs at least one layer")
        if not self.can_allocate(num_layers, num_tokens, reuse):
            raise OutOfBlocks(f"{self.blocks_needed(num_layers, num_tokens)} blocks needed, "
                              f"{self.num_free_blocks} free")
        per_layer = self.blocks_per_layer(num_tokens)
        shared = reuse.blocks if reuse is not None and reuse.num_blocks else [[] for _ in range(num_layers)]
        for table in shared:
            for block in table:
                self._hold(block)
        tables = [list(table) + self._take(per_layer - len(table)) for table in shared]
        nodes = list(reuse.nodes) if reuse is not None else []
        self._requests[request_id] = RequestBlocks(num_layers, per_layer * self.block_size, tables, layers, nodes)

    def grow(self, request_id: str, num_tokens: int) -> None:
        """Make room for ``num_tokens`` tokens in total (a no-op when there already is)."""
        if not self.try_grow(request_id, num_tokens):
            held = self._requests[request_id]
            needed = (self.blocks_per_layer(num_tokens) - len(held.tables[0])) * held.num_layers
            raise OutOfBlocks(f"{needed} blocks needed, {self.num_free_blocks} free")

    def try_grow(self, request_id: str, num_tokens: int) -> bool:
        """Make room for ``num_tokens`` tokens in total if the free blocks allow; False (nothing
        changed) if they do not (try_grow_all of one row)."""
        return self.try_grow_all([(request_id, num_tokens)])

    def try_grow_all(self, growth: list[tuple[str, int]]) -> bool:
        """Make room for each (request id, tokens in total) in ``growth`` if the free blocks allow
        them all; False (nothing changed) if they do not. The same blocks, in the same tables, as
        try_grow on each in turn would give (one take, in the same order), with one eviction for
        all of them: in a decode step about one row in block_size grows, each by a block per cache
        layer, and per-row takes paid the eviction's fixed costs that many times."""
        grown = self.grown = {}
        held_of, per_layer = self._requests, self.blocks_per_layer
        rows = [(rid, held := held_of[rid], per_layer(tokens) - len(held.tables[0])) for rid, tokens in growth]
        total = sum(extra * held.num_layers for _, held, extra in rows if extra > 0)
        if total > self.num_free_blocks:
            return False
        taken, at = self._take(total), 0
        for rid, held, extra in rows:
            if extra <= 0:
                continue
            count = extra * held.num_layers
            grown[rid] = mine = taken[at:at + count]  # layer after layer, `extra` each
            at += count
            if extra == 1:
                for _ in map(list.append, held.tables, mine):  # (a loop run in C)
                    pass
            else:
                for i, table in enumerate(held.tables):
                    table.extend(mine[i * extra:(i + 1) * extra])
            held.capacity_tokens = len(held.tables[0]) * self.block_size
        return True

    def cache_prefix(self, request_id: str, token_ids: list[int], num_computed: int) -> None:
        """Offer the request's whole blocks among its first ``num_computed`` tokens (computed: their
        keys and values are in the cache) of ``token_ids`` to later requests."""
        cache, held = self.prefix_cache, self._requests.get(request_id)
        if cache is None or held is None or not held.layers:
            return
        size, nodes = self.block_size, held.prefix_nodes
        for i in range(len(nodes), min(num_computed, len(token_ids)) // size):
            node = cache.node(nodes[-1] if nodes else cache.root(), tuple(token_ids[i * size:(i + 1) * size]))
            nodes.append(node)
            for layer, table in zip(held.layers, held.tables):
                cache.register(layer, node, table[i])

    def free(self, request_id: str) -> None:
        """Let go of every block of a finished, aborted or preempted request; unknown ids are ignored."""
        held = self._requests.pop(request_id, None)
        if held is None:
            return
        self.grown.pop(request_id, None)  # (its id may come back, re-allocated after a preemption)
        # Last block first and, for each, every layer's copy together: eviction takes the oldest
        # first, so it removes a prefix's tail in all its layers at once, and the leading blocks
        # stay matchable (a match needs every layer's copy; going layer by layer would evict the
        # first layer's whole prefix before any other layer's, leaving nothing to match).
        refs, cache, evictable, free = self._refs, self.prefix_cache, self._evictable, self._free
        tables = held.tables  # at least one layer (allocate), all the same length
        for i in reversed(range(len(tables[0]))):
            for table in tables:
                block = table[i]
                refs[block] -= 1
                if refs[block] == 0:
                    if cache is not None and cache.is_cached(block):
                        evictable[block] = None
                    else:
                        free.append(block)

    def _hold(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._evictable[block]  # a cached block nobody held: back in use
        self._refs[block] += 1

    def _take(self, count: int) -> list[int]:
        """``count`` blocks for new tokens: plain free ones first (the stack's top; lowest ids first
        in a fresh pool), then the cached blocks let go of longest ago, which leave the prefix cache."""
        free, refs = self._free, self._refs
        plain = min(count, len(free))
        taken = free[len(free) - plain:]
        del free[len(free) - plain:]
        taken.reverse()
        if count > plain:
            evictable = self._evictable
            evicted = list(islice(evictable, count - plain))  # the oldest first
            for _ in map(evictable.pop, evicted):  # a loop run in C: a third faster than a popitem per block
                pass
            self.prefix_cache.forget(evicted)
            taken += evicted
        for block in taken:
            refs[block] = 1
        return taken

