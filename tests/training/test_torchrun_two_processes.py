"""`balcony train` under torchrun, 2 CPU processes on gloo, matches the 1-process run on the same data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from balcony_runtime.training.config import TrainConfig
from balcony_runtime.training.data import DataConfig
from balcony_runtime.training.trainer import train


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_gloo_processes_match_one_process(text_corpus, tiny_model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # One process: 2 sequences per forward. Two processes: 1 each; the same 2 global sequences a step.
    train(TrainConfig(
        data=DataConfig((str(text_corpus),), seq_len=32, heldout_fraction=0.1, seed=3), output_dir=str(one),
        model=str(tiny_model_dir), exits=(1, 2, 3), device="cpu", autocast="off", micro_batch_size=2,
        max_steps=3, log_every=1, kl_chunk=24,
    ), log=lambda _: None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "server.cli", "train", str(text_corpus), "--model", str(tiny_model_dir), "--exits", "1,2,3",
        "--seq-len", "32", "--heldout-fraction", "0.1", "--seed", "3", "--device", "cpu", "--autocast", "off",
        "--micro-batch-size", "1", "--max-steps", "3", "--log-every", "1", "--kl-chunk", "24",
        "--threads", "1", "--output-dir", str(two),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]

    log_one, log_two = read_log(one / "log.jsonl"), read_log(two / "log.jsonl")
    assert [r["tokens_seen"] for r in log_one] == [r["tokens_seen"] for r in log_two] == [64, 128, 192]
    for a, b in zip(log_one, log_two):  # same gradients (their global norm, before clipping) and losses
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"]
        for k in a["loss"]:
            assert abs(a["loss"][k] - b["loss"][k]) <= 1e-4 * a["loss"][k]
    p1 = load_file(str(one / "checkpoint" / "balconies.safetensors"))
    p2 = load_file(str(two / "checkpoint" / "balconies.safetensors"))
    for name in p1:
        torch.testing.assert_close(p1[name], p2[name], rtol=1e-4, atol=1e-6)
    assert (two / "adapters" / "balcony.safetensors").is_file()
