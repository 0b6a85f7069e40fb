"""A tiny random LLaMA with three balconies and a small text corpus, for training tests."""

from __future__ import annotations

import random

import pytest
import torch

from balcony_runtime.loader import load_model

WORDS = ("the model reads a token and writes the next one while the balcony learns from the full "
         "depth teacher python docs describe functions classes modules and errors in plain words").split()


def write_corpus(directory, num_files: int = 12, words_per_file: int = 300, seed: int = 0):
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(num_files):
        lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(words_per_file // 12)]
        (directory / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def tiny_trainable(tiny_model_dir):
    """Fresh tiny model (4 layers, exits 1, 2, 3) whose balconies differ from the last layer."""
    loaded = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2, 3), dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k in loaded.model.exits:
            for p in loaded.model.balconies[str(k)].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.float().std().clamp_min(0.1))
                p.requires_grad_(True)
    return loaded
