"""Paged KV-cache bookkeeping: which cache blocks each request holds, per layer it runs. No torch.

One pool of fixed-size blocks serves every cache layer (backbone layers and balconies alike). A
request served at exit k holds blocks for k backbone layers plus its balcony, not for the whole
depth, so shallow requests cost proportionally less memory and more of them fit.
"""

from __future__ import annotations

from dataclasses import dataclass


class OutOfBlocks(Exception):
    """Raised when an allocation is attempted without the blocks for it (callers check first)."""


@dataclass
class RequestBlocks:
    num_layers: int  # cache layers this request writes
    capacity_tokens: int  # tokens each layer's blocks can hold
    tables: list[list[int]]  # [num_layers][blocks] physical block ids, token order


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() takes low ids first
        self._requests: dict[str, RequestBlocks] = {}

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return self.num_used_blocks / self.num_blocks

    def blocks_per_layer(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, num_layers: int, num_tokens: int) -> int:
        return num_layers * self.blocks_per_layer(num_tokens)

    def can_allocate(self, num_layers: int, num_tokens: int) -> bool:
        return self.blocks_needed(num_layers, num_tokens) <= len(self._free)

    def fits_at_all(self, num_layers: int, num_tokens: int) -> bool:
        """Whether the request could ever run, with the whole pool to itself."""
        return self.blocks_needed(num_layers, num_tokens) <= self.num_blocks

    def has(self, request_id: str) -> bool:
        return request_id in self._requests

    def block_tables(self, request_id: str) -> list[list[int]]:
        return self._requests[request_id].tables

    def capacity(self, request_id: str) -> int:
        return self._requests[request_id].capacity_tokens

    def blocks_to_grow(self, request_id: str, num_tokens: int) -> int:
        held = self._requests[request_id]
        extra = self.blocks_per_layer(num_tokens) - len(held.tables[0]) if held.tables else 0
        return max(0, extra) * held.num_layers

    def can_grow(self, request_id: str, num_tokens: int) -> bool:
        return self.blocks_to_grow(request_id, num_tokens) <= len(self._free)

    # ---- changes ---------------------------------------------------------------------------

    def allocate(self, request_id: str, num_layers: int, num_tokens: int) -> None:
        """Give a new request room for ``num_tokens`` tokens in each of ``num_layers`` layers."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already holds blocks")
        if num_layers < 1:
            raise ValueError("a request runs at least one layer")
        per_layer = self.blocks_per_layer(num_tokens)
        if per_layer * num_layers > len(self._free):
            raise OutOfBlocks(f"{per_layer * num_layers} blocks needed, {len(self._free)} free")
        tables = [[self._free.pop() for _ in range(per_layer)] for _ in range(num_layers)]
        self._requests[request_id] = RequestBlocks(num_layers, per_layer * self.block_size, tables)

    def grow(self, request_id: str, num_tokens: int) -> None:
        """Make room for ``num_tokens`` tokens in total (a no-op when there already is)."""
        held = self._requests[request_id]
        extra = self.blocks_per_layer(num_tokens) - len(held.tables[0])
        if extra <= 0:
            return
        if extra * held.num_layers > len(self._free):
            raise OutOfBlocks(f"{extra * held.num_layers} blocks needed, {len(self._free)} free")
        for table in held.tables:
            table.extend(self._free.pop() for _ in range(extra))
        held.capacity_tokens = len(held.tables[0]) * self.block_size

    def free(self, request_id: str) -> None:
        """Return every block of a finished or aborted request; unknown ids are ignored."""
        held = self._requests.pop(request_id, None)
        if held is None:
            return
        for table in held.tables:
            self._free.extend(reversed(table))
