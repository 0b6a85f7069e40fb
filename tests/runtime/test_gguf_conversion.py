"""The one-pass GGUF conversion writes what transformers' GGUF loader writes, bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from balcony_runtime import gguf_conversion
from balcony_runtime.gguf_conversion import UnsupportedGGUF, convert_gguf, hf_name, unpermute_rotary
from balcony_runtime.model_source import balcony_home


@pytest.fixture(scope="module")
def default_gguf(default_model):
    path = balcony_home() / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), "the default model's download is kept beside its conversion"
    return path


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows, written from its formula."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@pytest.mark.parametrize("num_heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permutation(num_heads):
    weight = np.random.default_rng(0).standard_normal((num_heads * 8, 5)).astype(np.float32)
    permuted = _llama_cpp_permute(weight, num_heads)
    assert not np.array_equal(permuted, weight)
    assert np.array_equal(unpermute_rotary(permuted, num_heads), weight)


def test_tensor_names():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.12.ffn_gate.weight") == "model.layers.12.mlp.gate_proj.weight"
    assert hf_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    with pytest.raises(UnsupportedGGUF):
        hf_name("blk.0.attn_q.bias")
    with pytest.raises(UnsupportedGGUF):
        hf_name("rope_freqs.weight")


def test_conversion_equals_transformers_loader(default_gguf, tmp_path):
    ours, reference = tmp_path / "ours", tmp_path / "transformers"
    ours.mkdir(), reference.mkdir()
    gguf_conversion.convert_llama_gguf(default_gguf, ours)
    gguf_conversion.convert_with_transformers(default_gguf, reference)

    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in reference.iterdir())
    a, b = load_file(ours / "model.safetensors"), load_file(reference / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert json.loads((ours / name).read_text()) == json.loads((reference / name).read_text()), name
    assert (ours / "chat_template.jinja").read_text() == (reference / "chat_template.jinja").read_text()


def test_files_this_pass_cannot_name_go_through_transformers(default_gguf, tmp_path, monkeypatch):
    def refuse(name):
        raise UnsupportedGGUF(f"tensor {name!r} has no LLaMA name here")

    used = []
    monkeypatch.setattr(gguf_conversion, "hf_name", refuse)
    monkeypatch.setattr(gguf_conversion, "convert_with_transformers", lambda g, t: used.append((g, t)))
    convert_gguf(default_gguf, tmp_path)
    assert used == [(default_gguf, tmp_path)] and not list(tmp_path.iterdir())
