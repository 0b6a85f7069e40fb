"""Decode steps through the recorded pieces (model/decode_graphs.py) against the eager forward.

On the CPU nothing is recorded: each piece runs as it would be replayed, over the same static
buffers, buckets, padding rows, gathers and scatters, so what these tests check is the logic a CUDA
graph would freeze. Mixed exits, rows finishing at different steps (the bucket shrinks and stale
rows stay in the static buffers) and layers rows skip all occur."""

from __future__ import annotations

import random

import pytest

from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.model.decode_graphs import row_buckets
from balcony_runtime.sampling_params import SamplingParams


def _generate(engine: LLMEngine, jobs: list[tuple[list[int], int, int]]) -> list[tuple[list[int], list[float]]]:
    """Greedy generation of every (prompt, exit, max_tokens): ids and logprobs per request. Half the
    requests arrive at once, the rest one every other step once the first have finished some, so later ones
    take blocks that finished ones freed while stale rows of those sit in the static buffers."""
    def add(job):
        p, e, m = job
        return engine.add_request(p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, logprobs=0), e)

    first = len(jobs) // 2
    ids = [add(job) for job in jobs[:first]]
    later = list(jobs[first:])
    got: dict[str, tuple[list[int], list[float]]] = {}
    step = 0
    while engine.has_unfinished() or later:
        step += 1
        if step > 4 and step % 2 and later:
            ids.append(add(later.pop(0)))
        for out in engine.step():
            entry = got.setdefault(out.request_id, ([], []))
            entry[0].extend(out.new_token_ids)
            entry[1].extend(t.logprob for t in out.new_logprobs)
    return [got[rid] for rid in ids]


def _jobs(model, seed: int) -> list[tuple[list[int], int, int]]:
    rng = random.Random(seed)
    depths = [model.full_depth, *model.exits]
    return [([rng.randrange(100, 4000) for _ in range(rng.randrange(3, 30))], rng.choice(depths),
             rng.randrange(2, 24)) for _ in range(16)]


def _engine(tiny_model, graphs: bool) -> LLMEngine:
    engine = LLMEngine(tiny_model, EngineConfig(max_num_seqs=8, num_kv_blocks=400, block_size=4))
    if graphs:
        engine.runner.use_graphs(max_rows=8, max_model_len=tiny_model.max_model_len, record=False, max_slots=8)
    return engine


# Shared: the pieces read the batch's own tables (sized once for every slot). Outgrown: the batch
# replaced its tables since (as when it holds more rows than it was sized for), so each replayed step
# copies them into the pieces' view of the old ones.
@pytest.mark.parametrize("tables", ["shared", "outgrown"])
@pytest.mark.parametrize("seed", [0, 1])
def test_graph_decode_steps_match_eager_steps(tiny_model, seed, tables, monkeypatch):
    jobs = _jobs(tiny_model.model, seed)
    eager = _generate(_engine(tiny_model, graphs=False), jobs)
    engine = _engine(tiny_model, graphs=True)
    graphs, batch = engine.runner.graphs, engine.runner.input_batch
    if tables == "outgrown":
        batch._grow_slots()
    runs = []
    run = graphs.run
    monkeypatch.setattr(graphs, "run", lambda batch: runs.append(len(batch.exits)) or run(batch))
    graphed = _generate(engine, jobs)
    assert len(set(runs)) > 2  # decode steps of several row counts went through the pieces
    shared = graphs.s.block_tables.data_ptr() == batch.block_table.data_ptr()
    assert shared == (tables == "shared")
    for (ids_e, lp_e), (ids_g, lp_g) in zip(eager, graphed):
        assert ids_g == ids_e
        assert lp_g == pytest.approx(lp_e, abs=1e-4)


def test_a_scratch_block_is_required(tiny_model):
    from balcony_runtime.block_manager import BlockManager
    from balcony_runtime.kv_cache import KVCache
    from balcony_runtime.model_runner import ModelRunner

    model = tiny_model.model
    runner = ModelRunner(model, KVCache.allocate(model.arch, 8, 4, model.dtype, "cpu"), BlockManager(8, 4))
    with pytest.raises(ValueError, match="scratch block"):
        runner.use_graphs(max_rows=4, max_model_len=64, record=False)


def test_only_decode_steps_whose_rows_all_sample_use_the_pieces(tiny_model):
    engine = _engine(tiny_model, graphs=True)
    graphs = engine.runner.graphs
    seen = []
    original = engine.runner.prepare

    def prepare(scheduled, previous=None, run=None):
        batch, layout = original(scheduled, previous, run)
        seen.append((batch.is_decode, graphs.can_run(batch)))
        return batch, layout

    engine.runner.prepare = prepare
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=0)
    engine.add_request([5, 6, 7, 8], params, "full")
    while engine.has_unfinished():
        engine.step()
    assert seen[0] == (False, False)  # the prefill runs eagerly
    assert all(ok for decode, ok in seen[1:])


def test_row_buckets():
    assert row_buckets(1) == [1]
    assert row_buckets(8) == [1, 2, 4, 8]
    assert row_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
