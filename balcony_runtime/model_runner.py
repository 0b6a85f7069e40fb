"""Scheduled requests -> tensors -> model -> sampler -> per-request results. Owns every tensor.

The batch state persists between steps (input_batch.InputBatch): a running request keeps its row,
and its block tables change only by the blocks it gained. The rest of a step's input is built from
one short host array per row (start, tokens) with numpy and staged to the device in one copy each.
Rows of one exit group may sit in a different order than the scheduler listed them (so a row that
leaves or joins moves only itself); results come back in the scheduler's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from balcony_runtime.block_manager import BlockManager
from balcony_runtime.inference_mode import in_inference_mode
from balcony_runtime.input_batch import InputBatch
from balcony_runtime.kv_cache import KVCache
from balcony_runtime.model.balcony_model import BalconyModel
from balcony_runtime.model.decode_graphs import DecodeGraphs
from balcony_runtime.model.forward_batch import ForwardBatch
from balcony_runtime.request import Request
from balcony_runtime.routing.step_cost import DecodeRows, StepShape
from balcony_runtime.sampler import (RowClasses, Sampler, SamplingRow, TokenLogprobs, classify_rows, make_generator,
                                     prompt_logprobs)
from balcony_runtime.scheduler import DecodeRun, ScheduledRequest
from balcony_runtime.staging import to_device
from balcony_runtime.structured.token_masks import mask_logits


@dataclass(slots=True)
class StepResult:
    """What one step produced, by index into the scheduled list (columns, not an object per row:
    a decode step has a row per running request)."""

    tokens: list[int | None]  # the next token of each request whose known sequence this step completed, else None
    logprobs: list[TokenLogprobs | None] | None  # each row's sampled-token logprobs; None when no row asked
    prompt_logprobs: dict[int, Sequence[TokenLogprobs]]  # logprobs of prompt tokens start+1.. covered by a chunk


@dataclass
class StepLayout:
    """How the rows of a prepared batch map back to the scheduled requests."""

    order: list[int]  # order[b]: index into the scheduled list of batch row b
    prompt_targets: dict[int, list[int]]  # batch row -> prompt tokens its prompt logits score, in order
    # In a decode step (every row feeds one token and is sampled) whose rows sit in the scheduler's
    # order, the batch's arrangement (InputBatch.arrangement); None otherwise.
    decode_arrangement: list[str] | None = None
    shape: StepShape | None = None  # what the step runs, as the step-cost model sees it
    num_prefill_tokens: int = 0  # tokens of rows feeding more than one


class ModelRunner:
    def __init__(self, model: BalconyModel, kv_cache: KVCache, block_manager: BlockManager,
                 scratch_block: int | None = None):
        """``scratch_block``: a KV-cache block the block manager never hands out (needed by
        :meth:`use_graphs`: padded rows and rows at layers they skip write there)."""
        self.model = model
        self.kv_cache = kv_cache
        self.blocks = block_manager
        self.device = model.norm.device
        self._on_cpu = self.device.type == "cpu"
        self.sampler = Sampler()
        self.scratch_block = scratch_block
        self.input_batch = InputBatch(model.cache_layers_of, model.num_cache_layers, self.device,
                                      null_block=scratch_block or 0)
        self.graphs: DecodeGraphs | None = None
        # request id -> what the sampler reads of it; made at its first sampled token and kept (its
        # output list is the request's own, which grows in place) until the request is released.
        self._sampling_rows: dict[str, SamplingRow] = {}
        # The last step's sampled rows and their classes: the next step of the same rows reuses them.
        self._classified: tuple[list[SamplingRow], RowClasses] = ([], classify_rows([]))
        # The last decode step's (arrangement, rows, sampling, sample_logit_rows), None after any
        # other step: the next decode step of the same arrangement reuses the lists as they are.
        self._decode_rows: tuple[list[str], list[SamplingRow], list[int], list[int]] | None = None
        self._arange = torch.arange(0, dtype=torch.int32, device=self.device)  # see _row_offsets
        self._offsets: tuple[int, torch.Tensor] | None = None  # the last _row_offsets: (rows, its view)
        # The last decode arrangement's DecodeRows: its step shapes differ only in the contexts.
        self._decode_shape: tuple[list[str] | None, DecodeRows | None] = (None, None)
        # The arrangement of the last step that sampled every row, and the tokens it sampled, [B]
        # on the device, slot b's at b: the next decode step of the same arrangement feeds them as
        # its input ids as they are (vLLM v1's input batch does the same), with no pass over the
        # rows to read each request's last token and no copy to the device. None after any other step.
        self._last_sampled: tuple[list[str], torch.Tensor] | None = None
        # The lists of the first step of the current steady decode (SchedulerOutput.decode_run), in
        # its arrangement; None after any other step.
        self._run_lists: _RunLists | None = None
        # Row count -> the host buffers a CPU decode step of that many rows writes its inputs into
        # (see _decode_inputs).
        self._decode_buffers: dict[int, _DecodeInputs] = {}

    def use_graphs(self, max_rows: int, max_model_len: int, record: bool | None = None,
                   max_slots: int = 0) -> DecodeGraphs:
        """Serve decode steps of up to ``max_rows`` rows by replaying recorded pieces
        (model/decode_graphs.py; ``record`` False runs them eagerly: tests on the CPU).
        ``max_slots``: the most rows the batch will hold (the engine's max_num_seqs), so its tables
        are sized once and the pieces read them where they live, with no copy a step."""
        if self.scratch_block is None or self.scratch_block >= self.kv_cache.keys.shape[0]:
            raise ValueError("decode graphs need a scratch block in the KV cache that no request owns")
        max_blocks = -(-max_model_len // self.blocks.block_size)
        batch = self.input_batch
        batch.reserve(max(max_rows, max_slots), max_blocks)
        graphs = DecodeGraphs(self.model, self.kv_cache.as_tuple(), self.scratch_block, self.blocks.block_size,
                              max_rows, max_blocks, record, block_tables=batch.block_table[:, :max_rows, :max_blocks])
        graphs.capture()
        self.graphs = graphs
        return graphs

    def release(self, request_id: str) -> None:
        self._sampling_rows.pop(request_id, None)
        self.input_batch.remove(request_id)

    def run(self, scheduled: Sequence[ScheduledRequest]) -> StepResult:
        """One step, its tokens read back at once."""
        return self.launch(scheduled).result()

    def launch(self, scheduled: Sequence[ScheduledRequest], previous: torch.Tensor | None = None,
               run: DecodeRun | None = None) -> "PendingStep":
        """Enqueue one step, its forward and its sampling, without waiting for the sampled tokens
        (on a GPU the host returns while the device works; on a CPU the work is done on return).

        ``previous``: the sampled tokens of the step before, [S] on the device, not yet read. A
        request whose last token is a placeholder -1 - j (see LLMEngine, overlapped steps) is fed
        previous[j]. Rows that ask for logprobs, and prompt logprobs, are read back here. ``run``:
        the plan's DecodeRun, when the scheduler made it one (SchedulerOutput.decode_run)."""
        return self.sample(self.forward(scheduled, previous, run))

    @in_inference_mode
    def forward(self, scheduled: Sequence[ScheduledRequest], previous: torch.Tensor | None = None,
                run: DecodeRun | None = None) -> "ForwardedStep":
        """The first half of :meth:`launch`: the model's forward (and prompt logprobs). An engine
        may read the previous step between the two halves, while the device runs this forward."""
        batch, layout = self.prepare(scheduled, previous, run)
        if self.graphs is not None and self.graphs.can_run(batch):
            logits = self.graphs.run(batch)  # a view of a static buffer, used before the next step
        else:
            logits = self.model(batch, self.kv_cache.as_tuple())  # [len(logits_indices), V] fp32
        prompt: dict[int, Sequence[TokenLogprobs]] = {}
        arrangement, cached = layout.decode_arrangement, self._decode_rows
        if arrangement is not None and cached is not None and cached[0] is arrangement:
            # A decode step of the same requests in the same rows as the last (most steps under
            # steady load): each row samples with the same SamplingRow as then.
            return ForwardedStep(scheduled, logits, *cached[1:], prompt, layout)
        rows: list[SamplingRow] = []
        sampling: list[int] = []  # scheduled index of each sampling row
        sample_logit_rows: list[int] = []
        cursor = 0
        prompt_targets, sampling_rows = layout.prompt_targets, self._sampling_rows
        for b, i in enumerate(layout.order):
            item = scheduled[i]
            if prompt_targets:
                targets = prompt_targets.get(b)
                if targets:
                    span = logits[cursor : cursor + len(targets)]  # [n, V]
                    target = to_device(targets, torch.long, span.device)
                    prompt[i] = prompt_logprobs(span, target, item.request.params.prompt_logprobs)
                    cursor += len(targets)
            if item.completes_sequence:
                request = item.request
                row = sampling_rows.get(request.request_id)
                if row is None:
                    row = sampling_rows[request.request_id] = SamplingRow(
                        request.params, request.output_token_ids, make_generator(request.params.seed, self.device))
                rows.append(row)
                sampling.append(i)
                sample_logit_rows.append(cursor)
                cursor += 1
        self._decode_rows = None if arrangement is None else (arrangement, rows, sampling, sample_logit_rows)
        return ForwardedStep(scheduled, logits, rows, sampling, sample_logit_rows, prompt, layout)

    @in_inference_mode
    def sample(self, step: "ForwardedStep", some_finished: bool = False) -> "PendingStep":
        """The second half of :meth:`launch`: masks, penalties and sampling of a forwarded step.
        ``some_finished``: requests may have finished since the forward; their rows are sampled
        without their grammar (their tokens are dropped)."""
        scheduled, logits, rows, sampling = step.scheduled, step.logits, step.rows, step.sampling
        self._last_sampled = None
        if not rows:
            return PendingStep(len(scheduled), sampling, None, [], None, step.prompt, step.layout)
        if len(rows) == logits.shape[0]:  # no prompt logits: the sampled rows are all of them
            to_sample = logits
        else:
            to_sample = logits[to_device(step.sample_logit_rows, torch.long, logits.device)]
        if rows is not self._classified[0] and rows != self._classified[0]:  # identity per row (no __eq__)
            self._classified = rows, classify_rows(rows)
        classes = self._classified[1]
        if classes.constrained:  # structured outputs: -inf on what each row's grammar forbids
            if some_finished:
                grammars = [None if r.is_finished else r.grammar for r in (scheduled[i].request for i in sampling)]
            else:
                grammars = [scheduled[i].request.grammar for i in sampling]
            mask_logits(to_sample, grammars)
        if classes.wanted:  # logprobs are read back now (their top-n are lists of Python numbers)
            sampled, row_logprobs = self.sampler.sample(to_sample, rows, classes)
            tokens = to_device(sampled, torch.long, self.device)
            pending = PendingStep(len(scheduled), sampling, tokens, sampled, row_logprobs, step.prompt, step.layout)
        else:
            tokens = self.sampler.sample_on_device(to_sample, rows, classes)  # [S]
            pending = PendingStep(len(scheduled), sampling, tokens, None, None, step.prompt, step.layout)
        if len(sampling) == len(scheduled):  # every row sampled, in slot order (ForwardedStep.sampling)
            self._last_sampled = self.input_batch.arrangement, tokens
            # In the scheduler's order too, where the rows sit where it listed them.
            pending.in_order = step.layout is not None and step.layout.decode_arrangement is not None
        return pending

    def prepare(self, scheduled: Sequence[ScheduledRequest], previous: torch.Tensor | None = None,
                run: DecodeRun | None = None) -> tuple[ForwardBatch, StepLayout]:
        """The model's input for these requests (ordered deepest exit first, as the scheduler
        orders them); batch row b holds scheduled[layout.order[b]]. ``previous``, ``run``: see
        :meth:`launch`."""
        block_size = self.blocks.block_size
        kept = self._run_lists
        if run is not None and kept is not None and kept.requests is run.requests \
                and kept.arrangement is self.input_batch.arrangement:
            # A steady decode of the same requests in the same rows as the last step (which was a
            # decode step of every row, in the scheduler's order): its lists serve again, and the
            # starts come from the plan, not from a pass over the rows.
            ids, exits, tables, query_lens, lens = kept.ids, kept.exits, kept.tables, kept.query_lens, kept.lens
            order = self.input_batch.arrange(ids, exits, tables)  # (they stay where they are)
            rows, starts, context_lens = scheduled, run.starts, run.ends
            max_context = run.max_end
            is_decode = all_sampled = True
        else:
            kept = None
            ids = [item.request.request_id for item in scheduled]
            exits = [item.request.exit_layer for item in scheduled]
            tables = self.blocks.tables_of(ids)
            order = self.input_batch.arrange(ids, exits, tables)
            if order != list(range(len(order))):
                tables, exits = [tables[i] for i in order], [exits[i] for i in order]
                rows = [scheduled[i] for i in order]
            else:
                rows = scheduled  # each request sits where the scheduler listed it (most steps)
            starts = np.asarray([item.start for item in rows], dtype=np.int64)  # [B]
            query_lens = [item.num_tokens for item in rows]
            lens = np.asarray(query_lens, dtype=np.int64)  # [B]
            is_decode = sum(query_lens) == len(rows)  # every row feeds one token
            all_sampled = is_decode and all(item.completes_sequence for item in rows)
            context_lens = starts + lens  # [B]
            max_context = int(context_lens.max()) if len(rows) else 0
        num_blocks, most_blocks = None, -(-max_context // block_size)
        if kept is not None and run.grown is not None:  # the plan says which rows took which blocks
            grown = run.grown
            num_blocks = self.input_batch.write_grown(grown.rows, grown.ids, grown.exit_layer, most_blocks,
                                                      grown.row_exits)
        if num_blocks is None:
            num_blocks = self.input_batch.update_blocks(tables, (context_lens + (block_size - 1)) // block_size,
                                                        most_blocks)
        prompt_targets: dict[int, list[int]] = {}
        head_rows = len(rows)
        fed = None  # the input ids as a device tensor already, when the last step sampled them
        if all_sampled:
            # A decode step: every row feeds its last known token (the one after its cache) and is
            # sampled (no prompt logits: its one token is past the prompt's last scored position).
            last_sampled = self._last_sampled
            if last_sampled is not None and last_sampled[0] is self.input_batch.arrangement:
                # The same requests in the same rows as the last step, which sampled every row: the
                # token each sampled then is its last (a request whose token was dropped has
                # finished, which changes the arrangement).
                fed = last_sampled[1]  # [B]
                input_ids = None
            else:
                input_ids = [(r.output_token_ids or r.prompt_token_ids)[-1] for r in (item.request for item in rows)]
            logits_indices = kept.logits_indices if kept is not None else list(range(len(rows)))
        else:
            input_ids, logits_indices = [], []
            head_rows = 0
            for b, item in enumerate(rows):
                request, start, n = item.request, item.start, item.num_tokens
                offset = len(input_ids)
                input_ids += _tokens(request, start, start + n)
                # Prompt logprobs: logits at position p score prompt token p + 1.
                if request.params.prompt_logprobs is not None and not request.prompt_logprobs_done:
                    last = min(start + n, request.num_prompt_tokens - 1)
                    if last > start:
                        prompt_targets[b] = request.prompt_token_ids[start + 1 : last + 1]
                        logits_indices.extend(range(offset, offset + last - start))
                if item.completes_sequence:
                    logits_indices.append(offset + n - 1)
                    head_rows += 1

        num_rows = len(rows)
        num_tokens = num_rows if input_ids is None else len(input_ids)
        device = self.device
        if is_decode:  # row b is token b: no offsets to compute or copy
            positions, cu_t, max_query_len = starts, self._row_offsets(num_rows), 1  # [T], [B + 1]
        else:
            cu = np.zeros(num_rows + 1, dtype=np.int64)  # [B + 1]
            np.cumsum(lens, out=cu[1:])
            token_rows = np.repeat(np.arange(num_rows), lens)  # [T]
            positions = np.arange(num_tokens) - cu[token_rows] + starts[token_rows]  # [T]
            cu_t, max_query_len = to_device(cu, torch.int32, device), int(lens.max())
        block_tables = self.input_batch.view(num_rows, num_blocks)  # [C, B, max_blocks], a view
        # Slot of each token at every cache layer; rows that skip a layer point at block 0 but are
        # never read or written there (the model slices them away).
        last = self.input_batch.last_blocks(num_rows) if is_decode else None
        if last is not None and self._on_cpu:
            # Host memory: numpy's few small operations, into buffers kept between steps, take a
            # fraction of torch's per-call cost and of making new tensors each step.
            buffers = self._decode_inputs(num_rows)
            # [C, T]: token t is row t, written into the last block its context reaches.
            slots = np.multiply(self.input_batch.last_block_ids(num_rows), block_size, out=buffers.slots)  # [C, T]
            slots += starts % block_size
            buffers.context[:] = context_lens  # [B] int32
            buffers.positions[:] = starts  # [T]: token t is row t
            slot_mapping, context_t, positions_t = buffers.slots_t, buffers.context_t, buffers.positions_t
        else:
            positions_t = to_device(positions, torch.int64, device)  # [T]
            context_t = to_device(context_lens, torch.int32, device)  # [B]
            if last is not None:
                blocks = last  # [C, T]
            elif is_decode:  # a gather along the blocks (twice as fast as the indexing below)
                index = (positions_t // block_size).view(1, -1, 1).expand(block_tables.shape[0], -1, 1)  # [C, T, 1]
                blocks = block_tables.gather(2, index).squeeze(2)  # [C, T]
            else:
                blocks = block_tables[:, to_device(token_rows, torch.int64, device), positions_t // block_size]  # [C, T]
            slot_mapping = torch.add(positions_t % block_size, blocks, alpha=block_size)  # [C, T] int64
        if fed is not None:
            input_ids_t = fed  # [T]
        else:
            input_ids_t = to_device(input_ids, torch.int64, device)  # [T]
            if previous is not None and input_ids and min(input_ids) < 0:  # tokens the previous step sampled
                # -1 - j -> previous[j], on the device: the host never reads the sampled tokens first.
                input_ids_t = torch.where(input_ids_t < 0, previous[(-1 - input_ids_t).clamp_(min=0)], input_ids_t)
        batch = ForwardBatch(
            input_ids=input_ids_t,
            positions=positions_t,
            exits=exits,
            query_lens=query_lens,
            cu_query_lens=cu_t,
            context_lens=context_t,
            block_tables=block_tables,
            slot_mapping=slot_mapping,
            logits_indices=logits_indices,
            is_decode=is_decode,
            max_query_len=max_query_len,
            max_context_len=max_context,
        )
        # (only where each row sits where the scheduler listed it, so the lists reused are the same)
        decode_arrangement = self.input_batch.arrangement if all_sampled and rows is scheduled else None
        if decode_arrangement is None or run is None:
            self._run_lists = None
        elif kept is None:  # a steady decode's first step in these rows: the next ones reuse its lists
            self._run_lists = _RunLists(run.requests, decode_arrangement, ids, exits, tables, query_lens, lens,
                                        logits_indices)
        if decode_arrangement is not None:  # the same rows as the last decode step, most steps
            arranged, decode_rows = self._decode_shape
            if arranged is not decode_arrangement:
                decode_rows = DecodeRows.of(exits, self.model.full_depth)
                self._decode_shape = decode_arrangement, decode_rows
            shape = decode_rows.shape(context_lens, head_rows)
        else:
            shape = StepShape.of_arrays(exits, lens, starts, head_rows, self.model.full_depth, is_decode)
        num_prefill_tokens = 0 if is_decode else int(lens[lens > 1].sum())
        return batch, StepLayout(order, prompt_targets, decode_arrangement, shape, num_prefill_tokens)

    def _decode_inputs(self, num_rows: int) -> "_DecodeInputs":
        """The host buffers of a CPU decode step of ``num_rows`` rows, made once per row count. A
        CPU step's forward has finished before the next step is prepared, so nothing reads a
        buffer when it is written again."""
        buffers = self._decode_buffers.get(num_rows)
        if buffers is None:
            if len(self._decode_buffers) > 64:  # (row counts of past steps: keep a few)
                self._decode_buffers.clear()
            slots = np.empty((self.input_batch.block_table.shape[0], num_rows), dtype=np.int64)  # [C, B]
            context = np.empty(num_rows, dtype=np.int32)  # [B]
            positions = np.empty(num_rows, dtype=np.int64)  # [B]
            buffers = self._decode_buffers[num_rows] = _DecodeInputs(
                slots, context, positions, torch.from_numpy(slots), torch.from_numpy(context), torch.from_numpy(positions))
        return buffers

    def _row_offsets(self, num_rows: int) -> torch.Tensor:
        """0, 1, ..., num_rows as int32 on the device: a decode step's cu_query_lens (a view of a
        tensor kept between steps; nothing writes to it)."""
        kept = self._offsets
        if kept is not None and kept[0] == num_rows:  # (a slice costs microseconds; rows rarely change)
            return kept[1]
        if self._arange.shape[0] <= num_rows:
            self._arange = torch.arange(2 * num_rows + 2, dtype=torch.int32, device=self.device)
        offsets = self._arange[: num_rows + 1]
        self._offsets = num_rows, offsets
        return offsets


@dataclass(frozen=True, slots=True)
class _DecodeInputs:
    """Host buffers that a CPU decode step of B rows writes its slot mapping, context lengths and
    positions into: numpy arrays for the writes, tensors sharing their memory for the model."""

    slots: np.ndarray  # [C, B] int64
    context: np.ndarray  # [B] int32
    positions: np.ndarray  # [B] int64
    slots_t: torch.Tensor  # slots' memory
    context_t: torch.Tensor  # context's memory
    positions_t: torch.Tensor  # positions' memory


@dataclass(frozen=True, slots=True)
class _RunLists:
    """What ModelRunner.prepare built for the first step of a steady decode (DecodeRun) in one
    arrangement of the batch, which the later steps of the same rows take as they are."""

    requests: list[Request]  # DecodeRun.requests
    arrangement: list[str]  # InputBatch.arrangement
    ids: list[str]  # each row's request id, in the rows' order (the scheduler's)
    exits: list[int]
    tables: list[list[int]]  # the block manager's block-major lists (grown in place)
    query_lens: list[int]  # [1] * B
    lens: np.ndarray  # [B] int64 ones
    logits_indices: list[int]  # 0..B-1


@dataclass(slots=True)
class ForwardedStep:
    """A step whose forward is launched and whose rows are not sampled yet."""

    scheduled: Sequence[ScheduledRequest]
    logits: torch.Tensor  # [rows of logits, V]: prompt-logprob positions, then one per sampled row
    rows: list[SamplingRow]  # the sampled rows
    sampling: list[int]  # scheduled index of each sampled row
    sample_logit_rows: list[int]  # each sampled row's row of logits
    prompt: dict[int, Sequence[TokenLogprobs]]  # prompt logprobs by scheduled index
    layout: StepLayout | None = None  # the prepared step's (its shape goes to StepStats)


class PendingStep:
    """A launched step whose sampled tokens the host has not read yet (:meth:`result` reads them).

    On a GPU the tokens are copied into pinned host memory behind the step's work on the stream,
    with an event to wait on, so the host can launch the next step first (LLMEngine, overlapped
    steps); on a CPU they are ready when the step is launched."""

    __slots__ = ("num_scheduled", "sampling", "tokens", "_host", "_event", "_listed", "_logprobs", "_prompt", "layout",
                 "in_order")

    def __init__(self, num_scheduled: int, sampling: list[int], tokens: torch.Tensor | None,
                 listed: list[int] | None, logprobs: list[TokenLogprobs | None] | None,
                 prompt: dict[int, Sequence[TokenLogprobs]], layout: StepLayout | None = None):
        self.num_scheduled = num_scheduled
        self.layout = layout  # the prepared step's (StepStats reads its shape)
        self.sampling = sampling  # scheduled index of each sampled row, in the order of `tokens`
        self.tokens = tokens  # [S] int64 on the device: what the next step may read before the host
        self._listed = listed  # the tokens as a list, once read
        self._logprobs = logprobs  # per sampled row, when a row asked
        self._prompt = prompt
        self._host = self._event = None
        # Every row sampled, sampled row j being scheduled row j (set by ModelRunner.sample): the
        # tokens as read are the result's, with no pass over the rows to place them.
        self.in_order = False
        if listed is None and tokens is not None and tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> StepResult:
        """The step's tokens by scheduled index (waits for the device on a GPU)."""
        if self._listed is None and self.tokens is not None:
            if self._event is not None:
                self._event.synchronize()
                self._listed = self._host.tolist()
            else:
                self._listed = self.tokens.tolist()
        if self.in_order and self._logprobs is None:
            return StepResult(self._listed, None, self._prompt)
        tokens: list[int | None] = [None] * self.num_scheduled
        logprobs = None
        if self.sampling:
            for i, token in zip(self.sampling, self._listed):
                tokens[i] = token
            if self._logprobs is not None:
                logprobs = [None] * self.num_scheduled
                for i, lp in zip(self.sampling, self._logprobs):
                    logprobs[i] = lp
        return StepResult(tokens, logprobs, self._prompt)


def _tokens(request: Request, start: int, stop: int) -> list[int]:
    """Tokens ``start:stop`` of prompt + output, without joining the two lists (a decode step reads
    one token, not the whole context)."""
    prompt, num_prompt = request.prompt_token_ids, request.num_prompt_tokens
    if start >= num_prompt:
        return request.output_token_ids[start - num_prompt : stop - num_prompt]
    if stop <= num_prompt:
        return prompt[start:stop]
    return prompt[start:] + request.output_token_ids[: stop - num_prompt]
