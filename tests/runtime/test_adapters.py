"""Adapters on disk: round trip, refusal on the wrong backbone, clear errors on corrupt files."""

from __future__ import annotations

import json

import pytest
import torch

from balcony_runtime.adapters import AdapterMeta, save_adapters
from balcony_runtime.errors import AdapterError
from balcony_runtime.loader import balcony_state, load_model


def save_from(loaded, path, fingerprint=None):
    meta = AdapterMeta(
        backbone_identity=loaded.identity,
        backbone_fingerprint=fingerprint or loaded.fingerprint,
        num_layers=loaded.model.full_depth,
        exits=list(loaded.model.exits),
        dtype="float32",
        training={"command": "test"},
        evaluation={"note": "none"},
    )
    save_adapters(path, meta, balcony_state(loaded.model), torch.float32)
    return meta


def test_round_trip(tiny_model, tiny_model_dir, tmp_path):
    save_from(tiny_model, tmp_path)
    reloaded = load_model(str(tiny_model_dir), adapters=tmp_path, dtype="float32", device="cpu")
    assert reloaded.adapters.exits == list(tiny_model.model.exits)
    assert reloaded.adapters.training == {"command": "test"}
    for k in tiny_model.model.exits:
        ours = tiny_model.model.balconies[str(k)].state_dict()
        theirs = reloaded.model.balconies[str(k)].state_dict()
        assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    # The perturbed balconies differ from a fresh copy of the last layer, so loading did something.
    fresh = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2, 3), dtype="float32", device="cpu")
    assert not torch.equal(fresh.model.balconies["2"].layer.qkv_proj, reloaded.model.balconies["2"].layer.qkv_proj)


def test_refused_on_another_backbone(tiny_model, tiny_model_dir, tmp_path):
    save_from(tiny_model, tmp_path, fingerprint="0" * 64)
    with pytest.raises(AdapterError, match="were made for backbone"):
        load_model(str(tiny_model_dir), adapters=tmp_path, dtype="float32", device="cpu")


def test_corrupt_weights_give_clear_error(tiny_model, tiny_model_dir, tmp_path):
    save_from(tiny_model, tmp_path)
    (tmp_path / "balcony.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError, match="corrupt or not a safetensors file"):
        load_model(str(tiny_model_dir), adapters=tmp_path, dtype="float32", device="cpu")


def test_corrupt_or_missing_meta(tiny_model, tiny_model_dir, tmp_path):
    save_from(tiny_model, tmp_path)
    (tmp_path / "balcony.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not a valid balcony.json"):
        load_model(str(tiny_model_dir), adapters=tmp_path, dtype="float32", device="cpu")
    (tmp_path / "balcony.json").unlink()
    with pytest.raises(AdapterError, match="balcony.json is missing"):
        load_model(str(tiny_model_dir), adapters=tmp_path, dtype="float32", device="cpu")


def test_truncated_weights_are_refused(tiny_model, tiny_model_dir, tmp_path):
    save_from(tiny_model, tmp_path)
    weights = tmp_path / "balcony.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterError):
        load_model(str(tiny_model_dir), adapters=tmp_path, dtype="float32", device="cpu")


def test_meta_is_plain_json(tiny_model, tmp_path):
    save_from(tiny_model, tmp_path)
    raw = json.loads((tmp_path / "balcony.json").read_text())
    assert raw["exits"] == [1, 2, 3] and raw["backbone_fingerprint"] == tiny_model.fingerprint
