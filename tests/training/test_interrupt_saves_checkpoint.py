"""Ctrl-C finishes the current step, saves a checkpoint and exits 130; the run then resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ctrl_c_checkpoints_and_resumes(text_corpus, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "server.cli", "train", str(text_corpus), "--model", str(tiny_model_dir),
               "--exits", "1,2,3", "--seq-len", "32", "--device", "cpu", "--micro-batch-size", "1",
               "--max-steps", "100000", "--log-every", "1", "--save-every", "100000", "--threads", "1",
               "--output-dir", str(out)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.startswith("step 2/"):
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, rest[-2000:]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    logged = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert state["step"] == logged[-1] >= 2

    resumed = subprocess.run(command[:-2] + ["--output-dir", str(out), "--stop-after", str(state["step"] + 1)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {state['step']}" in resumed.stderr
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == state["step"] + 1
