"""The direct config and tokenizer readers agree with transformers' auto classes, and fall back to
them whenever a file leaves something to transformers' defaults."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from balcony_runtime import backbone_files
from balcony_runtime.backbone_files import load_tokenizer, read_backbone_config
from balcony_runtime.config import ModelArch


def _auto(path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return ModelArch.from_hf_config(config), backbone_files.rope_frequencies(config)


def _variant(tmp_path, source_dir, edit):
    """A copy of source_dir's config (and tokenizer files) with ``edit`` applied to the config dict."""
    target = tmp_path / "variant"
    target.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (source_dir / name).is_file():
            shutil.copy(source_dir / name, target / name)
    raw = json.loads((source_dir / "config.json").read_text())
    edit(raw)
    (target / "config.json").write_text(json.dumps(raw))
    return target


def _no_auto_config(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("AutoConfig was used for a config the direct path can read")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)


def test_default_model_config_is_read_directly_and_matches_transformers(default_model, monkeypatch):
    arch, (inv_freq, scaling) = _auto(default_model.path)
    _no_auto_config(monkeypatch)
    direct = read_backbone_config(default_model.path)
    assert direct.arch == arch
    assert torch.equal(direct.inv_freq, inv_freq) and direct.attention_scaling == scaling


def test_transformers4_layout_with_rope_theta_is_read_directly(tiny_model_dir, tmp_path, monkeypatch):
    def to_v4(raw):
        raw["rope_theta"] = raw.pop("rope_parameters")["rope_theta"]

    path = _variant(tmp_path, tiny_model_dir, to_v4)
    arch, (inv_freq, _) = _auto(path)
    _no_auto_config(monkeypatch)
    direct = read_backbone_config(path)
    assert direct.arch == arch and torch.equal(direct.inv_freq, inv_freq)


@pytest.mark.parametrize("edit", [
    lambda raw: raw.pop("num_key_value_heads"),  # transformers' default applies (= query heads)
    lambda raw: raw.pop("rms_norm_eps"),
    lambda raw: raw.update(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
], ids=["missing-kv-heads", "missing-eps", "llama3-rope"])
def test_configs_the_direct_path_cannot_read_go_through_transformers(tiny_model_dir, tmp_path, edit):
    path = _variant(tmp_path, tiny_model_dir, edit)
    raw = json.loads((path / "config.json").read_text())
    assert backbone_files._direct_config(raw) is None
    arch, (inv_freq, scaling) = _auto(path)
    read = read_backbone_config(path)
    assert read.arch == arch and torch.equal(read.inv_freq, inv_freq) and read.attention_scaling == scaling


def test_generic_fast_tokenizer_matches_auto_tokenizer(default_model):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(default_model.path)
    direct = load_tokenizer(default_model.path)
    assert type(direct) is type(reference)
    text = "Grüße, 東京! def f(x):\n    return x ** 2  # ünïcödé 🙂"
    ids = reference(text)["input_ids"]
    assert direct(text)["input_ids"] == ids
    assert direct.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "What is 2+2?"}]
    assert (direct.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert (direct.eos_token_id, direct.bos_token_id, direct.all_special_ids) == (
        reference.eos_token_id, reference.bos_token_id, reference.all_special_ids)


def test_model_specific_tokenizer_class_goes_through_auto_tokenizer(default_model, tmp_path, monkeypatch):
    import transformers

    path = _variant(tmp_path, default_model.path, lambda raw: None)
    settings = json.loads((path / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "SomeModelTokenizer"
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    seen = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda p, **kw: seen.append(p) or "auto")
    assert load_tokenizer(path) == "auto" and seen == [path]


def test_unreadable_config_is_a_model_source_error(tmp_path):
    from balcony_runtime.errors import ModelSourceError

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="could not read"):
        read_backbone_config(tmp_path)
