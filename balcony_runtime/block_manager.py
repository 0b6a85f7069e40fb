"""Paged KV-cache bookkeeping: which cache blocks each request holds, per layer it runs. No torch.

One pool of fixed-size blocks serves every cache layer (backbone layers and balconies alike). A
request served at exit k holds blocks for k backbone layers plus its balcony, not for the whole
depth, so shallow requests cost proportionally less memory and more of them fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from balcony_runtime.eviction_queue import EvictionQueue
from balcony_runtime.prefix_cache import PrefixCache, PrefixMatch


class OutOfBlocks(Exception):
    """Raised when an allocation is attempted without the blocks for it (callers check first)."""


@dataclass(slots=True)
class RequestBlocks:
    num_layers: int  # cache layers this request writes
    capacity_tokens: int  # tokens each layer's blocks can hold
    # [blocks * num_layers] physical block ids, block-major: block i of layer l at i * num_layers + l.
    # One list per request, not one per layer: a decoding row reaching a new block extends it once,
    # where appending to a list per layer touched num_layers lists scattered over the heap, one
    # cache miss after another (docs/benchmarks.md, "A request's blocks in one list").
    blocks: list[int]
    layers: tuple[int, ...] = ()  # the cache layers of the tables, in order (the prefix cache's keys)
    prefix_nodes: list[int] = field(default_factory=list)  # trie node of each leading block cached


class BlockManager:
    """Blocks are reference-counted: a block of a cached prefix may sit in several requests' tables.
    A block nobody holds is free; a free block that still holds a cached prefix stays findable until
    a new allocation needs it, so finished requests' prompts keep serving later ones."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False, evict_ahead: int | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        if evict_ahead is not None and evict_ahead < 0:
            raise ValueError(f"evict_ahead must be >= 0, got {evict_ahead}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # The plain free blocks, a stack in an array: entries [:_num_free], the top last (a take
        # reads the top, low ids first in a fresh pool). An array, not a list: a take hands its
        # ids on as an array (try_take_for) and a free pushes an array, with no conversion between.
        self._free = np.arange(num_blocks - 1, -1, -1, dtype=np.int64)  # [num_blocks]
        self._num_free = num_blocks
        # Holders of each block. An array: a request holds a block per cache layer per 16 tokens
        # (thousands at a long context), and letting go of them all, or taking a step's new ones,
        # is then a few whole-array operations instead of a Python statement per block.
        self._refs = np.zeros(num_blocks, dtype=np.int32)
        self._requests: dict[str, RequestBlocks] = {}
        self.prefix_cache = PrefixCache(block_size, num_blocks) if prefix_caching else None
        # Free blocks still holding a cached prefix, in the order they were let go; a request lets
        # go of its blocks last to first (free()), so a prefix's tail is reused before its head,
        # which more prompts share.
        self._evictable = EvictionQueue(num_blocks)
        # When the plain free blocks run out, at least this many cached ones are evicted at once, the
        # surplus becoming plain free blocks for the next takes. An eviction has fixed costs (a few
        # dozen array operations and a pass over the prefixes it ends) that dwarf its per-block
        # work at a decode step's size (a block per cache layer of each row reaching a new block),
        # and once a server's pool is all cached prompts, every such step evicted. Evicting a
        # batch ahead pays them once per batch; the cost is at most this many cached blocks
        # forgotten somewhat early, the oldest ones, a sixty-fourth of the pool or less.
        self.evict_ahead = min(1024, num_blocks // 64) if evict_ahead is None else evict_ahead

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self._num_free + len(self._evictable)

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
        return self._free_blocks_wanted(num_layers, num_tokens, _shared_blocks(reuse)) <= self.num_free_blocks

    def _free_blocks_wanted(self, num_layers: int, num_tokens: int, shared: np.ndarray | None) -> int:
        """Free blocks a new request takes: new ones past its ``shared`` leading blocks ([layers *
        blocks], a prefix match's), and those of the shared ones lying free."""
        if shared is None:
            return self.blocks_needed(num_layers, num_tokens)
        new = self.blocks_needed(num_layers, num_tokens) - len(shared)
        return new + int(np.count_nonzero(self._refs[shared] == 0))

    def fits_at_all(self, num_layers: int, num_tokens: int) -> bool:
        """Whether the request could ever run, with the whole pool to itself."""
        return self.blocks_needed(num_layers, num_tokens) <= self.num_blocks

    def has(self, request_id: str) -> bool:
        return request_id in self._requests

    def block_tables(self, request_id: str) -> list[list[int]]:
        """A request's blocks, [layers][blocks] (a new list of lists, made from its block-major list)."""
        held = self._requests[request_id]
        return [held.blocks[layer::held.num_layers] for layer in range(held.num_layers)]

    def tables_of(self, request_ids: list[str]) -> list[list[int]]:
        """Each request's block-major list of blocks (RequestBlocks.blocks: the manager's own lists,
        extended in place as a request grows, a new one when it is allocated again), in one call
        (the runner asks for every row each step)."""
        held = self._requests
        return [held[rid].blocks for rid in request_ids]

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
        shared_blocks = _shared_blocks(reuse)  # [layers * blocks]
        if self._free_blocks_wanted(num_layers, num_tokens, shared_blocks) > self.num_free_blocks:
            raise OutOfBlocks(f"{self.blocks_needed(num_layers, num_tokens)} blocks needed, "
                              f"{self.num_free_blocks} free")
        per_layer = self.blocks_per_layer(num_tokens)
        if shared_blocks is not None:
            shared = reuse.blocks
            self._hold(shared_blocks)
        else:
            shared = [[] for _ in range(num_layers)]
        extra = per_layer - len(shared[0])  # the same in every layer
        taken = self._take(extra * num_layers)  # one take, layer after layer (as a take per layer gave)
        blocks = _block_major(shared, num_layers) + _block_major(taken, num_layers)
        nodes = list(reuse.nodes) if reuse is not None else []
        self._requests[request_id] = RequestBlocks(num_layers, per_layer * self.block_size, blocks, layers, nodes)

    def grow(self, request_id: str, num_tokens: int) -> None:
        """Make room for ``num_tokens`` tokens in total (a no-op when there already is)."""
        if not self.try_grow(request_id, num_tokens):
            held = self._requests[request_id]
            needed = (self.blocks_per_layer(num_tokens) - held.capacity_tokens // self.block_size) * held.num_layers
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
        return self.try_take_for(growth) is not None

    def try_take_for(self, growth: list[tuple[str, int]]) -> np.ndarray | None:
        """try_grow_all, giving the blocks it took ([N] int64: for each row in ``growth``'s order,
        its new blocks layer after layer), or None (nothing changed) if the pool cannot give them
        all. A steady decode hands them on to the batch's tables as they are (scheduler.GrownBlocks)."""
        held_of, size = self._requests, self.block_size
        rows = [(rid, held := held_of[rid], -(-tokens // size) - held.capacity_tokens // size)
                for rid, tokens in growth]  # (request id, its blocks, new blocks per layer)
        total = sum(extra * held.num_layers for _, held, extra in rows if extra > 0)
        if total > self.num_free_blocks:
            return None
        taken = self._take(total)
        listed, at = taken.tolist(), 0
        for rid, held, extra in rows:
            if extra <= 0:
                continue
            count = extra * held.num_layers
            mine = listed[at:at + count]  # layer after layer, `extra` each
            at += count
            held.blocks += mine if extra == 1 else _block_major(mine, held.num_layers)  # (one block: one id per layer)
            held.capacity_tokens += extra * size
        return taken

    def cache_prefix(self, request_id: str, token_ids: list[int], num_computed: int) -> None:
        """Offer the request's whole blocks among its first ``num_computed`` tokens (computed: their
        keys and values are in the cache) of ``token_ids`` to later requests."""
        cache, held = self.prefix_cache, self._requests.get(request_id)
        if cache is None or held is None or not held.layers:
            return
        size, nodes = self.block_size, held.prefix_nodes
        first, end = len(nodes), min(num_computed, len(token_ids)) // size
        if end <= first:
            return
        for i in range(first, end):
            nodes.append(cache.node(nodes[-1] if nodes else cache.root(), tuple(token_ids[i * size:(i + 1) * size])))
        # [end - first][layers]: every layer's block i, for each block newly computed
        n, blocks = held.num_layers, held.blocks
        cache.register(nodes[first:], held.layers, [blocks[i * n:(i + 1) * n] for i in range(first, end)])

    def free(self, request_id: str) -> None:
        """Let go of every block of a finished, aborted or preempted request; unknown ids are ignored."""
        held = self._requests.pop(request_id, None)
        if held is None:
            return
        # Last block first and, for each, every layer's copy together: eviction takes the oldest
        # first, so it removes a prefix's tail in all its layers at once, and the leading blocks
        # stay matchable (a match needs every layer's copy; going layer by layer would evict the
        # first layer's whole prefix before any other layer's, leaving nothing to match).
        # [layers * blocks] in that order: block i of every layer, for i from the last. (A request
        # never holds a block twice, so one indexed decrement counts each once.)
        order = np.array(held.blocks, dtype=np.int64).reshape(-1, held.num_layers)[::-1].ravel()
        left = self._refs[order] - 1  # [layers * blocks] holders after this request
        self._refs[order] = left
        released = order[left == 0]  # nobody holds them now, in the same order
        if self.prefix_cache is not None:
            cached = self.prefix_cache.cached_mask(released)
            self._evictable.push(released[cached])
            released = released[~cached]
        self._push_free(released)

    def _hold(self, blocks: np.ndarray) -> None:
        """One more holder for each of ``blocks`` (distinct); the cached blocks nobody held leave
        the evictable ones, back in use."""
        refs = self._refs
        self._evictable.remove(blocks[refs[blocks] == 0])
        refs[blocks] += 1

    def _take(self, count: int) -> np.ndarray:
        """``count`` blocks for new tokens ([count] int64): plain free ones first (the stack's top;
        lowest ids first in a fresh pool), then the cached blocks let go of longest ago, which leave
        the prefix cache (at least evict_ahead of them, the surplus joining the plain free ones)."""
        num_free = self._num_free
        plain = min(count, num_free)
        taken = self._free[num_free - plain:num_free][::-1].copy()  # [plain] the top first
        self._num_free = num_free - plain
        if plain:
            self._refs[taken] = 1
        if count > plain:
            wanted = count - plain
            queue = self._evictable
            evicted = queue.pop_oldest(min(len(queue), max(wanted, self.evict_ahead)))  # [>= wanted], oldest first
            self.prefix_cache.forget(evicted)
            used, surplus = evicted[:wanted], evicted[wanted:]
            self._refs[used] = 1
            taken = np.concatenate((taken, used)) if plain else used.astype(np.int64, copy=False)
            if len(surplus):  # plain free now, the oldest on top of the stack (taken first)
                self._push_free(surplus[::-1])
        return taken

    def _push_free(self, blocks: np.ndarray) -> None:
        """Put ``blocks`` on the free stack, the last on top (a block is free at most once, so the
        stack never outgrows the pool)."""
        num_free = self._num_free
        self._free[num_free:num_free + len(blocks)] = blocks
        self._num_free = num_free + len(blocks)


def _shared_blocks(reuse: PrefixMatch | None) -> np.ndarray | None:
    """A prefix match's block ids, layer after layer, as one array; None without a match."""
    if reuse is None or not reuse.num_blocks:
        return None
    return np.fromiter(chain.from_iterable(reuse.blocks), dtype=np.int64)


def _block_major(layer_major, num_layers: int) -> list[int]:
    """Blocks given layer after layer ([layers][blocks] lists, or one flat list in that order) as
    one block-major list: block i of layer l at i * num_layers + l."""
    ids = np.array(layer_major, dtype=np.int64).reshape(num_layers, -1)  # [layers, blocks]
    return ids.T.ravel().tolist()
