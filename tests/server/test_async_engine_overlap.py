"""The server's step loop (server/async_engine.py) over an engine whose steps overlap.

`balcony serve` overlaps steps on CUDA only, so the HTTP tests on this CPU never do; here the same
front runs in-process over an engine forced to overlap, with requests arriving while steps are in
flight and a reader that goes away mid-stream (aborted while its next token is being sampled).
"""

from __future__ import annotations

import asyncio
import time

from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.loader import load_model
from balcony_runtime.routing.latency_model import LatencyModel
from balcony_runtime.routing.router import Router
from balcony_runtime.routing.step_cost import StepCostModel
from balcony_runtime.sampling_params import SamplingParams
from server.async_engine import AsyncEngine, GroupEntry
from server.metrics import ServerMetrics


def engine_of(model, overlap: bool) -> LLMEngine:
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=1024, overlap_steps=overlap))
    # A fixed cost model instead of a calibration: the front asks the router for each request's exit.
    cost = StepCostModel(engine.model.full_depth, coefficients=(0.0, 1e-3, 0.0, 0.0, 0.0, 0.0))
    engine.router = Router(LatencyModel(cost, 2.0, 0.1), engine.exits, "best-effort")
    return engine


def test_streams_arrive_whole_while_steps_overlap(tiny_model_dir):
    model = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2, 3), dtype="float32", device="cpu")
    prompts = [[5 + i, 9, 13, 2 + i, 40 + 3 * i] for i in range(6)]
    lengths = [12, 3, 20, 7, 16, 9]
    exits = [None, 2, "full", 1, None, 3]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    reference = engine_of(model, overlap=False).generate(prompts, params, exits)

    async def main() -> tuple[list[list[int]], list[int], LLMEngine]:
        engine = engine_of(model, overlap=True)
        front = AsyncEngine(engine, ServerMetrics(), max_queued=64)
        front.start(asyncio.get_running_loop())
        try:
            async def one(i: int, leave_after: int | None = None) -> list[int]:
                await asyncio.sleep(0.02 * i)  # arrivals spread over the first steps
                forced = None if exits[i] is None else engine.parse_exit(exits[i])
                [submission] = await front.submit_group([GroupEntry(f"r{i}", prompts[i], params[i])], None,
                                                        forced, time.monotonic())
                tokens: list[int] = []
                stream = front.stream(submission)
                async for batch in stream:
                    tokens += [t for out in batch for t in out.new_token_ids]
                    if leave_after is not None and len(tokens) >= leave_after:
                        await stream.aclose()  # the client went away: aborted at the next boundary
                        break
                return tokens

            got = await asyncio.gather(*(one(i, leave_after=2 if i == 4 else None) for i in range(6)))
            for _ in range(200):  # the abort and the last step in flight are handled by the loop
                if not engine.has_unfinished():
                    break
                await asyncio.sleep(0.02)
            return list(got), [engine.blocks.num_used_blocks, front.num_in_flight], engine
        finally:
            front.stop()

    got, (used_blocks, in_flight), engine = asyncio.run(main())
    for i, (tokens, ref) in enumerate(zip(got, reference)):
        if i == 4:
            assert tokens == ref.token_ids[: len(tokens)] and 2 <= len(tokens) < lengths[4]
        else:
            assert tokens == ref.token_ids, i
    assert used_blocks == 0 and in_flight == 0 and not engine.has_unfinished()
