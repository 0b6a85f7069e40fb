"""The closed-form lens start (issue 12): ridge fit, its use in the balcony, training and resume."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from balcony_runtime.loader import load_model
from balcony_runtime.training.config import TrainConfig
from balcony_runtime.training.data import DataConfig, training_stream
from balcony_runtime.training.dense_forward import backbone_pass, balcony_normed, final_normed, lm_logits
from balcony_runtime.training.lens import NormalEquations, apply_lens, fit_lens, solve_ridge
from balcony_runtime.training.trainer import train


def test_ridge_recovers_a_known_affine_map():
    g = torch.Generator().manual_seed(0)
    h = 16
    a, c = torch.randn(h, h, generator=g).double(), torch.randn(h, generator=g).double()
    eq, held = NormalEquations.zeros(h), NormalEquations.zeros(h)
    for _ in range(4):
        x = torch.randn(256, h, generator=g).double() * torch.linspace(0.1, 10, h).double()  # unequal scales
        eq.add(x, x @ a.T + c)
        held.add(x[:64], x[:64] @ a.T + c)
    b = solve_ridge(eq, 0.0)  # [H+1, H] = [W^T; bias]
    torch.testing.assert_close(b[:-1].T, a, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(b[-1], c, atol=1e-8, rtol=1e-8)
    assert held.squared_error(b) < 1e-12 * held.yty  # closed-form held-out error of the exact map ~ 0
    assert held.squared_error(solve_ridge(eq, 1.0)) > held.squared_error(b)  # regularisation costs here


def silence_middle_layers(model, first: int, last: int) -> None:
    """Backbone layers first..last-1 (0-based) add nothing: the state after ``first`` layers reaches
    the input of layer ``last`` unchanged, so the right lens there is known (identity)."""
    with torch.no_grad():
        for i in range(first, last):
            model.layers[i].o_proj.zero_()
            model.layers[i].down_proj.zero_()


def test_fit_recovers_the_identity_and_the_exit_then_equals_the_full_model(tiny_model_dir, text_corpus):
    loaded = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2, 3), dtype="float32", device="cpu")
    model = loaded.model
    silence_middle_layers(model, 1, model.full_depth - 1)  # layers 1, 2 (of 0..3) silent
    data = DataConfig((str(text_corpus),), seq_len=32, heldout_fraction=0.1, seed=3)
    stream = training_stream(data, loaded.tokenizer)
    batches = [stream.batch(2 * i, 2) for i in range(12)]
    fit = fit_lens(model, batches, model.exits, heldout_every=4)
    assert fit.report["fit_tokens"] == 9 * 64 and fit.report["heldout_tokens"] == 3 * 64
    for k in (1, 2, 3):
        w, b = fit.weights[k]
        # the tiny vocabulary of the corpus spans few directions: compare the map on the data, not W
        states = backbone_pass(model, batches[0], {k, model.full_depth - 1})
        x = sum(states.at_exit[k]).double()  # [T, H]
        y = sum(states.at_exit[model.full_depth - 1]).double()  # [T, H]
        torch.testing.assert_close(x @ w.T + b, y, atol=1e-6 * y.abs().max().item(), rtol=0)
    apply_lens(model, fit, "final")
    states = backbone_pass(model, batches[0], set(model.exits))
    full = lm_logits(model, final_normed(model, *states.final))
    for k in model.exits:
        exit_logits = lm_logits(model, balcony_normed(model, k, states))
        torch.testing.assert_close(exit_logits, full, atol=1e-4 * full.abs().max().item(), rtol=0)


def test_train_with_lens_init_fits_trains_exports_and_resumes(text_corpus, tiny_model_dir, tmp_path):
    def config(output, **kw):
        fields = dict(
            data=DataConfig((str(text_corpus),), seq_len=32, heldout_fraction=0.1, seed=3),
            output_dir=str(output), model=str(tiny_model_dir), exits=(1, 2, 3), device="cpu", autocast="off",
            micro_batch_size=2, max_steps=4, log_every=1, save_every=100, kl_chunk=24, init="lens",
            lens_tokens=640, lens_heldout_every=5,
        )
        return TrainConfig(**(fields | kw))

    straight = tmp_path / "straight"
    train(config(straight), log=lambda _: None)
    report = json.loads((straight / "lens_fit.json").read_text())
    assert report["fit_tokens"] + report["heldout_tokens"] == 640 and set(report["exits"]) == {"1", "2", "3"}
    tensors = load_file(str(straight / "adapters" / "balcony.safetensors"))
    assert tensors["balcony.2.lens.weight"].shape == (64, 64) and tensors["balcony.2.lens.bias"].shape == (64,)
    reloaded = load_model(str(tiny_model_dir), adapters=str(straight / "adapters"), dtype="float32", device="cpu")
    assert reloaded.adapters.training["lens_fit"]["exits"]["2"]["lambda"] == report["exits"]["2"]["lambda"]
    assert reloaded.adapters.format_version == 2
    # the map trains with the balcony: it moved away from the fitted one
    fitted = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2, 3), dtype="float32", device="cpu")
    data = DataConfig((str(text_corpus),), seq_len=32, heldout_fraction=0.1, seed=3)
    stream = training_stream(data, fitted.tokenizer)
    fit = fit_lens(fitted.model, [stream.batch(2 * i, 2) for i in range(10)], fitted.model.exits, heldout_every=5)
    assert not torch.allclose(fit.weights[2][0].float().half().float(), tensors["balcony.2.lens.weight"].float())
    # interrupted and resumed: the same parameters (the checkpoint carries the maps)
    pieces = tmp_path / "pieces"
    train(config(pieces, stop_after=2), log=lambda _: None)
    train(config(pieces), log=lambda _: None)
    a = load_file(str(straight / "checkpoint" / "balconies.safetensors"))
    b = load_file(str(pieces / "checkpoint" / "balconies.safetensors"))
    assert a.keys() == b.keys() and "2.lens.weight" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_fit_only_run_writes_untrained_lens_adapters(text_corpus, tiny_model_dir, tmp_path):
    cfg = TrainConfig(
        data=DataConfig((str(text_corpus),), seq_len=32, heldout_fraction=0.1, seed=3), output_dir=str(tmp_path),
        model=str(tiny_model_dir), exits=(1, 2, 3), device="cpu", autocast="off", micro_batch_size=2,
        max_steps=0, init="lens", lens_tokens=320, lens_norm="exit",
    )
    state = train(cfg, log=lambda _: None)
    assert state["step"] == 0
    loaded = load_model(str(tiny_model_dir), adapters=str(tmp_path / "adapters"), dtype="float32", device="cpu")
    model = loaded.model
    for k in model.exits:  # layer: a copy of the last layer; norm: layers[k]'s input norm
        balcony = model.balconies[str(k)]
        assert balcony.lens is not None
        torch.testing.assert_close(balcony.layer.qkv_proj, model.layers[-1].qkv_proj.half().float())
        torch.testing.assert_close(balcony.norm, model.layers[k].input_norm.half().float())
