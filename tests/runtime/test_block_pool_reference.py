"""The block manager against a plain restatement of its rules, one block at a time: the same blocks
in the same tables, the same prefixes matched, the same blocks evicted, in the same order, under
random admissions (with shared prompt heads), growth and frees.

The reference is written for clarity, not speed: reference counts in a list, the cached blocks
nobody holds in an OrderedDict (oldest let go first), a request's blocks let go of last block
first with every layer's copy together, and a trie of prompt blocks with a registry keyed by
(node, layer), a node leaving the trie with its last cached block."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from balcony_runtime.block_manager import BlockManager


class ReferencePool:
    def __init__(self, num_blocks: int, block_size: int, evict_ahead: int):
        self.block_size = block_size
        self.evict_ahead = evict_ahead  # when the free blocks run out, evict at least this many at once
        self.free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest ids on top
        self.refs = [0] * num_blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.tables: dict[str, list[list[int]]] = {}
        self.layers: dict[str, tuple[int, ...]] = {}
        self.nodes_of: dict[str, list[int]] = {}  # request id -> the trie nodes of its leading blocks
        # The trie: (parent node, a block's tokens) -> node; a node leaves it when none of its
        # layers' blocks is cached any more (later blocks below it are then never matched again).
        self.children: dict[tuple[int, tuple[int, ...]], int] = {}
        self.node_key: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.next_node = 1
        self.cached: dict[tuple[int, int], int] = {}  # (node, layer) -> block
        self.key_of: dict[int, tuple[int, int]] = {}  # block -> its key in cached

    def take(self, count: int) -> list[int]:
        taken = []
        for i in range(count):
            if not self.free:  # evict the oldest cached blocks nobody holds, this take's rest or more
                evicted = []
                while self.evictable and len(evicted) < max(count - i, self.evict_ahead):
                    block, _ = self.evictable.popitem(last=False)
                    node, layer = self.key_of.pop(block)
                    del self.cached[(node, layer)]
                    if not any(n == node for n, _ in self.cached):
                        del self.children[self.node_key.pop(node)]
                    evicted.append(block)
                self.free = evicted[::-1]  # the oldest taken first
            block = self.free.pop()
            self.refs[block] = 1
            taken.append(block)
        return taken

    def match(self, layers: tuple[int, ...], tokens: list[int]) -> tuple[list[int], list[list[int]]]:
        """The nodes and [layers][blocks] of the cached leading blocks, short of the last token."""
        nodes, found, node = [], [[] for _ in layers], 0
        for i in range((len(tokens) - 1) // self.block_size):
            node = self.children.get((node, tuple(tokens[i * self.block_size:(i + 1) * self.block_size])))
            if node is None:
                break
            blocks = [self.cached.get((node, layer)) for layer in layers]
            if None in blocks:
                break
            nodes.append(node)
            for table, block in zip(found, blocks):
                table.append(block)
        return nodes, found

    def allocate(self, rid: str, layers: tuple[int, ...], tokens: list[int]) -> None:
        nodes, shared = self.match(layers, tokens)
        for table in shared:
            for block in table:
                if self.refs[block] == 0:
                    del self.evictable[block]
                self.refs[block] += 1
        extra = -(-len(tokens) // self.block_size) - len(shared[0])
        taken = self.take(extra * len(layers))  # one take for all its layers, layer after layer
        self.tables[rid] = [table + taken[i * extra:(i + 1) * extra] for i, table in enumerate(shared)]
        self.layers[rid] = layers
        self.nodes_of[rid] = nodes

    def cache_prefix(self, rid: str, tokens: list[int]) -> None:
        nodes = self.nodes_of[rid]
        for i in range(len(nodes), len(tokens) // self.block_size):
            key = (nodes[-1] if nodes else 0, tuple(tokens[i * self.block_size:(i + 1) * self.block_size]))
            if key not in self.children:
                self.children[key], self.node_key[self.next_node] = self.next_node, key
                self.next_node += 1
            nodes.append(self.children[key])
            for layer, table in zip(self.layers[rid], self.tables[rid]):
                if (nodes[-1], layer) not in self.cached:
                    self.cached[(nodes[-1], layer)] = table[i]
                    self.key_of[table[i]] = (nodes[-1], layer)

    def grow_all(self, growth: list[tuple[str, int]]) -> None:
        """One take for every (request, tokens) in ``growth``, request after request, each layer
        after layer."""
        extras = [max(0, -(-n // self.block_size) - len(self.tables[rid][0])) for rid, n in growth]
        taken = self.take(sum(extra * len(self.tables[rid]) for (rid, _), extra in zip(growth, extras)))
        for (rid, _), extra in zip(growth, extras):
            for table in self.tables[rid]:
                table += taken[:extra]
                del taken[:extra]

    def release(self, rid: str) -> None:
        tables = self.tables.pop(rid)
        for i in reversed(range(len(tables[0]))):
            for table in tables:
                block = table[i]
                self.refs[block] -= 1
                if self.refs[block] == 0:
                    if block in self.key_of:
                        self.evictable[block] = None
                    else:
                        self.free.append(block)


@pytest.mark.parametrize("seed, evict_ahead", [(0, None), (1, 0), (2, 40), (3, None)])
def test_the_pool_does_what_the_plain_reference_does(seed, evict_ahead):
    rng = random.Random(seed)
    size, num_blocks = 4, 600
    pool = BlockManager(num_blocks, size, prefix_caching=True, evict_ahead=evict_ahead)  # None: its default
    reference = ReferencePool(num_blocks, size, pool.evict_ahead)
    heads = [[rng.randrange(4) for _ in range(rng.randint(4, 40))] for _ in range(5)]  # shared prompt heads
    layer_sets = [(0, 1, 2), (0, 1, 2, 7), (0, 1, 2, 3, 4, 5)]
    live: dict[str, int] = {}  # request id -> tokens
    shared_reads = evictions = 0
    for step in range(2500):
        op = rng.random()
        if op < 0.35:
            prompt = rng.choice(heads) + [rng.randrange(4) for _ in range(rng.randint(1, 30))]
            layers = rng.choice(layer_sets)
            match = pool.cached_prefix(layers, prompt, len(prompt))
            assert match.blocks == reference.match(layers, prompt)[1]
            if pool.can_allocate(len(layers), len(prompt), match):
                rid = f"r{step}"
                cached_before = len(reference.cached)
                pool.allocate(rid, len(layers), len(prompt), layers, match)
                reference.allocate(rid, layers, prompt)
                pool.cache_prefix(rid, prompt, len(prompt))
                reference.cache_prefix(rid, prompt)
                live[rid] = len(prompt)
                shared_reads += match.num_blocks > 0
                evictions += len(reference.cached) < cached_before
        elif op < 0.75 and live:
            growth = [(rid, live[rid] + rng.randint(0, 9)) for rid in rng.sample(sorted(live), min(len(live), 5))]
            needed = sum(len(reference.tables[rid]) * max(0, -(-n // size) - len(reference.tables[rid][0]))
                         for rid, n in growth)
            if needed <= pool.num_free_blocks:
                assert pool.try_grow_all(growth)
                reference.grow_all(growth)
                live.update(growth)
            else:
                assert not pool.try_grow_all(growth)
        elif live:
            rid = rng.choice(sorted(live))
            pool.free(rid)
            reference.release(rid)
            del live[rid]
        assert {rid: pool.block_tables(rid) for rid in live} == reference.tables
        assert list(pool._evictable) == list(reference.evictable)
        assert pool.num_free_blocks == len(reference.free) + len(reference.evictable)
        assert len(pool.prefix_cache) == len(reference.cached)
        assert [int(r) for r in pool._refs] == reference.refs
    assert shared_reads > 50 and evictions > 20  # prompts did read shared heads, and the pool did evict
