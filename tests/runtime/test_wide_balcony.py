"""Balconies with a wider MLP than the backbone's (issue 12): widening keeps what every exit computes,
the new units train, and wide adapters load, serve and match transformers' layer of that width."""

from __future__ import annotations

import torch

from balcony_runtime.loader import balcony_state, load_model
from balcony_runtime.training.dense_forward import backbone_pass, balcony_normed, lm_logits
from tests.runtime.test_adapters import save_from
from tests.runtime.test_model_forward import PROMPTS, assert_close_to_scale, exit_reference


def exit_logits(loaded, ids: list[int]) -> dict[int, torch.Tensor]:
    model = loaded.model
    states = backbone_pass(model, torch.tensor([ids]), set(model.exits))
    return {k: lm_logits(model, balcony_normed(model, k, states)) for k in model.exits}  # [T, V] each


def test_widening_keeps_every_exit_and_the_new_units_get_gradients(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2, 3), dtype="float32", device="cpu")
    model = loaded.model
    ids = loaded.tokenizer.encode(PROMPTS[0])
    with torch.no_grad():
        before = exit_logits(loaded, ids)
    base = model.arch.intermediate_size
    for k in model.exits:
        model.balconies[str(k)].widen_mlp(2 * base + 5, torch.Generator().manual_seed(k))
        assert model.balconies[str(k)].mlp_width == 2 * base + 5
        assert model.balconies[str(k)].layer.gate_up_proj.shape == (2 * (2 * base + 5), model.arch.hidden_size)
    with torch.no_grad():
        after = exit_logits(loaded, ids)
    for k in model.exits:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-5 * before[k].abs().max().item())

    for p in model.balconies.parameters():
        p.requires_grad_(True)
    layer = model.balconies["2"].layer
    loss = exit_logits(loaded, ids)[2].logsumexp(-1).mean()
    loss.backward()
    new_down = layer.down_proj.grad[:, base:]  # [H, W - I]: the new units' output columns
    assert new_down.abs().sum() > 0, "the new units must learn (zero columns, live inputs)"
    gate, up = layer.gate_up_proj.detach().chunk(2)
    assert gate[base:].std() > 0 and up[base:].std() > 0  # drawn, not zero: they carry signal at once


def test_wide_adapters_round_trip_serve_and_match_transformers(tiny_model_dir, tiny_hf, tmp_path, harness):
    loaded = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2, 3), dtype="float32", device="cpu")
    widths = {1: 96, 2: 160, 3: 203}  # one balcony at the backbone's width, two wider (one odd)
    g = torch.Generator().manual_seed(7)
    for k, width in widths.items():
        balcony = loaded.model.balconies[str(k)]
        balcony.widen_mlp(width, g)
        with torch.no_grad():  # make the new units matter
            balcony.layer.down_proj.add_(0.05 * torch.randn(balcony.layer.down_proj.shape, generator=g))
    save_from(loaded, tmp_path)
    reloaded = load_model(str(tiny_model_dir), adapters=tmp_path, dtype="float32", device="cpu")
    assert {k: reloaded.model.balconies[str(k)].mlp_width for k in widths} == widths
    for k in widths:
        ours, theirs = balcony_state(loaded.model)[k], balcony_state(reloaded.model)[k]
        assert all(torch.equal(ours[name], theirs[name]) for name in ours)

    h = harness(reloaded)
    ids = reloaded.tokenizer.encode(PROMPTS[0])
    for k in widths:
        request = h.new_request(ids, k)
        prefill = h.feed([(request, len(ids) - 3)])[0]
        decode = [h.feed([(request, 1)])[0] for _ in range(3)]
        assert_close_to_scale(torch.cat([prefill, *decode]), exit_reference(reloaded, tiny_hf, ids, k))


def test_a_balcony_only_grows_and_a_wide_one_cannot_copy_the_last_layer(tiny_model_dir):
    import pytest

    loaded = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2, 3), dtype="float32", device="cpu")
    balcony = loaded.model.balconies["1"]
    with pytest.raises(ValueError, match="can only grow"):
        balcony.widen_mlp(loaded.model.arch.intermediate_size - 1)
    balcony.widen_mlp(128)
    with pytest.raises(ValueError, match="cannot copy a layer"):
        balcony.init_from_backbone(loaded.model.layers)
