"""Cached blocks that nobody holds, in the order they were let go: a full pool evicts the oldest
first. No torch.

A first-in first-out queue from which a block may also leave out of turn (a later request's prompt
matches its prefix and holds it again). Kept as an append-only array of block ids read from a
moving head, and an array of where each block's live entry sits: leaving out of turn only clears
the block's position, and its stale entry is skipped when the head reaches it. Every operation is a few
whole-array steps, whatever the number of blocks: a request finishing at a long context lets go of
thousands (a block per cache layer per 16 tokens), and a decode step of a served pool evicts one
per cache layer of each row crossing into a new block. An OrderedDict did it a block at a time, and
its insertions alone were most of a long request's release.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

_NOT_QUEUED = -1


class EvictionQueue:
    def __init__(self, num_blocks: int):
        # [capacity] block ids, oldest first, in use up to _end; those before _head are gone. Grown by
        # doubling; when mostly gone entries, the live ones move to the front. int32, as the
        # positions: a pool of millions of blocks (an H200's) keeps up to four entries per block.
        self._entries = np.empty(max(16, num_blocks), dtype=np.int32)
        self._head = self._end = 0
        self._position = np.full(num_blocks, _NOT_QUEUED, dtype=np.int32)  # [num_blocks] each block's live entry's index
        self._len = 0

    def __len__(self) -> int:
        """Blocks queued."""
        return self._len

    def __iter__(self) -> Iterator[int]:
        """The queued blocks, oldest first (for tests and checks)."""
        return iter(self._live().tolist())

    def push(self, blocks: np.ndarray) -> None:
        """Queue ``blocks`` [N] (distinct, none queued), in order: the first is the oldest of them."""
        n = len(blocks)
        if not n:
            return
        if self._end + n > len(self._entries):
            self._make_room(n)
        start = self._end
        self._entries[start:start + n] = blocks
        self._position[blocks] = np.arange(start, start + n)
        self._end += n
        self._len += n

    def remove(self, blocks: np.ndarray) -> None:
        """Take ``blocks`` [N] (distinct, each queued) out of the queue, wherever they are."""
        self._position[blocks] = _NOT_QUEUED
        self._len -= len(blocks)

    def pop_oldest(self, count: int) -> np.ndarray:
        """Take the ``count`` oldest blocks out: [count], oldest first."""
        if count > self._len:
            raise ValueError(f"{count} blocks asked of a queue of {self._len}")
        entries, position, head = self._entries, self._position, self._head
        parts = []
        while count:
            window = entries[head:min(self._end, head + 2 * count + 16)]  # [W] the next entries, a view
            if not len(window):
                raise RuntimeError("the eviction queue lost count of its blocks")
            live = (position[window] == np.arange(head, head + len(window))).nonzero()[0]
            if len(live) >= count:
                live = live[:count]
                head += int(live[-1]) + 1
            else:
                head += len(window)
            parts.append(window[live])
            count -= len(live)
        taken = parts[0] if len(parts) == 1 else np.concatenate(parts)
        position[taken] = _NOT_QUEUED
        self._len -= len(taken)
        self._head = head
        return taken

    def _make_room(self, n: int) -> None:
        """Room for ``n`` more entries at the end: the live ones moved to the front, and the buffer
        doubled while that leaves it more than half full."""
        live = self._live()
        size = len(self._entries)
        while len(live) + n > size // 2:
            size *= 2
        entries = np.empty(size, dtype=np.int32)
        entries[:len(live)] = live
        self._position[live] = np.arange(len(live))  # (every other block's is _NOT_QUEUED)
        self._entries, self._head, self._end = entries, 0, len(live)

    def _live(self) -> np.ndarray:
        """[len(self)] the queued blocks, oldest first."""
        window = self._entries[self._head:self._end]
        return window[self._position[window] == np.arange(self._head, self._end)]
