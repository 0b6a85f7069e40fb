"""What one forward step over the paged cache needs: the runner builds it, the model reads it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForwardBatch:
    """Tokens of several requests, flattened, with rows ordered by exit, deepest first.

    Row ``b`` owns tokens ``cu_query_lens[b]:cu_query_lens[b+1]``. Ordering rows deepest first makes
    the rows that still run at any layer a prefix of the batch, so a layer slices instead of gathers.
    """

    input_ids: torch.Tensor  # [T] token ids
    positions: torch.Tensor  # [T] absolute position of each token
    exits: list[int]  # [B] exit of each row (num_layers = full depth), non-increasing
    query_lens: list[int]  # [B] tokens of each row in this step
    cu_query_lens: torch.Tensor  # [B + 1] int32 token offsets of the rows
    context_lens: torch.Tensor  # [B] int32 tokens in each row's cache once this step is written
    block_tables: torch.Tensor  # [num_cache_layers, B, max_blocks] int32 (unused entries 0)
    slot_mapping: torch.Tensor  # [num_cache_layers, T] int64 cache slot of each token at each layer
    logits_indices: list[int]  # ascending token indices whose logits the caller wants
    is_decode: bool  # every row has exactly one token: the decode kernel applies
    max_query_len: int  # longest row in this step
    max_context_len: int  # longest of context_lens, on the host

    # cu_query_lens on the host, computed once: the model reads it at every layer.
    _cu_host: list[int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def cu_query_lens_host(self) -> list[int]:
        if self._cu_host is None:
            offsets = [0]
            for n in self.query_lens:
                offsets.append(offsets[-1] + n)
            self._cu_host = offsets
        return self._cu_host
