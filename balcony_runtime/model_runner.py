"""Scheduled requests -> tensors -> model -> sampler -> per-request results. Owns every tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from balcony_runtime.block_manager import BlockManager
from balcony_runtime.kv_cache import KVCache
from balcony_runtime.model.balcony_model import BalconyModel
from balcony_runtime.model.forward_batch import ForwardBatch
from balcony_runtime.sampler import Sampler, SampledToken, SamplingRow, TokenLogprobs, make_generator, prompt_logprobs
from balcony_runtime.scheduler import ScheduledRequest


@dataclass
class RunResult:
    """What one step produced for one scheduled request."""

    sampled: SampledToken | None  # the next token, when this step completed the known sequence
    prompt_logprobs: list[TokenLogprobs]  # logprobs of prompt tokens start+1.. covered by this chunk


class ModelRunner:
    def __init__(self, model: BalconyModel, kv_cache: KVCache, block_manager: BlockManager):
        self.model = model
        self.kv_cache = kv_cache
        self.blocks = block_manager
        self.device = model.norm.device
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator | None] = {}

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledRequest]) -> list[RunResult]:
        batch, prompt_spans = self.prepare(scheduled)
        logits = self.model(batch, self.kv_cache.as_tuple())  # [len(logits_indices), V] fp32
        results: list[RunResult] = []
        rows: list[SamplingRow] = []
        sample_logit_rows: list[int] = []
        cursor = 0
        for item, (num_prompt_logits, targets) in zip(scheduled, prompt_spans):
            plp: list[TokenLogprobs] = []
            if num_prompt_logits:
                span = logits[cursor : cursor + num_prompt_logits]  # [n, V]
                target = torch.tensor(targets, device=span.device)
                plp = prompt_logprobs(span, target, item.request.params.prompt_logprobs)
                cursor += num_prompt_logits
            results.append(RunResult(None, plp))
            if item.completes_sequence:
                request = item.request
                rows.append(SamplingRow(request.params, request.output_token_ids, self._generator(request)))
                sample_logit_rows.append(cursor)
                cursor += 1
        if rows:
            sampled = self.sampler(logits[sample_logit_rows], rows)
            it = iter(sampled)
            for item, result in zip(scheduled, results):
                if item.completes_sequence:
                    result.sampled = next(it)
        return results

    def _generator(self, request) -> torch.Generator | None:
        if request.request_id not in self._generators:
            self._generators[request.request_id] = make_generator(request.params.seed, self.device)
        return self._generators[request.request_id]

    def prepare(self, scheduled: list[ScheduledRequest]) -> tuple[ForwardBatch, list[tuple[int, list[int]]]]:
        model, block_size = self.model, self.blocks.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        logits_indices: list[int] = []
        prompt_spans: list[tuple[int, list[int]]] = []
        tables_per_row: list[tuple[list[int], list[list[int]]]] = []
        for item in scheduled:
            request, start, n = item.request, item.start, item.num_tokens
            offset = len(input_ids)
            input_ids.extend(request.token_ids(start, start + n))
            positions.extend(range(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
            # Prompt logprobs: logits at position p score prompt token p + 1.
            targets: list[int] = []
            if request.params.prompt_logprobs is not None and not request.prompt_logprobs_done:
                last = min(start + n, request.num_prompt_tokens - 1)
                targets = request.prompt_token_ids[start + 1 : last + 1]
                logits_indices.extend(offset + p - start for p in range(start, last))
            prompt_spans.append((len(targets), targets))
            if item.completes_sequence:
                logits_indices.append(offset + n - 1)
            tables_per_row.append(
                (model.cache_layers_of(request.exit_layer), self.blocks.block_tables(request.request_id))
            )

        max_blocks = max(len(tables[0]) for _, tables in tables_per_row)
        block_tables = torch.zeros(model.num_cache_layers, len(scheduled), max_blocks, dtype=torch.int32)
        for row, (layers, tables) in enumerate(tables_per_row):
            block_tables[layers, row, : len(tables[0])] = torch.tensor(tables, dtype=torch.int32)
        positions_t = torch.tensor(positions, dtype=torch.int64)
        query_lens_t = torch.tensor(query_lens, dtype=torch.int64)
        token_rows = torch.repeat_interleave(torch.arange(len(scheduled)), query_lens_t)  # [T]
        # Slot of each token at every cache layer; rows that skip a layer point at block 0 but are
        # never read or written there (the model slices them away).
        blocks = block_tables[:, token_rows, positions_t // block_size].long()  # [C, T]
        slot_mapping = blocks * block_size + positions_t % block_size  # [C, T]
        cu = torch.zeros(len(scheduled) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(query_lens_t, 0)
        device = self.device
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
            positions=positions_t.to(device),
            exits=[item.request.exit_layer for item in scheduled],
            query_lens=query_lens,
            cu_query_lens=cu.to(device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            block_tables=block_tables.to(device),
            slot_mapping=slot_mapping.to(device),
            logits_indices=logits_indices,
            is_decode=all(n == 1 for n in query_lens),
            max_query_len=max(query_lens),
        )
        return batch, prompt_spans
