"""Decode steps as a handful of CUDA-graph replays: one per depth segment, per balcony and the head.

A decode step of a small model on a GPU is host-bound: eager, each of ~12 launches per layer costs
more host time than its kernel takes on the device. A CUDA graph replays a recorded sequence of
launches for about the cost of one. A mixed-depth step is split where rows leave, so any mix of
exits is a sequence of pieces recorded once per padded row count (bucket):

    segment i: backbone layers [e_i, e_i+1) over rows 0..R_i-1 (the rows deeper than e_i, a prefix:
               rows are ordered deepest exit first); segment 0 starts from the token embedding
    balcony e: the rows exiting at e (gathered by an index), its layer and norm; normed states are
               scattered into one buffer in row order
    last segment: also the final norm of the full-depth rows
    head:      every row's logits in one product

Every piece reads fixed (static) buffers, which each step fills by device-to-device copies from the
prepared :class:`ForwardBatch`. A piece recorded for b rows runs on R <= b real rows: the extra
rows compute garbage that nothing reads, and their keys and values go to a scratch block (the KV
cache's last block, which the block manager never hands out; the InputBatch points the cache layers
a row skips there too). Balcony gathers pad with a copy of a member row (identical keys and values
written twice to the same slot), and scatters pad into a dump row.

Off a GPU the same code runs without recording (each "replay" calls the piece): tests check the
bucketing, padding and scatter logic on the CPU against the eager forward.
"""

from __future__ import annotations

import functools
import operator
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from balcony_runtime.model.balcony_model import BalconyModel
from balcony_runtime.model.forward_batch import ForwardBatch
from balcony_runtime.staging import to_device


def row_buckets(max_rows: int) -> list[int]:
    """Row counts graphs are recorded for: powers of two up to ``max_rows``, and ``max_rows`` itself
    (a step pads its rows up to the next one; decode costs little more at twice the rows)."""
    buckets, b = [], 1
    while b < max_rows:
        buckets.append(b)
        b *= 2
    return buckets + [max_rows]


@dataclass
class _Static:
    """The buffers every recorded piece reads and writes, sized for ``max_rows``."""

    input_ids: torch.Tensor  # [R] int64
    positions: torch.Tensor  # [R] int64
    context_lens: torch.Tensor  # [R] int32
    slot_mapping: torch.Tensor  # [C, R] int64
    block_tables: torch.Tensor  # [C, R, W] int32
    hidden: torch.Tensor  # [R, H] layer output, unsummed with
    residual: torch.Tensor  # [R, H]
    normed: torch.Tensor  # [R + 1, H] final-normed states in row order; row R is the dump row
    # [2E + 1, R] int64, one buffer so one copy fills it: rows 0..E-1 per balcony, the rows it runs
    # (gathered; padded with a member); rows E..2E per balcony and then full depth, where its normed
    # states go (scattered; padded with the dump row R).
    index: torch.Tensor
    logits: torch.Tensor  # [R, V] fp32

    @property
    def gather(self) -> torch.Tensor:
        return self.index[: (self.index.shape[0] - 1) // 2]

    @property
    def scatter(self) -> torch.Tensor:
        return self.index[(self.index.shape[0] - 1) // 2 :]


class DecodeGraphs:
    def __init__(self, model: BalconyModel, kv_cache: tuple[torch.Tensor, torch.Tensor], scratch_block: int,
                 block_size: int, max_rows: int, max_blocks: int, record: bool | None = None,
                 block_tables: torch.Tensor | None = None):
        """``scratch_block``: a KV block no request owns; ``max_blocks``: the block-table width a
        row can reach (max_model_len / block_size); ``record``: record CUDA graphs (default: on CUDA).
        ``block_tables``: [C, max_rows, max_blocks] int32, a view of the batch's own tables (the
        runner's InputBatch, sized once) for the pieces to read where they are; a step whose tables
        are elsewhere (the batch outgrew them) is copied in. Default: a buffer of its own."""
        self.model, self.kv_cache = model, kv_cache
        self.device = model.norm.device
        self.record = self.device.type == "cuda" if record is None else record
        if self.record and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.max_rows, self.max_blocks, self.block_size = max_rows, max_blocks, block_size
        self.buckets = row_buckets(max_rows)
        self.scratch_slot = scratch_block * block_size
        arch, d = model.arch, self.device
        C, R, W, H = model.num_cache_layers, max_rows, max_blocks, arch.hidden_size
        E = len(model.exits)
        self.s = _Static(
            input_ids=torch.zeros(R, dtype=torch.int64, device=d),
            positions=torch.zeros(R, dtype=torch.int64, device=d),
            context_lens=torch.ones(R, dtype=torch.int32, device=d),
            slot_mapping=torch.full((C, R), self.scratch_slot, dtype=torch.int64, device=d),
            block_tables=(torch.full((C, R, W), scratch_block, dtype=torch.int32, device=d)
                          if block_tables is None else block_tables),
            hidden=torch.zeros(R, H, dtype=model.dtype, device=d),
            residual=torch.zeros(R, H, dtype=model.dtype, device=d),
            normed=torch.zeros(R + 1, H, dtype=model.dtype, device=d),
            index=torch.cat([torch.zeros(E, R, dtype=torch.int64), torch.full((E + 1, R), R)]).to(d),
            logits=torch.zeros(R, arch.vocab_size, dtype=torch.float32, device=d),
        )
        bounds = (0, *model.exits, model.full_depth)
        self.segments = list(zip(bounds[:-1], bounds[1:]))  # [(first layer, end layer)] per segment
        self._pieces: dict[tuple[str, int, int], Callable[[], None]] = {}
        self._pool = None
        self.recorded = 0
        self._cut_layers = (0, *model.exits)  # the layers after which rows may leave
        # What the static buffers hold from the last step, so an unchanged part is not written again:
        # the (rows, bucket) whose padding rows point at the scratch block, and the composition
        # (rows deeper than each cut layer) whose index is in _Static.index.
        self._padded: tuple[int, int] | None = None
        self._composition: tuple[int, ...] | None = None
        self._indices_cache: dict[tuple[int, ...], torch.Tensor] = {}

    # ---- recording ---------------------------------------------------------------------------

    def capture(self) -> None:
        """Record every piece at every bucket, largest first (smaller ones reuse its memory)."""
        if self.record:
            self._pool = torch.cuda.graph_pool_handle()
        pieces = {"segment": self._segment, "balcony": self._balcony, "head": lambda _, b: self._head(b)}
        for kind, i, b in self._keys():
            self._add((kind, i, b), functools.partial(pieces[kind], i, b))
        if self.record:
            torch.cuda.synchronize(self.device)

    def _keys(self) -> list[tuple[str, int, int]]:
        """Every piece, (kind, index, bucket), largest bucket first."""
        return [key for b in reversed(self.buckets)
                for key in ([("segment", i, b) for i in range(len(self.segments))]
                            + [("balcony", j, b) for j in range(len(self.model.exits))] + [("head", 0, b)])]

    def _add(self, key: tuple[str, int, int], piece: Callable[[], None]) -> None:
        if not self.record:
            self._pieces[key] = piece
            return
        piece()  # warm-up outside recording: Triton compiles, cuBLAS picks its kernels
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            piece()
        self._pieces[key] = graph.replay
        self.recorded += 1

    # ---- the pieces (recorded once per bucket b; read and write only static buffers) ---------

    @torch.inference_mode()
    def _segment(self, i: int, b: int) -> None:
        model, s = self.model, self.s
        first, end = self.segments[i]
        if first == 0:
            hidden, residual = F.embedding(s.input_ids[:b], model.embed_tokens), None  # [b, H]
        else:
            hidden, residual = s.hidden[:b], s.residual[:b]
        for l in range(first, end):
            attend = model.decode_attend(s.positions[:b], s.slot_mapping[l, :b], s.block_tables[l, :b],
                                         s.context_lens[:b], self.kv_cache)
            hidden, residual = model.layers[l](hidden, residual, attend, model.ops)
        if end == model.full_depth:
            normed = model.final_norm(hidden, residual, model.norm)  # [b, H]
            s.normed.index_copy_(0, s.scatter[-1, :b], normed)
        else:
            s.hidden[:b].copy_(hidden)
            s.residual[:b].copy_(residual)

    @torch.inference_mode()
    def _balcony(self, j: int, b: int) -> None:
        model, s = self.model, self.s
        k = model.exits[j]
        layer = model.cache_layers_of(k)[-1]
        rows = s.gather[j, :b]  # [b]
        attend = model.decode_attend(
            s.positions.index_select(0, rows), s.slot_mapping[layer].index_select(0, rows),
            s.block_tables[layer].index_select(0, rows), s.context_lens.index_select(0, rows), self.kv_cache,
        )
        balcony = model.balconies[str(k)]
        out, res = balcony(s.hidden.index_select(0, rows), s.residual.index_select(0, rows), attend, model.ops)
        s.normed.index_copy_(0, s.scatter[j, :b], model.final_norm(out, res, balcony.norm))

    @torch.inference_mode()
    def _head(self, b: int) -> None:
        self.s.logits[:b].copy_(self.model.head(self.s.normed[:b]))

    # ---- one step ------------------------------------------------------------------------------

    def bucket(self, rows: int) -> int:
        return self.buckets[bisect_left(self.buckets, rows)]

    def can_run(self, batch: ForwardBatch) -> bool:
        """A decode step whose every row samples (no prompt logits), within the recorded sizes."""
        n = len(batch.exits)
        return (batch.is_decode and 0 < n <= self.max_rows and len(batch.logits_indices) == n
                and batch.block_tables.shape[2] <= self.max_blocks)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """The step's logits [N, V] fp32, as ``model(batch, kv_cache)`` gives them (a view of a static
        buffer: valid until the next step)."""
        s, model = self.s, self.model
        exits, n = batch.exits, len(batch.exits)
        # deeper[l]: rows whose exit is deeper than l (a prefix, exits being non-increasing), for l
        # in (0, *model.exits): found by bisection, not by a pass of Python over the rows per exit,
        # which cost more host time than the rest of this method (docs/benchmarks.md, "Mixed depths").
        deeper = tuple(bisect_left(exits, -l, key=operator.neg) for l in self._cut_layers)
        b0 = self.bucket(n)
        s.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        s.positions[:n].copy_(batch.positions, non_blocking=True)
        s.context_lens[:n].copy_(batch.context_lens, non_blocking=True)
        s.slot_mapping[:, :n].copy_(batch.slot_mapping, non_blocking=True)
        if self._padded != (n, b0):  # (rows n..b0-1 still point at the scratch block when unchanged)
            s.slot_mapping[:, n:b0].fill_(self.scratch_slot)  # padding rows write to the scratch block
            self._padded = (n, b0)
        tables = batch.block_tables  # [C, n, width]
        if tables.data_ptr() != s.block_tables.data_ptr() or tables.stride() != s.block_tables.stride():
            s.block_tables[:, :n, : tables.shape[2]].copy_(tables, non_blocking=True)  # (else already where read)
        if self._composition != deeper:  # the index depends only on how many rows leave where
            s.index.copy_(self._index_of(deeper), non_blocking=True)
            self._composition = deeper

        self._pieces[("segment", 0, b0)]()
        for j in range(len(model.exits)):
            leaving = deeper[j] - deeper[j + 1]  # rows whose exit is model.exits[j]
            if leaving:
                self._pieces[("balcony", j, self.bucket(leaving))]()
            if deeper[j + 1]:
                self._pieces[("segment", j + 1, self.bucket(deeper[j + 1]))]()
        self._pieces[("head", 0, b0)]()
        return s.logits[:n]

    def _index_of(self, deeper: tuple[int, ...]) -> torch.Tensor:
        """``_Static.index`` for a composition, on the device: built once per composition (a steady
        decode keeps one for many steps; a batch's compositions are few), the cache bounded."""
        index = self._indices_cache.get(deeper)
        if index is None:
            if len(self._indices_cache) >= 256:
                self._indices_cache.clear()
            index = to_device(self._indices(deeper), torch.int64, self.device)
            self._indices_cache[deeper] = index
        return index

    def _indices(self, deeper: tuple[int, ...]) -> torch.Tensor:
        """``_Static.index`` on the host for the rows deeper than each of (0, *model.exits):
        [2E + 1, R] int64."""
        R, E = self.max_rows, len(self.model.exits)
        index = torch.full((2 * E + 1, R), R, dtype=torch.int64)
        index[:E] = 0
        for j in range(E):
            lo, hi = deeper[j + 1], deeper[j]  # rows [lo, hi) exit at model.exits[j]
            if hi > lo:
                index[j, : hi - lo] = torch.arange(lo, hi)
                index[j, hi - lo :] = hi - 1
                index[E + j, : hi - lo] = torch.arange(lo, hi)
        full_rows = deeper[E]  # deeper than the deepest exit: the full-depth rows
        index[2 * E, :full_rows] = torch.arange(full_rows)
        return index
