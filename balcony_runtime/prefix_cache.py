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

_ROOT = 0
# A (cache layer, node) pair is one int, node << _LAYER_BITS | layer: int keys hash and compare
# about twice as fast as tuples, and a served pool evicts a block per layer of every row that
# crosses into a new block, each step.
_LAYER_BITS = 12
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
        self._node_blocks: dict[int, int] = {}  # node -> how many layers' blocks of it are cached
        self._block_of: dict[int, int] = {}  # (node << _LAYER_BITS | cache layer) -> block id
        # Block id -> its key in _block_of, _NOT_CACHED if none: a list, since block ids are dense and
        # a served pool evicts one block per layer of every row crossing into a new block, each step
        # (a list's item is read and written in a fraction of a dict's pop).
        self._key_of: list[int] = [_NOT_CACHED] * num_blocks
        self._num_cached = 0
        self._next_node = _ROOT + 1

    def __len__(self) -> int:
        """Blocks cached."""
        return self._num_cached

    def is_cached(self, block: int) -> bool:
        return self._key_of[block] != _NOT_CACHED

    def match(self, layers: tuple[int, ...], token_ids: list[int], max_blocks: int) -> PrefixMatch:
        """The leading whole blocks of ``token_ids`` (at most ``max_blocks``) cached in every layer."""
        found = PrefixMatch(blocks=[[] for _ in layers])
        node, size = _ROOT, self.block_size
        for i in range(max_blocks):
            node = self._children.get((node, tuple(token_ids[i * size:(i + 1) * size])))
            if node is None:
                break
            base = node << _LAYER_BITS
            blocks = [self._block_of.get(base | layer) for layer in layers]
            if None in blocks:
                break
            found.nodes.append(node)
            for table, block in zip(found.blocks, blocks):
                table.append(block)
        return found

    def node(self, parent: int, tokens: tuple[int, ...]) -> int:
        """The trie node of the block ``tokens`` after prefix ``parent`` (created if new)."""
        key = (parent, tokens)
        node = self._children.get(key)
        if node is None:
            node = self._children[key] = self._next_node
            self._next_node += 1
            self._node_key[node] = key
            self._node_blocks[node] = 0
        return node

    def register(self, layer: int, node: int, block: int) -> bool:
        """Record that ``block`` holds ``node``'s tokens for ``layer``; False (nothing recorded) if
        another block already does (two requests computed the same prefix at once)."""
        if not 0 <= layer < 1 << _LAYER_BITS:
            raise ValueError(f"cache layer {layer} out of range: at most {1 << _LAYER_BITS} are keyed")
        key = node << _LAYER_BITS | layer
        if key in self._block_of:
            return False
        self._block_of[key] = block
        self._key_of[block] = key
        self._num_cached += 1
        self._node_blocks[node] += 1
        return True

    def forget(self, blocks: list[int]) -> None:
        """Drop cached blocks from the cache (they are being reused for other tokens). Blocks come in
        lists: a decode step evicts a block per cache layer of each row crossing into a new one, and
        those of one node (every layer's copy of one prefix block) come together (BlockManager.free),
        so a node's count is settled once per run of its blocks, not once per block."""
        key_of, block_of = self._key_of, self._block_of
        node, run = _ROOT, 0  # the node of the run of blocks being counted, and its length so far
        for block in blocks:
            key = key_of[block]
            key_of[block] = _NOT_CACHED
            del block_of[key]
            if key >> _LAYER_BITS != node:
                if run:
                    self._release(node, run)
                node, run = key >> _LAYER_BITS, 0
            run += 1
        if run:
            self._release(node, run)
        self._num_cached -= len(blocks)

    def _release(self, node: int, count: int) -> None:
        """``count`` of ``node``'s blocks left the cache; with none left, so does the node."""
        left = self._node_blocks[node] - count
        if left:
            self._node_blocks[node] = left
        else:  # nothing of this prefix is cached any more
            del self._node_blocks[node]
            del self._children[self._node_key.pop(node)]

    @staticmethod
    def root() -> int:
        return _ROOT
