"""The paged KV cache's memory: one pool of blocks shared by every cache layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from balcony_runtime.config import ModelArch


@dataclass
class KVCache:
    keys: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    values: torch.Tensor  # same shape as keys

    @classmethod
    def allocate(cls, arch: ModelArch, num_blocks: int, block_size: int, dtype, device) -> "KVCache":
        shape = (num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @staticmethod
    def bytes_per_block(arch: ModelArch, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty(0, dtype=dtype).element_size()
        return 2 * block_size * arch.num_kv_heads * arch.head_dim * element

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values
