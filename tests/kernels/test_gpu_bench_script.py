"""bench/gpu_kernels.py keeps working while no GPU is at hand: its --smoke mode runs every section,
check and report path on tiny shapes through the interpreter, and without CUDA it stops politely."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_kernels_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_smoke_run_writes_a_report(bench, tmp_path, capsys):
    out = tmp_path / "report.md"
    assert bench.main(["--smoke", "--goal-batch", "3", "--out", str(out)]) == 0
    report = out.read_text()
    for kernel in bench.KERNELS:
        assert f"| {kernel} |" in report
    assert "**FAIL**" not in report
    assert "of copy bandwidth at batch 3" in report  # the goal lines were produced
    assert "fused MLP within 10% of cuBLAS" in report
    # Every split count timed, the launcher's own marked, and summed up against the fastest.
    assert all(f"B=3 ctx=40 splits={n} " in report for n in (1, 2, 4, 8, 16))
    assert report.count("the launcher's choice") == 2  # its split, and its tile below
    assert "| tiny (smoke) | 3 | 1 |" in report
    # decode_attention's tile and launch likewise: the swept ones and its defaults, summed up.
    assert all(f"B=3 ctx=40 splits=1 {tile} " in report for tile in ("n16/w1/s1", "n32/w2/s2", "n64/w4/s2"))
    assert "| tiny (smoke) | 3 | n64/w4/s2 |" in report
    assert all(f"T=7 H=96 rows/program={n} warps={w} " in report for n in (1, 2, 4, 8) for w in (1, 2, 4, 8))
    assert "| tiny (smoke) | 7 | 1/1 |" in report  # rms_norm's rows per program and warps, summed up likewise
    # Memory-bound rows are also set beside a copy of the same bytes, in the table and the goals.
    rms_rows = [line for line in report.splitlines() if line.startswith("| rms_norm | tiny") and "bfloat16" in line]
    assert rms_rows and all(line.split("|")[10].strip().endswith("%") for line in rms_rows)
    assert "a same-size copy's time:" in report


def test_the_same_size_copy_reads_and_writes_the_bytes_given(bench):
    timed = bench.Bench(bench.torch.device("cpu"), smoke=True, warmup_ms=1, rep_ms=1)
    assert timed.same_size_copy_ms(1000) == timed.same_size_copy_ms(1000)  # timed once per size
    assert set(timed._copy_ms) == {500}  # 500 bytes read and 500 written


def test_without_cuda_it_says_so_and_exits_cleanly(bench, capsys, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 0
    assert "No CUDA device" in capsys.readouterr().out
