"""The training process's device: a plain ``cuda`` (what ``--device cuda`` and bench/gpu_train.py
pass) must become an indexed device, which torch.cuda.set_device requires."""

from __future__ import annotations

import torch

from balcony_runtime.training.trainer import Distributed


def test_a_plain_cuda_device_gets_this_process_gpu_index(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = Distributed("cuda")
    assert env.device == torch.device("cuda", 2)
    assert chosen == [torch.device("cuda", 2)]


def test_an_indexed_cuda_device_is_kept(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Distributed("cuda:1").device == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", 1)]


def test_the_cpu_is_left_alone():
    assert Distributed("cpu").device == torch.device("cpu")
