"""bench/gpu_check.py keeps working while no GPU is at hand: its --smoke mode runs the engine
parity, throughput, mixed-step, host-time and server sections on a tiny model on the CPU (the
kernel section's own smoke test is tests/kernels/test_gpu_bench_script.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def test_smoke_run_passes_and_reports_every_section(tiny_model_dir, tmp_path):
    out, figures = tmp_path / "report.md", tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--kernel-backend", "torch", "--shape", str(tiny_model_dir),
         "--only", "parity,throughput,mixed,host,server", "--out", str(out), "--json", str(figures)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    for title in ("2. Model parity", "3. Decode throughput", "4. Mixed-depth", "5. Host time", "6. The server"):
        assert title in report
    assert "All checks passed." in report
    data = json.loads(figures.read_text())
    parity = data["figures"]["parity"]
    assert {row["exit"] for row in parity} == {"full", "1", "2", "3"} and all(row["ok"] for row in parity)
    overlap = data["figures"]["overlap_parity"]  # overlapped steps give the synchronous steps' greedy tokens
    assert overlap and all(row["ok"] and row["tokens"] > 0 for row in overlap)
    assert all(row["max_abs_diff"] < 1e-4 for row in parity)  # fp32 on the CPU: exact up to rounding
    host = data["figures"]["host_only"]  # full depth, mixed depths, and mixed through the decode graphs
    assert host and all(row["cpu_ms"] > 0 and row["mixed_cpu_ms"] > 0 and row["mixed_graphs_cpu_ms"] > 0 for row in host)
    assert {row["served"].split(" ")[0] for row in data["figures"]["server"]} == {"full", "exit"}
    engine_process = [row for row in data["figures"]["server"] if row["served"] == "full depth, engine process"]
    assert len(engine_process) == 1 and engine_process[0]["tok_s"] > 0


def test_without_cuda_it_says_so(tiny_model_dir):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert "no CUDA device here" in proc.stdout
