"""A steady decode's outputs as columns (plain_outputs.PlainRun, request_output.StepOutputs) against
the row-by-row paths: the same outputs, field by field, and the same request state, under plain
requests that stop on tokens the model writes, reach their lengths and are aborted, synchronous
and overlapped; and the columns made into rows, here and after crossing a pipe."""

from __future__ import annotations

import collections
import dataclasses
import pickle
import random

import pytest

from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.request_output import RequestOutput, RunColumns, StepOutputs, output_row
from balcony_runtime.sampling_params import SamplingParams

_FIELDS = [f.name for f in dataclasses.fields(RequestOutput)]
# Each engine's own clock readings, not compared.
_TIMES = ("arrival_time", "first_scheduled_time", "first_token_time", "latency_s", "budget_met")
_COMPARED = [f for f in _FIELDS if f not in _TIMES]


_EXITS = (1, 3, "full")


def _greedy(model) -> dict:
    """A few prompts and, at each exit, the tokens the model writes after them at greedy decoding
    (a stop token taken from there is met)."""
    rng = random.Random(1)
    prompts = [[rng.randrange(5, 300) for _ in range(rng.randint(1, 12))] for _ in range(10)]
    written = {}
    for exit_layer in _EXITS:
        done = LLMEngine(model, EngineConfig()).generate(prompts, SamplingParams(max_tokens=40, temperature=0),
                                                        exit_layer=exit_layer)
        written.update({(tuple(p), exit_layer): d.token_ids for p, d in zip(prompts, done)})
    return written


def _drive(model, columns: bool, overlap: bool, written: dict):
    rng = random.Random(5)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, overlap_steps=overlap))
    engine.steady_columns = columns
    outputs, column_steps = [], 0

    def step():
        nonlocal column_steps
        got = engine.step()
        column_steps += isinstance(got, StepOutputs)
        outputs.extend(tuple(getattr(out, f) for f in _COMPARED) for out in got)

    keys = sorted(written, key=str)
    for i in range(240):
        if rng.random() < (0.8 if i % 40 < 8 else 0.02):
            prompt, exit_layer = rng.choice(keys)
            greedy = rng.random() < 0.7
            stop = [rng.choice(written[prompt, exit_layer][4:])] if greedy and rng.random() < 0.5 else []
            params = SamplingParams(max_tokens=rng.randint(1, 40), temperature=0 if greedy else 0.8, seed=i,
                                    stop_token_ids=stop, ignore_eos=rng.random() < 0.5)
            engine.add_request(list(prompt), params, exit_layer=exit_layer, request_id=f"r{i}")
        if rng.random() < 0.01 and engine._tracked:
            engine.abort(rng.choice(sorted(engine._tracked)))
        step()
    for _ in range(1000):  # (a bound: a request that misses its end must fail the test, not hang it)
        if not engine.has_unfinished():
            break
        step()
    assert not engine.has_unfinished()
    return outputs, column_steps


@pytest.mark.parametrize("overlap", [False, True])
def test_columns_give_the_outputs_the_rows_give(tiny_model, overlap):
    written = _greedy(tiny_model)
    (outputs, column_steps), (reference, none) = (_drive(tiny_model, c, overlap, written) for c in (True, False))
    assert none == 0
    assert column_steps >= 40, column_steps  # most steps of the steady stretches
    reasons = collections.Counter(out[_COMPARED.index("finish_reason")] for out in reference)
    assert reasons["stop"] >= 3 and reasons["length"] >= 10, reasons  # stop tokens were met, lengths reached
    assert outputs == reference


def test_a_run_with_a_row_that_is_not_plain_goes_row_by_row(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig())
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=12, ignore_eos=True))
    engine.add_request([8, 9], SamplingParams(max_tokens=12, ignore_eos=True, stop=["zz"]))
    kinds = [type(engine.step()) for _ in range(10)]
    assert StepOutputs not in kinds


def _columns() -> StepOutputs:
    columns = RunColumns(["a", "b"], [3, 30], [5, 6], [1.0, 2.0], [1.5, 2.5], [1.75, 2.75], [0, 16])
    return StepOutputs(columns, [7, 8], ["x", "y"], [2, 3])


def test_step_outputs_are_request_outputs_when_read():
    made = _columns()
    assert len(made) == 2 and made[1].request_id == "b"
    assert list(made) == [
        RequestOutput("a", 3, [7], "x", (), None, 5, 2, False, None, 1.0, 1.5, 1.75, num_cached_tokens=0),
        RequestOutput("b", 30, [8], "y", (), None, 6, 3, False, None, 2.0, 2.5, 2.75, num_cached_tokens=16)]
    assert made[0] is made[0]  # made once


def test_step_outputs_cross_a_pipe_as_columns_and_come_out_as_rows():
    rows = _columns()
    rows.make = output_row  # what the engine process sends (LLMEngine.emit_rows)
    back = pickle.loads(pickle.dumps(rows))
    assert back._items is None  # nothing was made before it crossed
    assert [RequestOutput(*row) for row in back] == list(_columns())
