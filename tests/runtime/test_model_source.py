"""Model sources: clear errors for missing paths, unsupported architectures, unreachable hubs."""

from __future__ import annotations

import json

import pytest
import torch

from balcony_runtime.errors import ModelSourceError
from balcony_runtime.loader import load_model
from balcony_runtime.model_source import resolve_model


def test_missing_directory(tmp_path):
    with pytest.raises(ModelSourceError, match="model path not found"):
        resolve_model(str(tmp_path / "nope"))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelSourceError, match="model file not found"):
        resolve_model(str(tmp_path / "model.gguf"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2})
    )
    with pytest.raises(ModelSourceError, match="unsupported architecture"):
        load_model(str(tmp_path), adapters=None)


def test_unreachable_hub_id_names_the_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="no-such-org/no-such-model"):
        resolve_model("no-such-org/no-such-model")


def test_default_alias_is_cached_as_plain_hf_directory(default_model):
    path = default_model.path
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    again = resolve_model("smollm2-135m")  # no download or conversion the second time
    assert again.path == path


def test_gguf_file_source_loads(default_model, tmp_path, monkeypatch):
    """A .gguf path converts once into the cache and loads like the alias."""
    from balcony_runtime.model_source import balcony_home

    gguf = balcony_home() / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setenv("BALCONY_HOME", str(tmp_path))
    resolved = resolve_model(str(gguf))
    assert resolved.path.is_relative_to(tmp_path) and (resolved.path / "config.json").is_file()


@pytest.mark.parametrize("rope_parameters", [
    None,  # the model's own (default rope)
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
])
def test_rope_frequencies_equal_transformers_rotary_embedding(tiny_model_dir, rope_parameters):
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from balcony_runtime.backbone_files import rope_frequencies

    config = AutoConfig.from_pretrained(tiny_model_dir)
    if rope_parameters is not None:
        config.rope_parameters = rope_parameters
    reference = LlamaRotaryEmbedding(config)
    inv_freq, scaling = rope_frequencies(config)
    assert torch.equal(inv_freq, reference.inv_freq) and scaling == reference.attention_scaling
