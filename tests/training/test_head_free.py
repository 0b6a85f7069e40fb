"""The head-free objectives: the Fisher metric is the KL's second-order term, the logits metric is
the centred-logit squared error, gradients equal autograd's and reach only the balconies, and a run
trains, logs and resumes with the same metric."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from balcony_runtime.training.dense_forward import backbone_pass, balcony_normed, final_normed, lm_logits
from balcony_runtime.training.head_free import fisher_metric, head_free_loss, logits_metric
from balcony_runtime.training.trainer import METRIC_FILE, train
from tests.training.test_trainer_runs import tiny_config


def random_ids(model, shape, seed):
    return torch.randint(0, model.arch.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_fisher_quadratic_is_the_kl_of_a_small_shift(tiny_trainable):
    """For one shift d applied to every token, mean_t KL(p_t || softmax(z_t + W d)) = 0.5 d^T M d + O(|d|^3),
    M the token-averaged Fisher: the KL here is computed directly with log_softmax."""
    model = tiny_trainable.model
    with torch.no_grad():
        model.lm_head.mul_(30.0)  # peaked distributions, as a trained model's: p p^T then matters
    ids = random_ids(model, (2, 24), 0)
    metric, tokens = fisher_metric(model, [ids[:1], ids[1:]], chunk_size=7)
    assert tokens == 48
    torch.testing.assert_close(metric, metric.T)
    assert torch.linalg.eigvalsh(metric)[0] > -1e-6 * metric.diagonal().abs().max()
    with torch.no_grad():
        teacher = final_normed(model, *backbone_pass(model, ids, set()).final)  # [T, H]
        logits = lm_logits(model, teacher).double()  # [T, V]
    direction = torch.randn(model.arch.hidden_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    direction /= (direction @ metric @ direction).sqrt()  # 0.5 d^T M d = 0.5 eps^2 for d = eps * direction
    for eps in (0.004, 0.002):
        shifted = logits + eps * (model.lm_head.detach().double() @ direction)  # [T, V]
        p_log, q_log = logits.log_softmax(-1), shifted.log_softmax(-1)
        kl = (p_log.exp() * (p_log - q_log)).sum(-1).mean()
        assert abs(float(kl) / (0.5 * eps**2) - 1.0) < 5 * eps  # third-order remainder only


def test_logits_metric_is_the_centred_logit_error(tiny_trainable):
    model = tiny_trainable.model
    states = backbone_pass(model, random_ids(model, (1, 16), 1), set(model.exits))
    with torch.no_grad():
        teacher, student = final_normed(model, *states.final), balcony_normed(model, 2, states)
        ours = head_free_loss(model, states, (2,), logits_metric(model), None)[2]
        diff = (lm_logits(model, student) - lm_logits(model, teacher)).double()  # [T, V]
        centred = diff - diff.mean(dim=-1, keepdim=True)
        direct = 0.5 * centred.pow(2).mean(dim=-1).sum()
    torch.testing.assert_close(ours.double(), direct, rtol=1e-4, atol=1e-6)


def test_gradients_equal_autograd_and_reach_only_balconies(tiny_trainable):
    model, exits = tiny_trainable.model, tiny_trainable.model.exits
    ids = random_ids(model, (2, 12), 2)
    metric = logits_metric(model)
    params = list(model.balconies.parameters())
    scale = 1.0 / (ids.numel() * len(exits))

    head_free_loss(model, states := backbone_pass(model, ids, set(exits)), exits, metric, scale)
    ours = [p.grad.clone() for p in params]
    assert all(p.grad is None for p in model.backbone_parameters())
    assert all(g.abs().sum() > 0 for g in ours)

    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        teacher = final_normed(model, *states.final)
    m32 = metric.float()
    loss = sum(0.5 * ((d := balcony_normed(model, k, states) - teacher) @ m32 * d).sum() for k in exits)
    (loss * scale).backward()
    for a, p in zip(ours, params):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-8)


def test_fisher_run_learns_records_its_metric_and_resumes_exactly(text_corpus, tiny_model_dir, tmp_path):
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    train(tiny_config(text_corpus, tiny_model_dir, straight, objective="fisher", metric_tokens=64), log=lambda _: None)
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"]["3"] < log[0]["loss"]["3"]  # it learns
    training = json.loads((straight / "adapters" / "balcony.json").read_text())["training"]
    assert training["recipe"]["objective"] == "fisher" and training["head_free_metric"]["tokens"] == 64

    train(tiny_config(text_corpus, tiny_model_dir, pieces, objective="fisher", metric_tokens=64, stop_after=2),
          log=lambda _: None)
    assert (pieces / METRIC_FILE).is_file()
    train(tiny_config(text_corpus, tiny_model_dir, pieces, objective="fisher", metric_tokens=64), log=lambda _: None)
    a = load_file(str(straight / "checkpoint" / "balconies.safetensors"))
    b = load_file(str(pieces / "checkpoint" / "balconies.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
