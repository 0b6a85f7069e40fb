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


def give_lenses(model, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    h = model.arch.hidden_size
    for k in model.exits:
        model.balconies[str(k)].set_lens(torch.eye(h) + 0.1 * torch.randn(h, h, generator=g),
                                         0.1 * torch.randn(h, generator=g))


def test_lens_maps_round_trip_and_version_1_still_loads(tiny_model_dir, tmp_path):
    import safetensors.torch

    loaded = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2, 3), dtype="float32", device="cpu")
    give_lenses(loaded.model)
    save_from(loaded, tmp_path / "v2")
    assert json.loads((tmp_path / "v2" / "balcony.json").read_text())["format_version"] == 2
    names = safetensors.torch.load_file(str(tmp_path / "v2" / "balcony.safetensors")).keys()
    assert {"balcony.1.lens.weight", "balcony.1.lens.bias"} <= set(names)
    reloaded = load_model(str(tiny_model_dir), adapters=tmp_path / "v2", dtype="float32", device="cpu")
    for k in loaded.model.exits:
        ours, theirs = loaded.model.balconies[str(k)], reloaded.model.balconies[str(k)]
        assert torch.equal(ours.lens.weight, theirs.lens.weight) and torch.equal(ours.lens.bias, theirs.lens.bias)
    # a version-1 directory (no maps): loads, balconies without maps
    plain = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2, 3), dtype="float32", device="cpu")
    save_from(plain, tmp_path / "v1")
    meta = json.loads((tmp_path / "v1" / "balcony.json").read_text())
    (tmp_path / "v1" / "balcony.json").write_text(json.dumps(meta | {"format_version": 1}))
    old = load_model(str(tiny_model_dir), adapters=tmp_path / "v1", dtype="float32", device="cpu")
    assert old.adapters.format_version == 1
    assert all(old.model.balconies[str(k)].lens is None for k in old.model.exits)
    # half a map is refused clearly
    flat = safetensors.torch.load_file(str(tmp_path / "v2" / "balcony.safetensors"))
    del flat["balcony.2.lens.bias"]
    safetensors.torch.save_file(flat, str(tmp_path / "v2" / "balcony.safetensors"))
    with pytest.raises(AdapterError, match="exit 2 has missing or misshapen"):
        load_model(str(tiny_model_dir), adapters=tmp_path / "v2", dtype="float32", device="cpu")


def test_serving_forward_with_lens_matches_dense_forward(tiny_model_dir, harness):
    from balcony_runtime.training.dense_forward import backbone_pass, balcony_normed, lm_logits

    loaded = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2, 3), dtype="float32", device="cpu")
    model = loaded.model
    give_lenses(model)
    model.balconies["3"].set_lens(None)  # a mix: exits 1, 2 with a map, exit 3 without
    ids = loaded.tokenizer.encode("The balcony reads the state after k layers through its lens map.")
    states = backbone_pass(model, torch.tensor([ids]), set(model.exits))
    h = harness(loaded)
    for k in model.exits:
        dense = lm_logits(model, balcony_normed(model, k, states))  # [T, V]
        (paged,) = h.feed([(h.new_request(ids, k), len(ids))])
        torch.testing.assert_close(paged.float(), dense, atol=1e-4 * dense.abs().max().item(), rtol=0)
