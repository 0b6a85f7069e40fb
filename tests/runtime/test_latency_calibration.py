"""Start-up calibration through the real engine (tiny model), on a quiet and on a busy machine."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.routing.step_cost import RowShape
from balcony_runtime.sampling_params import SamplingParams


@pytest.fixture
def cpu_hog():
    """A busy process beside the test, and torch on one thread: a loaded host whose load is steady
    (two torch threads against a hog stall at every barrier the hog's core reaches first, which
    makes single requests vary by more than 2x and says nothing about the model)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    hog.kill()
    hog.wait()


def test_calibration_under_a_cpu_hog_is_monotone_and_predicts_within_2x(tiny_model, cpu_hog):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=1024, max_num_seqs=12))
    # Ten decode steps per run and batches of eight: a 4-layer model's per-layer cost is small beside
    # its fixed cost, and with fewer samples beside the hog, runs of the whole suite twice fitted no
    # per-layer cost at all (every exit equal; the fit of those samples was exact, the samples flat).
    router = engine.calibrate(batch=8, steps=10, prompt_tokens=24, burst=12)
    step_cost = router.model.step_cost
    assert all(c >= 0 for c in step_cost.coefficients)
    for rows in (1, 4, 12):
        steps = [step_cost.step_seconds([RowShape(e, 1, 40)] * rows) for e in engine.exits]
        assert steps == sorted(steps) and steps[0] < steps[-1], steps
    # Warm-up burst and measuring requests are gone, their blocks returned.
    assert not engine.has_unfinished() and engine.blocks.num_used_blocks == 0

    # Requests at each exit, alone, measured against the prediction (median of five: in full runs of
    # the suite on a shared 2-core VM, two of three runs of one request once took twice the third).
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for e in engine.exits:
        predicted = router.model.predict(e, 12, params.max_tokens, engine.load_snapshot()).full_pace_s
        times = []
        for _ in range(5):
            start = time.perf_counter()
            engine.generate([list(range(5, 17))], params, exit_layer=e)
            times.append(time.perf_counter() - start)
        measured = sorted(times)[2]
        assert predicted / 2 <= measured <= 2 * predicted, (e, predicted, times)


def test_calibration_fits_its_long_prompt_into_a_small_kv_cache(tiny_model):
    # The tiny model takes 256 tokens; give the cache room for about 150 at full depth, so the
    # long-prompt measurement (capped at the model length) must shrink instead of failing.
    layers = len(tiny_model.model.cache_layers_of(tiny_model.model.full_depth))
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=10 * layers, max_num_seqs=4))
    router = engine.calibrate(batch=2, steps=2, prompt_tokens=24, burst=4)
    assert all(c >= 0 for c in router.model.step_cost.coefficients)
    assert not engine.has_unfinished() and engine.blocks.num_used_blocks == 0


def test_calibration_fits_its_prompts_into_a_short_model_length(tiny_model):
    # `balcony serve --max-model-len 32`: the default prompts (96 tokens, 1,024 long) plus their
    # decode steps do not fit; calibration measures with shorter ones instead of failing the start.
    import dataclasses

    short = dataclasses.replace(tiny_model, max_model_len=32)
    engine = LLMEngine(short, EngineConfig(num_kv_blocks=512, max_num_seqs=4))
    router = engine.calibrate(batch=2, steps=2, burst=4)
    assert all(c >= 0 for c in router.model.step_cost.coefficients)
    assert not engine.has_unfinished() and engine.blocks.num_used_blocks == 0


def test_calibration_refuses_a_busy_engine(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=256))
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(Exception, match="idle"):
        engine.calibrate()


def test_a_fit_that_puts_no_cost_on_depth_is_told_apart():
    from balcony_runtime.routing.calibration import costs_depth
    from balcony_runtime.routing.step_cost import StepCostModel, StepShape

    exits = (2, 3, 4)
    shapes = [StepShape.of([RowShape(e, 1, 40)] * rows, 4) for e in exits for rows in (1, 2, 8)]
    flat, deep = StepCostModel(4), StepCostModel(4)
    flat.fit([(shape, 1e-3) for shape in shapes])  # every step alike: nothing on the layers
    deep.fit([(shape, 1e-4 * shape.layers + 1e-5 * shape.decode_token_layers) for shape in shapes])
    assert not costs_depth(flat, exits, batch=8, context=40)
    assert costs_depth(deep, exits, batch=8, context=40)
    assert costs_depth(flat, (4,), batch=8, context=40)  # one exit: no depth to trade


@pytest.mark.parametrize("flat_rounds, measured_rounds", [(0, 1), (1, 2), (5, 3)])
def test_calibration_measures_again_while_the_fit_is_flat(tiny_model, monkeypatch, caplog, flat_rounds,
                                                          measured_rounds):
    """While the fit puts no cost on depth the plan is measured again (every round's samples fitted
    together), at most REMEASURES more times; then the flat fit is kept, with a warning."""
    from balcony_runtime.routing import calibration

    fits, plan_runs = [], []
    real_plan = calibration.measuring_plan

    def judged(model, *args):  # the first flat_rounds fits are called flat, whatever they are
        fits.append(len(model.anchors))
        return len(fits) > flat_rounds

    def plan(*args, **kwargs):
        runs = real_plan(*args, **kwargs)
        plan_runs.append(len(runs))
        return runs

    monkeypatch.setattr(calibration, "costs_depth", judged)
    monkeypatch.setattr(calibration, "measuring_plan", plan)
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512, max_num_seqs=4))
    with caplog.at_level("WARNING", logger="balcony.calibration"):
        router = engine.calibrate(batch=2, steps=2, prompt_tokens=16, burst=4)
    assert len(plan_runs) == 1 and len(fits) == measured_rounds  # one plan, measured measured_rounds times
    assert fits == [fits[0] * (i + 1) for i in range(measured_rounds)]  # samples accumulate round by round
    assert sum("measuring again" in r.message for r in caplog.records) == min(flat_rounds, measured_rounds - 1)
    assert any("still do not grow" in r.message for r in caplog.records) == (flat_rounds >= measured_rounds)
    assert all(c >= 0 for c in router.model.step_cost.coefficients)
    assert not engine.has_unfinished() and engine.blocks.num_used_blocks == 0
