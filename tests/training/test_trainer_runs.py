"""Training end to end on a tiny model: backbone untouched, exact resume, adapters exported."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from balcony_runtime.adapters import load_adapters, save_adapters
from balcony_runtime.loader import load_model
from balcony_runtime.training.config import TrainConfig
from balcony_runtime.training.data import DataConfig
from balcony_runtime.training.trainer import lr_at, train


def tiny_config(corpus, tiny_model_dir, output, **overrides) -> TrainConfig:
    fields = dict(
        data=DataConfig((str(corpus),), seq_len=32, heldout_fraction=0.1, seed=3),
        output_dir=str(output), model=str(tiny_model_dir), exits=(1, 2, 3), device="cpu",
        autocast="off", micro_batch_size=2, max_steps=4, log_every=1, save_every=100, kl_chunk=24,
    )
    return TrainConfig(**(fields | overrides))


def test_training_moves_balconies_and_leaves_backbone_bit_identical(text_corpus, tiny_model_dir, tiny_trainable, tmp_path):
    model = tiny_trainable.model
    backbone = [p.detach().clone() for p in model.backbone_parameters()]
    balconies = [p.detach().clone() for p in model.balconies.parameters()]
    state = train(tiny_config(text_corpus, tiny_model_dir, tmp_path), loaded=tiny_trainable, log=lambda _: None)
    assert state["step"] == 4 and state["tokens_seen"] == 4 * 2 * 32
    assert all(torch.equal(a, b) for a, b in zip(backbone, model.backbone_parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(balconies, model.balconies.parameters()))
    assert all(not p.requires_grad for p in model.backbone_parameters())

    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[-1]["loss"]["3"] < log[0]["loss"]["3"]  # it learns
    assert {"tokens_per_s", "eta_s", "backbone_fraction", "lr"} <= set(log[0])

    reloaded = load_model(str(tiny_model_dir), adapters=str(tmp_path / "adapters"), dtype="float32", device="cpu")
    assert reloaded.adapters.training["tokens_seen"] == 256
    for a, b in zip(model.balconies.parameters(), reloaded.model.balconies.parameters()):
        torch.testing.assert_close(a.detach().half().float(), b, rtol=0, atol=0)


def test_resume_gives_the_parameters_of_an_uninterrupted_run(text_corpus, tiny_model_dir, tmp_path):
    straight = tmp_path / "straight"
    train(tiny_config(text_corpus, tiny_model_dir, straight, grad_accum=2), log=lambda _: None)
    pieces = tmp_path / "pieces"
    first = train(tiny_config(text_corpus, tiny_model_dir, pieces, grad_accum=2, stop_after=2), log=lambda _: None)
    assert first["step"] == 2 and not (pieces / "adapters").exists()
    second = train(tiny_config(text_corpus, tiny_model_dir, pieces, grad_accum=2), log=lambda _: None)
    assert second["step"] == 4
    a = load_file(str(straight / "checkpoint" / "balconies.safetensors"))
    b = load_file(str(pieces / "checkpoint" / "balconies.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    lr_straight = [json.loads(x)["lr"] for x in (straight / "log.jsonl").read_text().splitlines()]
    lr_pieces = [json.loads(x)["lr"] for x in (pieces / "log.jsonl").read_text().splitlines()]
    assert lr_straight == lr_pieces


def test_resume_refuses_a_different_schedule(text_corpus, tiny_model_dir, tmp_path):
    train(tiny_config(text_corpus, tiny_model_dir, tmp_path, stop_after=1), log=lambda _: None)
    with pytest.raises(ValueError, match="checkpoint"):
        train(tiny_config(text_corpus, tiny_model_dir, tmp_path, max_steps=8), log=lambda _: None)


def test_schedule_warms_up_then_decays_to_zero(text_corpus, tiny_model_dir, tmp_path):
    config = tiny_config(text_corpus, tiny_model_dir, tmp_path, max_steps=200, lr=1e-3)
    lrs = [lr_at(s, 200, config) for s in range(200)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)  # 1% of 200 = 2 warm-up steps
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 1e-6


def test_warm_start_continues_from_adapters_and_records_the_totals(text_corpus, tiny_model_dir, tmp_path):
    first = tmp_path / "first"
    train(tiny_config(text_corpus, tiny_model_dir, first), log=lambda _: None)
    started = load_model(str(tiny_model_dir), adapters=str(first / "adapters"), dtype="float32", device="cpu")

    second = tmp_path / "second"
    config = tiny_config(text_corpus, tiny_model_dir, second, exits=None, init_from=str(first / "adapters"),
                         first_sequence=8, max_steps=2)
    from balcony_runtime.training.trainer import prepare_model

    warm = prepare_model(config, torch.device("cpu"))
    for a, b in zip(started.model.balconies.parameters(), warm.model.balconies.parameters()):
        assert torch.equal(a, b) and b.requires_grad  # starts exactly where the first run ended
    train(config, loaded=warm, log=lambda _: None)
    meta = load_model(str(tiny_model_dir), adapters=str(second / "adapters"), dtype="float32", device="cpu").adapters
    assert meta.training["tokens_seen"] == 2 * 2 * 32
    assert meta.training["initialised_from"]["tokens_seen"] == 4 * 2 * 32
    assert meta.training["tokens_seen_total"] == 6 * 2 * 32

    # a warm start from a warm start keeps the whole chain on record
    third = tmp_path / "third"
    train(tiny_config(text_corpus, tiny_model_dir, third, exits=None, init_from=str(second / "adapters"),
                      first_sequence=12, max_steps=1), log=lambda _: None)
    chain = load_model(str(tiny_model_dir), adapters=str(third / "adapters"), dtype="float32",
                       device="cpu").adapters.training
    assert chain["initialised_from"]["tokens_seen"] == 6 * 2 * 32
    assert chain["initialised_from"]["initialised_from"]["tokens_seen"] == 4 * 2 * 32
    assert chain["tokens_seen_total"] == 7 * 2 * 32

    # a warm start from adapters composed per exit (bench/compose_adapters.py) keeps both records
    composed = tmp_path / "composed"
    meta, balconies = load_adapters(second / "adapters")
    parts = {"base": {"command": "run a"}, "exits_taken": {"1": {"command": "run b"}}}
    save_adapters(composed, replace(meta, training={"command": "compose", "tokens_seen_total": 640, **parts}),
                  balconies, torch.float32)
    train(tiny_config(text_corpus, tiny_model_dir, tmp_path / "fourth", exits=None, init_from=str(composed),
                      first_sequence=12, max_steps=1), log=lambda _: None)
    after = load_adapters(tmp_path / "fourth" / "adapters")[0].training
    assert after["initialised_from"]["command"] == "compose"
    assert {k: after["initialised_from"][k] for k in parts} == parts
    assert after["tokens_seen_total"] == 640 + 1 * 2 * 32


def test_first_sequence_shifts_the_data_order(text_corpus, tiny_model_dir, tmp_path):
    a = train(tiny_config(text_corpus, tiny_model_dir, tmp_path / "a", max_steps=1), log=lambda _: None)
    b = train(tiny_config(text_corpus, tiny_model_dir, tmp_path / "b", max_steps=1, first_sequence=2), log=lambda _: None)
    loss = [json.loads((tmp_path / d / "log.jsonl").read_text().splitlines()[0])["loss"] for d in ("a", "b")]
    assert a["step"] == b["step"] == 1 and loss[0] != loss[1]


def test_warm_start_refuses_random_init(text_corpus, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="init_from"):
        tiny_config(text_corpus, tiny_model_dir, tmp_path, init="random", init_from=str(tmp_path))


def test_wider_balconies_train_resume_exactly_and_export_their_width(text_corpus, tiny_model_dir, tmp_path):
    """--balcony-mlp-width: the widened balconies train (the new units' output columns leave zero),
    resume bit-identically across a stop (the widening is redone from the same seed before the
    checkpoint is read), and the exported adapters load at that width."""
    wide = dict(balcony_mlp_width=150, grad_accum=2)
    straight = tmp_path / "straight"
    train(tiny_config(text_corpus, tiny_model_dir, straight, **wide), log=lambda _: None)
    pieces = tmp_path / "pieces"
    train(tiny_config(text_corpus, tiny_model_dir, pieces, stop_after=2, **wide), log=lambda _: None)
    train(tiny_config(text_corpus, tiny_model_dir, pieces, **wide), log=lambda _: None)
    a = load_file(str(straight / "checkpoint" / "balconies.safetensors"))
    b = load_file(str(pieces / "checkpoint" / "balconies.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)

    reloaded = load_model(str(tiny_model_dir), adapters=str(straight / "adapters"), dtype="float32", device="cpu")
    base = reloaded.model.arch.intermediate_size
    for k in reloaded.model.exits:
        layer = reloaded.model.balconies[str(k)].layer
        assert reloaded.model.balconies[str(k)].mlp_width == 150
        assert layer.down_proj[:, base:].abs().max() > 0  # the new units were trained
    assert reloaded.adapters.training["recipe"]["balcony_mlp_width"] == 150
