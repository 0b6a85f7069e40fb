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
from balcony_runtime.input_batch import InputBatch
from balcony_runtime.kv_cache import KVCache
from balcony_runtime.model.balcony_model import BalconyModel
from balcony_runtime.model.decode_graphs import DecodeGraphs
from balcony_runtime.model.forward_batch import ForwardBatch
from balcony_runtime.request import Request
from balcony_runtime.sampler import Sampler, SampledToken, SamplingRow, TokenLogprobs, make_generator, prompt_logprobs
from balcony_runtime.scheduler import ScheduledRequest
from balcony_runtime.staging import to_device
from balcony_runtime.structured.token_masks import mask_logits


_UNSET = object()  # a request whose generator is not made yet (None is a valid generator: the global RNG)


@dataclass(slots=True)
class RunResult:
    """What one step produced for one scheduled request."""

    sampled: SampledToken | None  # the next token, when this step completed the known sequence
    prompt_logprobs: Sequence[TokenLogprobs]  # logprobs of prompt tokens start+1.. covered by this chunk


@dataclass
class StepLayout:
    """How the rows of a prepared batch map back to the scheduled requests."""

    order: list[int]  # order[b]: index into the scheduled list of batch row b
    prompt_targets: dict[int, list[int]]  # batch row -> prompt tokens its prompt logits score, in order


class ModelRunner:
    def __init__(self, model: BalconyModel, kv_cache: KVCache, block_manager: BlockManager,
                 scratch_block: int | None = None):
        """``scratch_block``: a KV-cache block the block manager never hands out (needed by
        :meth:`use_graphs`: padded rows and rows at layers they skip write there)."""
        self.model = model
        self.kv_cache = kv_cache
        self.blocks = block_manager
        self.device = model.norm.device
        self.sampler = Sampler()
        self.scratch_block = scratch_block
        self.input_batch = InputBatch(model.cache_layers_of, model.num_cache_layers, self.device,
                                      null_block=scratch_block or 0)
        self.graphs: DecodeGraphs | None = None
        self._generators: dict[str, torch.Generator | None] = {}

    def use_graphs(self, max_rows: int, max_model_len: int, record: bool | None = None) -> DecodeGraphs:
        """Serve decode steps of up to ``max_rows`` rows by replaying recorded pieces
        (model/decode_graphs.py; ``record`` False runs them eagerly: tests on the CPU)."""
        if self.scratch_block is None or self.scratch_block >= self.kv_cache.keys.shape[0]:
            raise ValueError("decode graphs need a scratch block in the KV cache that no request owns")
        max_blocks = -(-max_model_len // self.blocks.block_size)
        graphs = DecodeGraphs(self.model, self.kv_cache.as_tuple(), self.scratch_block, self.blocks.block_size,
                              max_rows, max_blocks, record)
        graphs.capture()
        self.graphs = graphs
        return graphs

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self.input_batch.remove(request_id)

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledRequest]) -> list[RunResult]:
        batch, layout = self.prepare(scheduled)
        if self.graphs is not None and self.graphs.can_run(batch):
            logits = self.graphs.run(batch)  # a view of a static buffer, used before the next step
        else:
            logits = self.model(batch, self.kv_cache.as_tuple())  # [len(logits_indices), V] fp32
        results = [RunResult(None, ()) for _ in scheduled]
        rows: list[SamplingRow] = []
        sampling: list[int] = []  # scheduled index of each sampling row
        sample_logit_rows: list[int] = []
        cursor = 0
        prompt_targets, generators = layout.prompt_targets, self._generators
        for b, i in enumerate(layout.order):
            item = scheduled[i]
            if prompt_targets:
                targets = prompt_targets.get(b)
                if targets:
                    span = logits[cursor : cursor + len(targets)]  # [n, V]
                    target = to_device(targets, torch.long, span.device)
                    results[i].prompt_logprobs = prompt_logprobs(span, target, item.request.params.prompt_logprobs)
                    cursor += len(targets)
            if item.completes_sequence:
                request = item.request
                generator = generators.get(request.request_id, _UNSET)
                if generator is _UNSET:
                    generator = generators[request.request_id] = make_generator(request.params.seed, self.device)
                rows.append(SamplingRow(request.params, request.output_token_ids, generator))
                sampling.append(i)
                sample_logit_rows.append(cursor)
                cursor += 1
        if rows:
            if len(rows) == logits.shape[0]:  # no prompt logits: the sampled rows are all of them
                to_sample = logits
            else:
                to_sample = logits[to_device(sample_logit_rows, torch.long, logits.device)]
            grammars = [scheduled[i].request.grammar for i in sampling]
            if any(g is not None for g in grammars):  # structured outputs: -inf on what each row's grammar forbids
                mask_logits(to_sample, grammars)
            for i, token in zip(sampling, self.sampler(to_sample, rows)):
                results[i].sampled = token
        return results

    def prepare(self, scheduled: list[ScheduledRequest]) -> tuple[ForwardBatch, StepLayout]:
        """The model's input for these requests (ordered deepest exit first, as the scheduler
        orders them); batch row b holds scheduled[layout.order[b]]."""
        block_size = self.blocks.block_size
        tables = [self.blocks.block_tables(item.request.request_id) for item in scheduled]
        exits = [item.request.exit_layer for item in scheduled]
        order = self.input_batch.arrange([item.request.request_id for item in scheduled], exits, tables)
        num_blocks = self.input_batch.update_blocks([tables[i] for i in order])
        rows = [scheduled[i] for i in order]

        input_ids: list[int] = []
        starts = np.fromiter((item.start for item in rows), dtype=np.int64, count=len(rows))  # [B]
        query_lens = [item.num_tokens for item in rows]
        logits_indices: list[int] = []
        prompt_targets: dict[int, list[int]] = {}
        for b, item in enumerate(rows):
            request, start, n = item.request, item.start, item.num_tokens
            offset = len(input_ids)
            num_prompt = len(request.prompt_token_ids)
            if n == 1 and start >= num_prompt:  # a decode row, most rows of most steps: no call, no slice
                input_ids.append(request.output_token_ids[start - num_prompt])
            else:
                input_ids += _tokens(request, start, start + n)
            # Prompt logprobs: logits at position p score prompt token p + 1.
            if request.params.prompt_logprobs is not None and not request.prompt_logprobs_done:
                last = min(start + n, request.num_prompt_tokens - 1)
                if last > start:
                    prompt_targets[b] = request.prompt_token_ids[start + 1 : last + 1]
                    logits_indices.extend(range(offset, offset + last - start))
            if item.completes_sequence:
                logits_indices.append(offset + n - 1)

        num_rows, num_tokens = len(rows), len(input_ids)
        is_decode = num_tokens == num_rows
        lens = np.asarray(query_lens, dtype=np.int64)  # [B]
        context_lens = starts + lens  # [B]
        cu = np.zeros(num_rows + 1, dtype=np.int64)  # [B + 1]
        np.cumsum(lens, out=cu[1:])
        if is_decode:
            token_rows, positions = np.arange(num_rows), starts  # [T], [T]
        else:
            token_rows = np.repeat(np.arange(num_rows), lens)  # [T]
            positions = np.arange(num_tokens) - cu[token_rows] + starts[token_rows]  # [T]
        device = self.device
        positions_t = to_device(positions, torch.int64, device)  # [T]
        block_tables = self.input_batch.view(num_rows, num_blocks)  # [C, B, max_blocks], a view
        # Slot of each token at every cache layer; rows that skip a layer point at block 0 but are
        # never read or written there (the model slices them away).
        blocks = block_tables[:, to_device(token_rows, torch.int64, device), positions_t // block_size]  # [C, T]
        slot_mapping = blocks.long() * block_size + positions_t % block_size  # [C, T]
        batch = ForwardBatch(
            input_ids=to_device(input_ids, torch.int64, device),
            positions=positions_t,
            exits=[item.request.exit_layer for item in rows],
            query_lens=query_lens,
            cu_query_lens=to_device(cu, torch.int32, device),
            context_lens=to_device(context_lens, torch.int32, device),
            block_tables=block_tables,
            slot_mapping=slot_mapping,
            logits_indices=logits_indices,
            is_decode=is_decode,
            max_query_len=int(lens.max()),
            max_context_len=int(context_lens.max()),
        )
        return batch, StepLayout(order, prompt_targets)


def _tokens(request: Request, start: int, stop: int) -> list[int]:
    """Tokens ``start:stop`` of prompt + output, without joining the two lists (a decode step reads
    one token, not the whole context)."""
    prompt, num_prompt = request.prompt_token_ids, request.num_prompt_tokens
    if start >= num_prompt:
        return request.output_token_ids[start - num_prompt : stop - num_prompt]
    if stop <= num_prompt:
        return prompt[start:stop]
    return prompt[start:] + request.output_token_ids[: stop - num_prompt]
