"""The decode benchmark behind `balcony bench` and bench/decode_throughput.py, on the tiny model."""

from __future__ import annotations

import pytest

from balcony_runtime.decode_benchmark import engine_decode_rate, ideal_share, markdown_rows, measure_exits
from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.loader import load_model
from server.cli import main


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), adapters=None, dtype="float32", device="cpu")


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_decode_rate_counts_every_decoded_token(tiny, overlap):
    engine = LLMEngine(tiny, EngineConfig(max_num_seqs=4, overlap_steps=overlap))
    generated = []
    original_step = engine.step

    def counting_step():
        outputs = original_step()
        generated.append(sum(len(o.new_token_ids) for o in outputs))
        return outputs

    engine.step = counting_step
    rate, step_s = engine_decode_rate(engine, 3, "full", 5)
    assert rate > 0 and step_s > 0
    # The prefill samples the first token of each request; it is read at once, or with overlapped
    # steps by the next call. The rest are decode tokens, the ones the rate counts.
    first = 1 if overlap else 0
    assert generated[:first] == [0] * first and generated[first] == 3
    assert sum(generated[first + 1 :]) == 3 * 4
    assert not engine.has_unfinished()


def test_measure_exits_covers_every_exit_and_full_depth(tiny):
    rates = measure_exits(tiny, tokens=3, batch=2)
    assert [r.exit_layer for r in rates] == [*tiny.model.exits, tiny.model.full_depth]
    assert rates[-1].ideal_share == 1.0
    assert all(0 < a.ideal_share <= b.ideal_share for a, b in zip(rates, rates[1:]))  # exit k runs k + 1 layers
    rows = markdown_rows("float32", rates, None, tiny.model.full_depth)
    assert len(rows) == len(rates) and rows[-1].startswith("| float32 | full |")
    with pytest.raises(ValueError, match="tokens"):
        measure_exits(tiny, tokens=1, batch=2)


def test_ideal_share_counts_the_balcony_layer(tiny):
    model = tiny.model
    per_layer = sum(p.numel() for p in model.layers[0].parameters())
    expected = (2 * per_layer + model.lm_head.numel()) / (model.full_depth * per_layer + model.lm_head.numel())
    assert ideal_share(model, 1) == pytest.approx(expected)


def test_balcony_bench_prints_a_table_against_transformers(tiny_model_dir, capsys):
    code = main(["bench", "--model", str(tiny_model_dir), "--adapters", "none", "--dtype", "float32",
                 "--device", "cpu", "--tokens", "3", "--batch", "2", "--against-transformers"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| float32 | full |" in out and "| float32 | HF generate |" in out


def test_balcony_bench_refuses_bad_sizes_with_a_message(tiny_model_dir, capsys):
    code = main(["bench", "--model", str(tiny_model_dir), "--adapters", "none", "--device", "cpu", "--tokens", "1"])
    assert code == 2 and "balcony bench: need tokens >= 2" in capsys.readouterr().err
