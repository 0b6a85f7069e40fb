"""Choosing the CPU's dtype and weight format by measurement, and refusing what cannot run."""

from __future__ import annotations

import json

import pytest
import torch

from balcony_runtime.config import ModelArch
from balcony_runtime.model.packed_weights import Bf16Weight
from balcony_runtime.weight_format import candidates, choose_cpu_weights, describe, resolve_weights


@pytest.fixture
def arch(tiny_model):
    return tiny_model.model.arch


def test_candidates_follow_the_flags():
    # oneDNN's packed bf16 joins where this CPU has a bf16 path, under fp32 activations only
    onednn = [(torch.float32, "bf16"), (torch.float32, "fp16+bf16")] if Bf16Weight.supported() else []
    assert candidates("auto", "auto") == [(torch.float32, "none"), (torch.float32, "fp16"), *onednn,
                                          (torch.bfloat16, "none")]
    assert candidates("auto", "bf16") == [(torch.float32, "bf16"), (torch.bfloat16, "bf16")]  # asked: both timed
    assert candidates("bfloat16", "bf16") == [(torch.bfloat16, "bf16")]
    assert candidates("auto", "fp16+bf16") == [(torch.float32, "fp16+bf16")]  # FBGEMM's half: fp32 only
    assert candidates("float32", "auto") == [(torch.float32, "none")]  # an explicit dtype keeps its weights
    assert candidates("float32", "fp16") == [(torch.float32, "fp16")]
    assert candidates("bfloat16", "auto") == [(torch.bfloat16, "none")]  # fp16 weights need fp32 activations
    assert candidates("auto", "int8") == [(torch.float32, "int8"), (torch.bfloat16, "int8")]
    assert candidates("float32", "none") == [(torch.float32, "none")]


def test_measured_choice_is_the_fastest_and_is_cached(arch: ModelArch, tmp_path, idle_machine):
    first = choose_cpu_weights(arch, "auto", "auto", tmp_path)
    # the split is timed only where oneDNN's bf16 wins somewhere
    assert not first.cached and len(first.timings_ms) in ((4, 5) if Bf16Weight.supported() else (3,))
    split = first.timings_ms.get("float32 + fp16+bf16 weights")
    assert (first.bf16_from_rows is not None) == (first.quantization == "fp16+bf16")
    assert all(len(ms) == 2 and min(ms) > 0 for ms in first.timings_ms.values())
    best = min(first.timings_ms, key=lambda label: first.timings_ms[label][0] * first.timings_ms[label][1])
    assert first.label == best
    again = choose_cpu_weights(arch, "auto", "auto", tmp_path)
    assert again.cached and (again.dtype, again.quantization) == (first.dtype, first.quantization)
    assert again.bf16_from_rows == first.bf16_from_rows
    del split
    assert "cached" in describe(again) and first.label in describe(again)


def test_a_corrupt_or_foreign_cache_entry_is_measured_again(arch, tmp_path, idle_machine):
    choose_cpu_weights(arch, "auto", "auto", tmp_path)
    (entry,) = tmp_path.iterdir()
    entry.write_text("{not json")
    assert not choose_cpu_weights(arch, "auto", "auto", tmp_path).cached
    data = json.loads(entry.read_text())
    data["key"] = "another machine"
    entry.write_text(json.dumps(data))
    assert not choose_cpu_weights(arch, "auto", "auto", tmp_path).cached


def test_explicit_flags_are_not_measured(arch, tmp_path):
    choice = resolve_weights("float32", "int8", torch.device("cpu"), arch, tmp_path)
    assert (choice.dtype, choice.quantization, choice.timings_ms) == (torch.float32, "int8", {})
    assert not list(tmp_path.iterdir())


def test_gpu_keeps_its_exact_path_and_refuses_cpu_formats(arch):
    gpu = torch.device("cuda")
    assert resolve_weights("auto", "auto", gpu, arch, None).quantization == "none"
    assert resolve_weights("auto", "auto", gpu, arch, None).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="CPU weight format"):
        resolve_weights("auto", "int8", gpu, arch, None)


@pytest.mark.parametrize("dtype, quantization, message", [
    ("bfloat16", "fp16", "float32 activations"),
    ("float64", "none", "unknown dtype"),
    ("float32", "int4", "unknown quantization"),
])
def test_bad_combinations_are_refused(arch, dtype, quantization, message):
    with pytest.raises(ValueError, match=message):
        resolve_weights(dtype, quantization, torch.device("cpu"), arch, None)


def test_split_crossover_is_where_bf16_wins_from_then_on():
    import balcony_runtime.weight_format as wf

    fake = wf.split_crossover

    assert wf.SPLIT_ROWS == (2, 4, 8, 16, 32, 64)
    assert fake([1, 1, 1, 2, 4, 8], [2, 2, 2, 1, 2, 4]) == 16
    assert fake([1, 1, 1, 2, 4, 8], [2, 2, 2, 1, 5, 4]) == 64  # a loss at 32: only from 64 on
    assert fake([1, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2]) is None  # never
    assert fake([2, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1]) == 2


def test_a_verdict_measured_beside_other_busy_processes_is_not_cached(arch, tmp_path):
    """A CPU hog next to the measurement: the verdict serves this start only, and says why."""
    import multiprocessing

    hog = multiprocessing.get_context("spawn").Process(target=_spin, args=(30.0,), daemon=True)
    hog.start()
    try:
        choice = choose_cpu_weights(arch, "auto", "auto", tmp_path)
    finally:
        hog.kill()
        hog.join()
    assert choice.others_cores is not None and choice.others_cores >= 0.5
    assert not list(tmp_path.iterdir())
    assert "not cached" in describe(choice)


def _spin(seconds: float) -> None:
    import time as clock

    end = clock.perf_counter() + seconds
    while clock.perf_counter() < end:
        pass
