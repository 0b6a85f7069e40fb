"""The calibration cache: a hit skips measuring, any change of key measures again, --recalibrate
measures and replaces. On a fake engine (no model): what counts is which steps run."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from balcony_runtime.routing.calibration import calibrate
from balcony_runtime.routing.calibration_cache import CalibrationCache, CalibrationKey
from balcony_runtime.routing.step_cost import RowShape, StepCostModel, StepShape

FULL_DEPTH = 6


class FakeEngine:
    """What calibrate() uses of LLMEngine: every waiting request prefills in one step, then each
    running request decodes one token per step, each step taking 20 us per layer it runs (so the
    fit sees depth cost time, as with a real model, and calibration measures its plan once);
    ``steps`` counts the steps run."""

    def __init__(self, exits=(2, 4, FULL_DEPTH), fingerprint="abc", max_num_seqs=8):
        self.exits = exits
        self.config = SimpleNamespace(max_num_seqs=max_num_seqs)
        balconies = {str(e): SimpleNamespace(lens=None) for e in exits if e < FULL_DEPTH}
        self.model = SimpleNamespace(
            full_depth=FULL_DEPTH, exits=tuple(e for e in exits if e < FULL_DEPTH), balconies=balconies,
            norm=SimpleNamespace(device=torch.device("cpu")), dtype=torch.float32,
            ops=SimpleNamespace(name="torch", native=None), quantization="none", arch="tiny-arch", cache_layers_of=lambda e: range(e + 1),
        )
        self.loaded = SimpleNamespace(identity="fake-model", fingerprint=fingerprint, max_model_len=512)
        self.blocks = SimpleNamespace(fits_at_all=lambda layers, tokens: True)
        self.requests: dict[str, dict] = {}
        self.last_step = None
        self.steps = 0

    def add_request(self, prompt, params, exit_layer):
        rid = f"r{len(self.requests)}-{self.steps}"
        self.requests[rid] = {"exit": exit_layer, "tokens": len(prompt), "prefilled": False}
        return rid

    def request_needs_prefill(self, rid) -> bool:
        return rid in self.requests and not self.requests[rid]["prefilled"]

    def abort(self, rid) -> None:
        self.requests.pop(rid, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list:
        self.steps += 1
        waiting = [r for r in self.requests.values() if not r["prefilled"]]
        if waiting:
            rows = [RowShape(r["exit"], r["tokens"], 0) for r in waiting]
            for r in waiting:
                r["prefilled"] = True
        else:
            rows = [RowShape(r["exit"], 1, r["tokens"]) for r in self.requests.values()]
            for r in self.requests.values():
                r["tokens"] += 1
        shape = StepShape.of(rows, FULL_DEPTH)
        end = time.perf_counter() + 20e-6 * shape.layers
        while time.perf_counter() < end:  # the step's work
            pass
        self.last_step = SimpleNamespace(shape=shape)
        return []


def small(engine, cache, **kwargs):
    return calibrate(engine, batch=2, steps=2, prompt_tokens=16, burst=4, long_prompt_tokens=64, cache=cache,
                     **kwargs)


def fitted_model() -> StepCostModel:
    model = StepCostModel(FULL_DEPTH)
    shapes = [StepShape.of([RowShape(e, n, 0)] * rows, FULL_DEPTH)
              for e in (2, 4, FULL_DEPTH) for n in (1, 16) for rows in (1, 4)]
    model.fit([(shape, 1e-3 * (1 + shape.layers + 0.01 * shape.prefill_token_layers)) for shape in shapes])
    return model


def key(**changes) -> CalibrationKey:
    base = CalibrationKey(model="m abc", structure="arch exits=[2, 4, 6]", dtype="float32", device="cpu",
                          threads=2, machine="AMD EPYC x2", software="torch 2", settings="{}")
    return dataclasses.replace(base, **changes)


def test_an_entry_reads_back_as_the_same_model(tmp_path):
    cache = CalibrationCache(tmp_path)
    model = fitted_model()
    path = cache.store(key(), model, seconds=12.5)
    hit = cache.load(key(), FULL_DEPTH)
    assert hit is not None and hit.path == path and hit.seconds == 12.5
    assert hit.model.coefficients == pytest.approx(model.coefficients)
    assert hit.model.anchors == model.anchors  # kept, so live refits still see every exit's shape
    shape = StepShape.of([RowShape(4, 1, 100)] * 3, FULL_DEPTH)
    assert hit.model.seconds(shape) == pytest.approx(model.seconds(shape))


@pytest.mark.parametrize("change", [dict(threads=1), dict(machine="Intel Xeon x2"), dict(dtype="bfloat16"),
                                    dict(model="m other-weights"), dict(structure="arch exits=[4, 6]"),
                                    dict(format_version=999)])
def test_any_change_of_key_misses(tmp_path, change):
    cache = CalibrationCache(tmp_path)
    cache.store(key(), fitted_model(), seconds=1.0)
    assert cache.load(key(**change), FULL_DEPTH) is None
    assert cache.load(key(), FULL_DEPTH) is not None


def test_a_damaged_or_foreign_entry_is_a_miss_not_a_crash(tmp_path, caplog):
    cache = CalibrationCache(tmp_path)
    path = cache.store(key(), fitted_model(), seconds=1.0)
    entry = json.loads(path.read_text())
    entry["key"]["threads"] = 64  # as if another key had hashed to this file
    path.write_text(json.dumps(entry))
    assert cache.load(key(), FULL_DEPTH) is None
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="balcony.calibration"):
        assert cache.load(key(), FULL_DEPTH) is None
    assert "unreadable" in caplog.text


def test_a_hit_skips_measuring_and_a_key_change_measures_again(tmp_path, idle_machine):
    cache = CalibrationCache(tmp_path)
    first = FakeEngine()
    phases = []
    measured = small(first, cache, on_phase=phases.append)
    assert phases == ["warm-up", "calibration"]
    assert len(list(tmp_path.glob("*.json"))) == 1 and measured.anchors

    again = FakeEngine()
    phases.clear()
    cached = small(again, cache, on_phase=phases.append)
    assert phases == ["warm-up", "calibration"]
    assert cached.coefficients == pytest.approx(measured.coefficients)
    assert again.steps <= 2  # the warm-up's one batch (prefill, one decode), nothing measured
    assert first.steps > 5 * again.steps

    other_weights = FakeEngine(fingerprint="def")
    small(other_weights, cache)
    assert other_weights.steps == first.steps
    assert len(list(tmp_path.glob("*.json"))) == 2

    packed = FakeEngine()
    packed.model.quantization = "fp16"  # same weights, another format: another step cost
    small(packed, cache)
    assert packed.steps == first.steps
    assert len(list(tmp_path.glob("*.json"))) == 3

    # Another build of the native kernels (their sources changed): another step cost.
    for build in ("cpu_decode-aaaa.so", "cpu_decode-bbbb.so"):
        rebuilt = FakeEngine()
        native = SimpleNamespace(path=Path(build), fp16_linear_fast=True)
        rebuilt.model.ops = SimpleNamespace(name="native", native=native)
        small(rebuilt, cache)
        assert rebuilt.steps == first.steps
    assert len(list(tmp_path.glob("*.json"))) == 5


def test_recalibrate_measures_and_replaces_the_entry(tmp_path, idle_machine):
    small(FakeEngine(), CalibrationCache(tmp_path))
    (path,) = tmp_path.glob("*.json")
    before = json.loads(path.read_text())
    path.write_text(json.dumps({**before, "seconds": -1}))

    engine = FakeEngine()
    small(engine, CalibrationCache(tmp_path, reuse=False))
    assert engine.steps > 2
    assert json.loads(path.read_text())["seconds"] >= 0  # rewritten by the new measurement


def test_no_cache_measures_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("BALCONY_HOME", str(tmp_path))  # where a cache would go by default
    engine = FakeEngine()
    model = calibrate(engine, batch=2, steps=2, prompt_tokens=16, burst=4, long_prompt_tokens=64)
    assert model.anchors and engine.steps > 2 and not engine.requests
    assert not list(tmp_path.iterdir())


def test_warm_up_on_a_hit_respects_max_num_seqs(tmp_path, idle_machine):
    cache = CalibrationCache(tmp_path)
    small(FakeEngine(max_num_seqs=1), cache)
    engine = FakeEngine(max_num_seqs=1)
    small(engine, cache)
    assert engine.steps == 2 * len(engine.exits)  # one request per exit, one at a time


def test_a_calibration_measured_beside_busy_processes_is_not_cached(tmp_path, monkeypatch, caplog):
    from balcony_runtime.cpu_contention import CpuContention

    monkeypatch.setattr(CpuContention, "others_cores", lambda self: 1.5)
    with caplog.at_level("WARNING", logger="balcony.calibration"):
        small(FakeEngine(), CalibrationCache(tmp_path))
    assert not list(tmp_path.iterdir())
    assert "not cached" in caplog.text and "1.5 CPU cores" in caplog.text
