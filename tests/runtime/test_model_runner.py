"""ModelRunner.prepare against the batch built from scratch: tokens, positions, block tables and
slot mappings of every row, over steps where rows join, leave and change order."""

from __future__ import annotations

import random

import torch

from balcony_runtime.block_manager import BlockManager
from balcony_runtime.kv_cache import KVCache
from balcony_runtime.model_runner import ModelRunner
from balcony_runtime.request import Request
from balcony_runtime.sampling_params import SamplingParams
from balcony_runtime.scheduler import ScheduledRequest


def reference(model, blocks: BlockManager, rows: list[ScheduledRequest]) -> dict[str, torch.Tensor]:
    """What the step's tensors must hold, rows in the given order (the old runner's construction)."""
    bs = blocks.block_size
    width = max(len(blocks.block_tables(r.request.request_id)[0]) for r in rows)
    tables = torch.zeros(model.num_cache_layers, len(rows), width, dtype=torch.int32)
    ids, positions, token_rows = [], [], []
    for b, item in enumerate(rows):
        t = blocks.block_tables(item.request.request_id)
        tables[model.cache_layers_of(item.request.exit_layer), b, : len(t[0])] = torch.tensor(t, dtype=torch.int32)
        ids += item.request.token_ids(item.start, item.start + item.num_tokens)
        positions += range(item.start, item.start + item.num_tokens)
        token_rows += [b] * item.num_tokens
    pos = torch.tensor(positions)
    slots = tables[:, token_rows, pos // bs].long() * bs + pos % bs
    return dict(input_ids=torch.tensor(ids), positions=pos, block_tables=tables, slot_mapping=slots)


def test_prepare_matches_the_batch_built_from_scratch(tiny_model):
    model = tiny_model.model
    rng = random.Random(0)
    blocks = BlockManager(2000, 4)
    runner = ModelRunner(model, KVCache.allocate(model.arch, 8, 4, model.dtype, "cpu"), blocks)
    live: list[Request] = []
    decode_steps = 0
    for step in range(40):
        for _ in range(rng.randrange(0, 3) if step % 4 == 0 else 0):  # arrivals, with decode-only steps between
            e = rng.choice([1, 2, 3, model.full_depth])
            prompt = [rng.randrange(100, 1000) for _ in range(rng.randrange(1, 20))]
            r = Request(f"r{step}-{len(live)}", prompt, SamplingParams(), e, len(model.cache_layers_of(e)), 0.0)
            blocks.allocate(r.request_id, r.num_cache_layers, 0)
            live.append(r)
        for r in list(live):
            if r.num_computed_tokens >= r.num_prompt_tokens and rng.random() < 0.15:
                live.remove(r)
                blocks.free(r.request_id)
                runner.release(r.request_id)
        scheduled = []
        for r in sorted((r for r in live if rng.random() < 0.85), key=lambda r: -r.exit_layer):
            n = min(rng.randrange(1, 6), r.num_tokens - r.num_computed_tokens)
            blocks.grow(r.request_id, r.num_computed_tokens + n)
            scheduled.append(ScheduledRequest(r, r.num_computed_tokens, n))
        if not scheduled:
            continue
        batch, layout = runner.prepare(scheduled)
        rows = [scheduled[i] for i in layout.order]
        expected = reference(model, blocks, rows)
        for name, value in expected.items():
            assert torch.equal(getattr(batch, name), value), (step, name)
        assert batch.exits == [r.request.exit_layer for r in rows] == sorted(batch.exits, reverse=True)
        assert batch.query_lens == [r.num_tokens for r in rows]
        assert batch.context_lens.tolist() == [r.start + r.num_tokens for r in rows]
        offsets = [0]
        for r in rows:
            offsets.append(offsets[-1] + r.num_tokens)
        assert batch.cu_query_lens.tolist() == offsets and batch.cu_query_lens.dtype == torch.int32
        assert batch.max_query_len == max(r.num_tokens for r in rows)
        assert batch.slot_mapping.dtype == torch.int64
        decode_steps += batch.is_decode
        for item in scheduled:  # the step ran: the tokens are cached, a sampled token joins
            item.request.num_computed_tokens += item.num_tokens
            if item.completes_sequence:
                item.request.output_token_ids.append(rng.randrange(100, 1000))
    assert decode_steps >= 3  # both ways of building the batch were checked


def churn(step: int, rng: random.Random, model, blocks: BlockManager, runners: list[ModelRunner],
          live: list[Request], arrive_every: int, finish: tuple[int, int], skip: tuple[int, int],
          params: SamplingParams = SamplingParams()) -> set[int]:
    """One step's changes to the running requests: three arrivals every ``arrive_every`` steps
    (prefilled whole in their first step), one finishing when step % finish[0] == finish[1], and
    one sitting the step out when step % skip[0] == skip[1] (returned: its index into ``live``)."""
    if step % arrive_every == 0 or not live:
        for _ in range(3):
            e = rng.choice([1, 3, model.full_depth])
            prompt = [rng.randrange(100, 1000) for _ in range(rng.randrange(2, 9))]
            r = Request(f"r{step}-{len(live)}", prompt, params, e, len(model.cache_layers_of(e)), 0.0)
            blocks.allocate(r.request_id, r.num_cache_layers, 0)
            live.append(r)
    if step % finish[0] == finish[1] and len(live) > 2:
        r = live.pop(rng.randrange(len(live)))
        blocks.free(r.request_id)
        for runner in runners:
            runner.release(r.request_id)
    return set(rng.sample(range(len(live)), 1)) if step % skip[0] == skip[1] else set()


def test_decode_steps_of_unchanged_rows_sample_each_row_as_a_fresh_pass_does(tiny_model):
    """A decode step of the same rows as the last reuses that step's sampling lists; over steps where
    rows join, leave, skip a step and come back in another order, they must match the lists built
    row by row (a second runner that never reuses them)."""
    model = tiny_model.model
    rng = random.Random(1)
    blocks = BlockManager(600, 4)
    runners = [ModelRunner(model, KVCache.allocate(model.arch, 600, 4, model.dtype, "cpu"), blocks) for _ in range(2)]
    live: list[Request] = []
    reused = 0
    previous_rows = None
    for step in range(40):
        skipped = churn(step, rng, model, blocks, runners, live, arrive_every=15, finish=(7, 3), skip=(11, 5))
        order = sorted((r for i, r in enumerate(live) if i not in skipped), key=lambda r: -r.exit_layer)
        if step % 13 == 8:  # the scheduler lists one exit group in another order
            order.reverse()
            order.sort(key=lambda r: -r.exit_layer)
        scheduled = []
        for r in order:
            n = r.num_tokens - r.num_computed_tokens
            blocks.grow(r.request_id, r.num_computed_tokens + n)
            scheduled.append(ScheduledRequest(r, r.num_computed_tokens, n))
        runners[1]._decode_rows = None  # the reference builds its lists row by row every step
        fast, slow = (runner.forward(scheduled) for runner in runners)
        assert fast.sampling == slow.sampling and fast.sample_logit_rows == slow.sample_logit_rows, step
        assert [row.output_token_ids for row in fast.rows] == [row.output_token_ids for row in slow.rows]
        for row, i in zip(fast.rows, fast.sampling):
            assert row.output_token_ids is scheduled[i].request.output_token_ids, step
        reused += fast.rows is previous_rows
        previous_rows = fast.rows
        for item in scheduled:
            item.request.num_computed_tokens += item.num_tokens
            item.request.output_token_ids.append(rng.randrange(100, 1000))
    assert reused >= 15  # the reuse did happen (most steps here are steady decode)


def test_decode_steps_of_unchanged_rows_feed_the_tokens_they_sampled(tiny_model):
    """A decode step of the same rows as the last feeds that step's sampled tokens as its input ids
    (no pass over the requests, no copy): over steps where rows join, finish and sit out, every
    step's input ids must be the requests' own last tokens (the batch built from scratch), and the
    sampled tokens must be what a runner that never feeds them samples."""
    model = tiny_model.model
    rng = random.Random(2)
    blocks = BlockManager(800, 4)
    runners = [ModelRunner(model, KVCache.allocate(model.arch, 800, 4, model.dtype, "cpu"), blocks) for _ in range(2)]
    batches: list = []
    prepare = runners[0].prepare

    def recorded(scheduled, previous=None, run=None):
        last = runners[0]._last_sampled
        batch, layout = prepare(scheduled, previous, run)
        batches.append((batch, [scheduled[i] for i in layout.order], last is not None and batch.input_ids is last[1]))
        return batch, layout

    runners[0].prepare = recorded
    live: list[Request] = []
    fed = 0
    for step in range(36):
        skipped = churn(step, rng, model, blocks, runners, live, arrive_every=12, finish=(9, 4), skip=(10, 7),
                        params=SamplingParams(temperature=0))
        scheduled = []
        for r in sorted((r for i, r in enumerate(live) if i not in skipped), key=lambda r: -r.exit_layer):
            n = r.num_tokens - r.num_computed_tokens
            blocks.grow(r.request_id, r.num_computed_tokens + n)
            scheduled.append(ScheduledRequest(r, r.num_computed_tokens, n))
        runners[1]._last_sampled = None  # the reference reads every row's last token itself
        results = [runner.launch(scheduled).result() for runner in runners]
        assert results[0].tokens == results[1].tokens, step
        batch, rows, was_fed = batches[-1]
        assert torch.equal(batch.input_ids, reference(model, blocks, rows)["input_ids"]), step
        fed += was_fed
        for item, token in zip(scheduled, results[0].tokens):
            item.request.num_computed_tokens += item.num_tokens
            if token is not None:
                item.request.output_token_ids.append(token)
    assert fed >= 20  # most steps here are steady decode: they were fed
