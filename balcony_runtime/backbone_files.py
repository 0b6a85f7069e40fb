"""A backbone directory's config.json and tokenizer, read without transformers' auto classes where
the files allow it.

Why: ``AutoConfig`` and ``AutoTokenizer`` import the LLaMA modelling stack (activations, hub kernels,
``torch.distributed.tensor``): seconds of every start for values a JSON file holds. A plain LLaMA
config with the default rotary embedding and a ``tokenizer.json`` whose class is the generic fast
tokenizer are read directly; anything else (a missing key whose default lives in transformers, a
scaled rotary embedding, a model-specific tokenizer class) goes through the auto classes as before,
so the result is the same either way (tests/runtime/test_backbone_files.py checks both paths agree).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from balcony_runtime.config import ModelArch
from balcony_runtime.errors import ModelSourceError

# Keys whose transformers defaults the direct path would otherwise have to repeat.
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings")
# Tokenizer classes that are exactly the generic fast tokenizer over tokenizer.json.
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


@dataclass(frozen=True)
class BackboneConfig:
    arch: ModelArch
    inv_freq: torch.Tensor  # [head_dim / 2] RoPE inverse frequencies
    attention_scaling: float  # cos/sin scaling of the rotary variant (1.0 for the plain one)


def read_backbone_config(path: Path) -> BackboneConfig:
    raw = _read_json(path / "config.json")
    direct = _direct_config(raw) if raw is not None else None
    if direct is None:
        from transformers import AutoConfig

        try:
            direct = AutoConfig.from_pretrained(path)
        except Exception as exc:
            raise ModelSourceError(f"could not read the model config at {path}: {exc}") from exc
    arch = ModelArch.from_hf_config(direct)
    inv_freq, scaling = rope_frequencies(direct)
    return BackboneConfig(arch, inv_freq, scaling)


def _direct_config(raw: dict) -> SimpleNamespace | None:
    """The config as attributes when every value the runtime reads is in the file and the rotary
    embedding is the plain one; None sends the caller to AutoConfig."""
    if raw.get("model_type") != "llama" or any(raw.get(key) is None for key in _REQUIRED_KEYS):
        return None
    params = raw.get("rope_parameters")
    if params is None:  # transformers 4's layout: rope_theta beside an optional rope_scaling
        if raw.get("rope_scaling") is not None or raw.get("rope_theta") is None:
            return None
        params = {"rope_type": "default", "rope_theta": raw["rope_theta"]}
    if not isinstance(params, dict) or params.get("rope_type") != "default" or "rope_theta" not in params:
        return None
    return SimpleNamespace(**{**raw, "rope_parameters": params})


def rope_frequencies(hf_config) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies [head_dim / 2] and cos/sin scaling, as LlamaRotaryEmbedding computes
    them, without importing transformers' modeling_llama (seconds of start-up for one formula):
    the plain rotary inline, the scaled variants (llama3, yarn, ...) from transformers' table."""
    params = hf_config.rope_parameters
    if params["rope_type"] != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config)
    base = params["rope_theta"]
    dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


def load_tokenizer(path: Path):
    """The backbone's tokenizer (a transformers tokenizer either way)."""
    settings = _read_json(path / "tokenizer_config.json") or {}
    if settings.get("tokenizer_class") in _GENERIC_TOKENIZERS and (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _read_json(file: Path) -> dict | None:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"could not read {file}: {exc}") from exc
