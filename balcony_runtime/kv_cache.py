"""The paged KV cache's memory: one pool of blocks shared by every cache layer."""

from __future__ import annotations

import math
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
        return cls(_zeros(shape, dtype, torch.device(device)), _zeros(shape, dtype, torch.device(device)))

    @staticmethod
    def bytes_per_block(arch: ModelArch, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty(0, dtype=dtype).element_size()
        return 2 * block_size * arch.num_kv_heads * arch.head_dim * element

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled pool. On a CPU the bytes come from calloc (numpy.zeros), which for a large
    request maps fresh pages the kernel zeroes on first touch: a pool of gigabytes costs nothing at
    start-up and only the blocks in use take memory, where torch.zeros writes every byte up front
    (seconds per pool). Zeros, not garbage: attention reads whole blocks and masks the tail, and a
    masked NaN still poisons a weighted sum."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy

    count = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.from_numpy(numpy.zeros(count, dtype=numpy.uint8)).view(dtype).view(shape)
