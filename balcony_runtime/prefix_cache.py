"""Which cache blocks hold the keys and values of which token prefix, per cache layer. No torch.

A block that a request has filled with prompt tokens holds, for its cache layer, keys and values that
depend only on the tokens up to the block's end (and on the layers below, which every request of the
same exit shares). Another request whose prompt starts with the same blocks of tokens can read them
instead of computing them: the n choices of one request, or requests that share a system prompt.

Prefixes are nodes of a trie keyed by (parent node, the block's tokens), so a match is exact: no
hash can make two different prefixes collide. A node is kept while some layer's block of it is
cached. Blocks are registered only once their tokens are computed, and a request reuses only whole
blocks, so a shared block is never written again: no copy-on-write is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_ROOT = 0
# A block's key, node << _LAYER_BITS | layer: which node's tokens it holds, at which cache layer, in
# one int (an array of them tells a finished request's cached blocks from the rest at once).
_LAYER_BITS = 12
_LAYER_MASK = (1 << _LAYER_BITS) - 1
_NOT_CACHED = -1


@dataclass
class PrefixMatch:
    nodes: list[int] = field(default_factory=list)  # trie node of each leading block matched
    blocks: list[list[int]] = field(default_factory=list)  # [layers][len(nodes)] cached block ids

    @property
    def num_blocks(self) -> int:
        return len(self.nodes)


class PrefixCache:
    def __init__(self, block_size: int, num_blocks: int):
        self.block_size = block_size
        self._children: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent, block tokens) -> node
        self._node_key: dict[int, tuple[int, tuple[int, ...]]] = {}  # node -> its key in _children
        # Node -> {cache layer: the block holding the node's tokens there}. Per node, not one map
        # keyed by (node, layer): a served pool evicts a block per layer of every row crossing into
        # a new block each step, a node's layers together: they leave one small map (or the whole
        # map goes, when it was the node's last), instead of as many scattered entries of a map as
        # large as the pool, each a cache miss.
        self._layers: dict[int, dict[int, int]] = {}
        # Block id -> its key (node << _LAYER_BITS | layer), _NOT_CACHED if none: an array, since
        # block ids are dense and a finished request's blocks (thousands at a long context) are told
        # apart, cached or not, all at once (cached_mask).
        self._key_of = np.full(num_blocks, _NOT_CACHED, dtype=np.int64)
        self._num_cached = 0
        self._next_node = _ROOT + 1

    def __len__(self) -> int:
        """Blocks cached."""
        return self._num_cached

    def is_cached(self, block: int) -> bool:
        return bool(self._key_of[block] != _NOT_CACHED)

    def cached_mask(self, blocks: np.ndarray) -> np.ndarray:
        """[N] bool: which of ``blocks`` [N] are cached."""
        return self._key_of[blocks] != _NOT_CACHED

    def match(self, layers: tuple[int, ...], token_ids: list[int], max_blocks: int) -> PrefixMatch:
        """The leading whole blocks of ``token_ids`` (at most ``max_blocks``) cached in every layer."""
        nodes: list[int] = []
        rows: list[list[int | None]] = []  # each matched node's block at every layer
        node, size, children, held_of = _ROOT, self.block_size, self._children, self._layers
        for i in range(max_blocks):
            node = children.get((node, tuple(token_ids[i * size:(i + 1) * size])))
            if node is None:
                break
            blocks = list(map(held_of[node].get, layers))
            if None in blocks:
                break
            nodes.append(node)
            rows.append(blocks)
        # [layers][nodes], transposed once (a long shared prompt matches hundreds of blocks)
        return PrefixMatch(nodes, [list(t) for t in zip(*rows)] if rows else [[] for _ in layers])

    def node(self, parent: int, tokens: tuple[int, ...]) -> int:
        """The trie node of the block ``tokens`` after prefix ``parent`` (created if new)."""
        key = (parent, tokens)
        node = self._children.get(key)
        if node is None:
            node = self._children[key] = self._next_node
            self._next_node += 1
            self._node_key[node] = key
            self._layers[node] = {}
        return node

    def register(self, nodes: list[int], layers: tuple[int, ...], blocks: list[list[int]]) -> int:
        """Record that ``blocks[i][j]`` holds ``nodes[i]``'s tokens for cache layer ``layers[j]``,
        for each whose copy is not known yet (two requests may compute the same prefix at once: the
        first one's copy stays); returns how many were recorded. A request's prompt registers its
        computed blocks together (thousands at a long context): one write of their keys."""
        if layers and not 0 <= min(layers) <= max(layers) <= _LAYER_MASK:
            raise ValueError(f"cache layers {layers} out of range: at most {1 << _LAYER_BITS} are keyed")
        fresh: list[int] = []  # nodes nobody computed before (the usual case): every layer's copy is new
        new_blocks: list[int] = []  # those of the others' layers not known yet, with their keys
        new_keys: list[int] = []
        for i, (node, row) in enumerate(zip(nodes, blocks)):
            held = self._layers[node]
            if not held:
                held.update(zip(layers, row))
                fresh.append(i)
                continue
            for layer, block in zip(layers, row):
                if layer not in held:
                    held[layer] = block
                    new_blocks.append(block)
                    new_keys.append(node << _LAYER_BITS | layer)
        key_of = self._key_of
        if fresh:
            fresh_nodes = np.array([nodes[i] for i in fresh], dtype=np.int64)
            fresh_blocks = np.array([blocks[i] for i in fresh], dtype=np.int64)  # [F, layers]
            key_of[fresh_blocks] = (fresh_nodes[:, None] << _LAYER_BITS) | np.array(layers, dtype=np.int64)[None, :]
        if new_blocks:
            key_of[new_blocks] = new_keys
        count = len(fresh) * len(layers) + len(new_blocks)
        self._num_cached += count
        return count

    def forget(self, blocks: np.ndarray) -> None:
        """Drop cached blocks from the cache (they are being reused for other tokens). Blocks come in
        lists: a decode step evicts a block per cache layer of each row crossing into a new one, and
        those of one node (every layer's copy of one prefix block) come together (BlockManager.free),
        so each run of one node's blocks is settled with one look-up of the node."""
        if not len(blocks):
            return
        key_of = self._key_of
        keys = key_of[blocks]  # [N]
        key_of[blocks] = _NOT_CACHED
        nodes = keys >> _LAYER_BITS  # [N]
        cuts = ((nodes[1:] != nodes[:-1]).nonzero()[0] + 1).tolist()  # where each run of one node starts
        starts = [0, *cuts]
        layers = keys & _LAYER_MASK  # [N]
        for node, start, end in zip(nodes[starts].tolist(), starts, [*cuts, len(keys)]):
            held = self._layers[node]
            if end - start == len(held):  # every layer's copy goes (the usual run): so does the node
                self._drop(node)
            else:
                for _ in map(held.pop, layers[start:end].tolist()):  # (a loop run in C)
                    pass
                if not held:
                    self._drop(node)
        self._num_cached -= len(keys)

    def _drop(self, node: int) -> None:
        """Nothing of this prefix is cached any more: the node leaves the trie."""
        del self._layers[node]
        del self._children[self._node_key.pop(node)]

    @staticmethod
    def root() -> int:
        return _ROOT
