"""bench/sampler_cost.py: the sampler's cost per setting on a model's real logits, and what each
setting keeps."""

from __future__ import annotations

import torch


def test_each_setting_is_timed_and_keeps_what_it_asks_for(bench_script, tiny_model_dir):
    with bench_script("sampler_cost") as sampler_cost:
        logits = sampler_cost.passage_logits(3, str(tiny_model_dir))
        assert logits.shape[0] == 3 and torch.isfinite(logits).all()
        kept = {}
        for name, temperature, top_k, top_p in sampler_cost.SETTINGS:
            whole, cpu_path, kept[name] = sampler_cost.time_setting(logits, temperature, top_k, top_p, repeats=2)
            assert whole > 0 and cpu_path > 0
    vocab = logits.shape[1]
    assert kept["greedy"] == 1 and kept["temperature 0.8"] == vocab
    assert 1 <= kept["top-k 50"] <= min(50, vocab) and kept["top-k 50, top-p 0.95"] <= kept["top-k 50"]
    assert 1 <= kept["top-p 0.95"] < vocab
