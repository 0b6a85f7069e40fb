"""Start-up calibration of the latency model through the real engine (tiny model)."""

from __future__ import annotations

import pytest

from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.latency_model import calibrate


def test_calibration_measures_every_exit_and_leaves_the_engine_idle(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=1024, max_num_seqs=12))
    model = calibrate(engine, batch=4, steps=2, prompt_tokens=24, burst=40)
    assert set(model.costs) == set(engine.exits)
    for cost in model.costs.values():
        assert cost.decode_base_s > 0 and cost.decode_per_row_s >= 0 and cost.prefill_per_token_s >= 0
        assert cost.prefill_per_pair_s >= 0 and cost.decode_per_context_s >= 0
    # The attention terms are measured at full depth and shared out by attention layers run.
    full = model.costs[engine.exits[-1]]
    for exit_layer, cost in model.costs.items():
        share = len(engine.model.cache_layers_of(exit_layer)) / len(engine.model.cache_layers_of(engine.exits[-1]))
        assert cost.prefill_per_pair_s == pytest.approx(full.prefill_per_pair_s * share)
        assert cost.decode_per_context_s == pytest.approx(full.decode_per_context_s * share)
    # Warm-up burst (capped at max_num_seqs) and measuring requests are all gone, blocks returned.
    assert not engine.has_unfinished()
    assert engine.blocks.num_used_blocks == 0


def test_calibration_fits_its_long_prompt_into_a_small_kv_cache(tiny_model):
    # The tiny model takes 256 tokens; give the cache room for about 150 at full depth, so the
    # long-prompt measurement (capped at the model length, 247 tokens) must shrink instead of failing.
    layers = len(tiny_model.model.cache_layers_of(tiny_model.model.full_depth))
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=10 * layers, max_num_seqs=4))
    model = calibrate(engine, batch=2, steps=2, prompt_tokens=24, burst=4)
    assert all(cost.prefill_per_pair_s >= 0 for cost in model.costs.values())
    assert not engine.has_unfinished() and engine.blocks.num_used_blocks == 0
