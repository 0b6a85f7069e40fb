"""bench/engine_rows.py: both ways run the same steps, and the benchmark reports each side of each."""

from __future__ import annotations

from balcony_runtime.loader import load_model


def test_both_ways_step_and_are_timed(bench_script, tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), adapters=None, dtype="float32", device="cpu")
    with bench_script("engine_rows") as engine_rows:
        result = engine_rows.measure(loaded, rows=3, context=20, steps=4)
    assert set(result) == {"rows", "columns"}
    assert all(set(sides) == {"engine", "http"} and all(ms > 0 for ms in sides.values()) for sides in result.values())
