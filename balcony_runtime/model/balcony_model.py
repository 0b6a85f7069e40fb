"""The frozen LLaMA backbone with balconies, and one forward to any mix of exits.

Forward over a :class:`ForwardBatch` (rows ordered deepest exit first):

    h = embed(tokens)
    for layer l: run it on the rows whose exit is deeper than l (a prefix of the batch)
        after layer k-1, rows exiting at k run balcony k and its norm
    rows at full depth: the final norm
    every wanted token of every exit: the shared head, once

so a step costs what its rows' depths cost, not the deepest depth times the batch.
"""

from __future__ import annotations

from bisect import bisect_left
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from balcony_runtime.config import ModelArch
from balcony_runtime.model.balcony import Balcony
from balcony_runtime.model.decoder_layer import Attend, DecoderLayer
from balcony_runtime.model.forward_batch import ForwardBatch
from balcony_runtime.model.packed_weights import FORMATS, linear, packer
from balcony_runtime.staging import to_device
from kernels import KernelOps


class BalconyModel(nn.Module):
    def __init__(
        self,
        arch: ModelArch,
        exits: Sequence[int],
        inv_freq: torch.Tensor,
        attention_scaling: float,
        dtype: torch.dtype,
        device: torch.device | str,
        ops: KernelOps,
        max_positions: int | None = None,
        balcony_widths: dict[int, int] | None = None,
    ):
        """``balcony_widths``: MLP hidden units per exit where a balcony's differ from the backbone's."""
        super().__init__()
        self.arch, self.ops, self.dtype = arch, ops, dtype
        self.exits = tuple(sorted(set(exits)))  # balcony exits, shallow to deep
        factory = dict(dtype=dtype, device=device)
        self.embed_tokens = nn.Parameter(torch.empty(arch.vocab_size, arch.hidden_size, **factory))
        self.layers = nn.ModuleList(DecoderLayer(arch, dtype, device) for _ in range(arch.num_layers))
        self.norm = nn.Parameter(torch.ones(arch.hidden_size, **factory))
        self.lm_head = (
            self.embed_tokens
            if arch.tie_word_embeddings
            else nn.Parameter(torch.empty(arch.vocab_size, arch.hidden_size, **factory))
        )
        widths = balcony_widths or {}
        self.balconies = nn.ModuleDict({str(k): Balcony(arch, k, dtype, device, widths.get(k)) for k in self.exits})
        self.scale = arch.head_dim**-0.5

        positions = torch.arange(max_positions or arch.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.float().cpu())  # [P, D/2]
        self.register_buffer("rope_cos", (freqs.cos() * attention_scaling).to(device), persistent=False)
        self.register_buffer("rope_sin", (freqs.sin() * attention_scaling).to(device), persistent=False)

    # ---- structure -------------------------------------------------------------------------

    @property
    def full_depth(self) -> int:
        return self.arch.num_layers

    @property
    def num_cache_layers(self) -> int:
        """Backbone layers, then one cache layer per balcony."""
        return self.arch.num_layers + len(self.exits)

    def cache_layers_of(self, exit_layer: int) -> list[int]:
        """Cache layers a request served at ``exit_layer`` writes, in the block manager's order."""
        if exit_layer == self.full_depth:
            return list(range(self.full_depth))
        return list(range(exit_layer)) + [self.full_depth + self.exits.index(exit_layer)]

    def backbone_parameters(self):
        yield self.embed_tokens
        yield self.norm
        if isinstance(self.lm_head, nn.Parameter) and self.lm_head is not self.embed_tokens:
            yield self.lm_head
        for layer in self.layers:
            yield from layer.parameters()

    def freeze_backbone(self) -> None:
        for p in self.backbone_parameters():
            p.requires_grad_(False)

    @property
    def quantization(self) -> str:
        """The matrices' format: "none" (the model's dtype) or a key of packed_weights.FORMATS."""
        for name, cls in FORMATS.items():
            if isinstance(self.lm_head, cls):
                return name
        return "none"

    @torch.no_grad()
    def pack_weights(self, fmt: str, bf16_from_rows: int | None = None) -> None:
        """Every matrix a step reads in a packed CPU format: backbone layers, balcony layers and the
        head (a separate packed copy when tied: the embedding lookup keeps its float rows). Norms,
        lenses (one [H, H] map per exit) and the KV cache keep the model's dtype. Inference only.
        ``bf16_from_rows``: where the fp16+bf16 format switches (measured by weight_format.py)."""
        if self.quantization != "none":
            raise RuntimeError(f"weights are already packed as {self.quantization}")
        # Packing converts element by element in one thread per matrix (seconds of every start for
        # the default model): every matrix goes to one pool of the torch thread count, the head
        # (the largest) first so it does not run alone at the end.
        layers = [*self.layers, *(b.layer for b in self.balconies.values())]
        weights = [self.lm_head] + [getattr(layer, name) for layer in layers for name in DecoderLayer.MATRICES]
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            head, *packed = pool.map(packer(fmt, bf16_from_rows, self.ops.native), weights)
        per_layer = len(DecoderLayer.MATRICES)
        for i, layer in enumerate(layers):
            layer.pack_weights(fmt, packed[i * per_layer:(i + 1) * per_layer])
        del self.lm_head  # unregisters the name only; a tied embedding stays a parameter
        object.__setattr__(self, "lm_head", head)

    # ---- forward ---------------------------------------------------------------------------

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """An exit's final norm (the backbone's or a balcony's) over hidden + residual: [N, H]."""
        normed, _ = self.ops.rms_norm(hidden, norm, self.arch.rms_norm_eps, residual)
        return normed

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """The shared LM head: normed [N, H] -> fp32 logits [N, V]."""
        return linear(normed, self.lm_head).float()

    def _paged_attend(
        self, batch: ForwardBatch, cache_layer: int, rows: slice, kv_cache: tuple[torch.Tensor, torch.Tensor],
        tables=None,
    ) -> Attend:
        """Attention of ``rows`` (a contiguous range) at one cache layer of the paged KV cache;
        ``tables``: the step's shared decode work (ops.decode_tables), when the ops have it."""
        k_cache, v_cache = kv_cache
        offsets = batch.cu_query_lens_host
        tokens = slice(offsets[rows.start], offsets[rows.stop])
        block_tables = batch.block_tables[cache_layer, rows]  # [b, max_blocks]
        ops = self.ops

        if tables is not None:
            slots, scale = batch.slot_mapping[cache_layer, tokens], self.scale
            rows_tables = tables.rows(rows.start, rows.stop)
            return lambda q, k, v: ops.decode_attend(q, k, v, rows_tables, slots, block_tables, scale)
        context_lens = batch.context_lens[rows]  # [b]
        if batch.is_decode:
            return self.decode_attend(batch.positions[tokens], batch.slot_mapping[cache_layer, tokens],
                                      block_tables, context_lens, kv_cache)
        max_query_len = max(batch.query_lens[rows])

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, _ = ops.rotary_and_cache(
                q, k, v, self.rope_cos, self.rope_sin, batch.positions[tokens],
                k_cache, v_cache, batch.slot_mapping[cache_layer, tokens],
            )
            cu = batch.cu_query_lens[rows.start : rows.stop + 1] - offsets[rows.start]  # [b + 1]
            return ops.prefill_attention(
                q, k_cache, v_cache, block_tables, cu, context_lens, self.scale, max_query_len
            )

        return attend

    def decode_attend(
        self, positions: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> Attend:
        """Decode attention of b rows, one token each, at one cache layer: positions [b], slots [b]
        (where the new key and value go), block_tables [b, max_blocks], context_lens [b]. Reads no
        host value, so a CUDA graph can hold it (model/decode_graphs.py)."""
        k_cache, v_cache = kv_cache
        ops = self.ops

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, _ = ops.rotary_and_cache(q, k, v, self.rope_cos, self.rope_sin, positions, k_cache, v_cache, slots)
            return ops.decode_attention(q, k_cache, v_cache, block_tables, context_lens, self.scale)

        return attend

    def forward(self, batch: ForwardBatch, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Logits [len(batch.logits_indices), V] fp32, in the order of ``batch.logits_indices``."""
        exits, offsets, L = batch.exits, batch.cu_query_lens_host, self.full_depth
        # rows_deeper_than[l]: rows whose exit is deeper than l, i.e. that run layer l (a prefix).
        rows_deeper_than = [sum(1 for e in exits if e > l) for l in range(L + 1)]
        hidden = F.embedding(batch.input_ids, self.embed_tokens)  # [T, H]
        residual: torch.Tensor | None = None
        # Normed states of the wanted tokens, one entry per exit group. The head (the largest matrix
        # of a small model: 28M of SmolLM2-135M's parameters) then runs once per step over all of
        # them, so a mixed batch reads it once instead of once per exit.
        normed: list[torch.Tensor] = []
        logits_indices = to_device(batch.logits_indices, torch.int64, hidden.device)  # [N], no host sync on CUDA
        # A decode step's work shared by every layer (RoPE angles, key mask), once, where the ops
        # have it (the CPU's torch ops in fp32: kernels/cpu_decode.py).
        tables = None
        if batch.is_decode and self.ops.decode_tables is not None and self.dtype == torch.float32:
            tables = self.ops.decode_tables(self.rope_cos, self.rope_sin, batch.positions, batch.context_lens,
                                            batch.max_context_len, *kv_cache)

        def emit(rows: slice, out: torch.Tensor, res: torch.Tensor, norm: torch.Tensor) -> None:
            """Normed states of the wanted tokens among ``rows``, whose hidden states are out + res."""
            start, stop = offsets[rows.start], offsets[rows.stop]
            lo = bisect_left(batch.logits_indices, start)
            hi = bisect_left(batch.logits_indices, stop)
            if lo == hi:
                return
            local = logits_indices[lo:hi] - start  # [n] token indices within these rows
            normed.append(self.final_norm(out[local], res[local], norm))

        for l, layer in enumerate(self.layers):
            rows = rows_deeper_than[l]
            if rows == 0:
                break
            tokens = offsets[rows]
            hidden = hidden[:tokens]
            residual = None if residual is None else residual[:tokens]
            attend = self._paged_attend(batch, l, slice(0, rows), kv_cache, tables)
            hidden, residual = layer(hidden, residual, attend, self.ops)
            exiting = slice(rows_deeper_than[l + 1], rows)  # rows whose exit is l + 1
            if l + 1 < L and exiting.start < exiting.stop:
                # Exiting rows are the batch's last rows: their states are collected shallow exit
                # first and the list is flipped at the end to follow token order.
                balcony = self.balconies[str(l + 1)]
                tok = slice(offsets[exiting.start], offsets[exiting.stop])
                attend = self._paged_attend(batch, self.cache_layers_of(l + 1)[-1], exiting, kv_cache, tables)
                out, res = balcony(hidden[tok], residual[tok], attend, self.ops)
                emit(exiting, out, res, balcony.norm)
        full_rows = rows_deeper_than[L - 1]
        if full_rows:
            emit(slice(0, full_rows), hidden, residual, self.norm)
        if not normed:
            return torch.empty(0, self.arch.vocab_size, device=self.norm.device)
        # Groups were collected shallow exit first (the batch's last rows); flip to token order.
        normed.reverse()
        return self.head(torch.cat(normed))  # [N, V]
