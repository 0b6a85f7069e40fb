"""A request's outputs on their way from the dispatch of a step to the response that writes them.

asyncio.Queue does more per item than this needs (a count of unfinished tasks, a "finished" Event
cleared on every put, a list of getters, a size check), and every token of every stream passes
through one: with 256 streams that was a seventh of the event loop (docs/benchmarks.md). Here, one
deque and at most one waiter: one reader per request (AsyncEngine.stream), which takes everything
waiting at once. Used on the event loop only.
"""

from __future__ import annotations

import asyncio
from collections import deque


class OutputStream:
    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None  # the reader, while it waits for an item

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # (a reader cancelled meanwhile leaves a cancelled future)
                waiter.set_result(None)

    async def take_all(self) -> list:
        """Every item waiting, in order; waits until there is at least one."""
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        items = list(self._items)
        self._items.clear()
        return items
