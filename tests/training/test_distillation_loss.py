"""The chunked KL loss equals a direct computation, and its gradients reach only the balconies."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from balcony_runtime.training.dense_forward import backbone_pass, balcony_normed, final_normed, lm_logits
from balcony_runtime.training.loss import distillation_loss


def hf_exit_logits(hf, loaded, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Exit k from transformers pieces: hidden_states[k] -> balcony as a LlamaDecoderLayer -> norm -> head."""
    balcony = loaded.model.balconies[str(k)]
    layer = LlamaDecoderLayer(hf.config, layer_idx=0).eval()
    layer.load_state_dict(balcony.layer.hf_state_dict())
    norm = LlamaRMSNorm(hf.config.hidden_size, eps=hf.config.rms_norm_eps)
    norm.weight.data.copy_(balcony.norm.detach())
    hidden = hf(ids, output_hidden_states=True).hidden_states[k]  # [B, S, H]
    positions = torch.arange(ids.shape[1])[None]
    cos_sin = hf.model.rotary_emb(hidden, positions)
    mask = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)[None, None]
    out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
    out = out[0] if isinstance(out, tuple) else out
    return hf.lm_head(norm(out))  # [B, S, V]


def kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    p_log = teacher_logits.float().log_softmax(-1)
    q_log = student_logits.float().log_softmax(-1)
    return (p_log.exp() * (p_log - q_log)).sum()


def test_loss_equals_kl_from_transformers(tiny_trainable, tiny_model_dir):
    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model, exits = tiny_trainable.model, tiny_trainable.model.exits
    ids = torch.randint(0, model.arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = backbone_pass(model, ids, set(exits))
        ours = distillation_loss(model, states, exits, chunk_size=7, grad_scale=None)
        teacher = hf(ids).logits
        for k in exits:
            ref = kl_sum(teacher, hf_exit_logits(hf, tiny_trainable, ids, k))
            torch.testing.assert_close(ours[k], ref, rtol=1e-4, atol=1e-5)


def test_chunked_gradients_equal_direct_loss_and_reach_only_balconies(tiny_trainable):
    model, exits = tiny_trainable.model, tiny_trainable.model.exits
    ids = torch.randint(0, model.arch.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    balcony_params = list(model.balconies.parameters())
    tokens = ids.numel()

    states = backbone_pass(model, ids, set(exits))
    distillation_loss(model, states, exits, chunk_size=6, grad_scale=1.0 / (tokens * len(exits)))
    chunked = [p.grad.clone() for p in balcony_params]
    assert all(p.grad is None for p in model.backbone_parameters())
    assert all(g.abs().sum() > 0 for g in chunked)

    model.zero_grad(set_to_none=True)
    states = backbone_pass(model, ids, set(exits))
    with torch.no_grad():
        teacher = lm_logits(model, final_normed(model, *states.final))
    loss = sum(kl_sum(teacher, lm_logits(model, balcony_normed(model, k, states))) for k in exits)
    (loss / (tokens * len(exits))).backward()
    for g, p in zip(chunked, balcony_params):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.backbone_parameters())


def test_bf16_head_copy_gives_close_loss(tiny_trainable):
    model, exits = tiny_trainable.model, tiny_trainable.model.exits
    ids = torch.randint(0, model.arch.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        states = backbone_pass(model, ids, set(exits))
        fp32 = distillation_loss(model, states, exits, 16, None)
        bf16 = distillation_loss(model, states, exits, 16, None, model.lm_head.to(torch.bfloat16))
    for k in exits:
        assert abs(fp32[k] - bf16[k]) <= 0.05 * fp32[k] + 1e-3


def mixed_kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, b: float) -> torch.Tensor:
    """(1 - b) KL(p || q) + b KL(q || p), straight from log-softmaxes (the reference)."""
    p_log = teacher_logits.float().log_softmax(-1)
    q_log = student_logits.float().log_softmax(-1)
    reverse = (q_log.exp() * (q_log - p_log)).sum()
    return (1 - b) * kl_sum(teacher_logits, student_logits) + b * reverse


@pytest.mark.parametrize("b", [0.5, 1.0])
def test_mixed_reverse_kl_loss_and_gradients_equal_autograd(tiny_trainable, b):
    model, exits = tiny_trainable.model, tiny_trainable.model.exits
    ids = torch.randint(0, model.arch.vocab_size, (2, 18), generator=torch.Generator().manual_seed(3))
    balcony_params = list(model.balconies.parameters())
    scale = 1.0 / (ids.numel() * len(exits))
    with torch.no_grad():  # sharper exits: far enough from the teacher that the two KLs differ
        for k in exits:
            model.balconies[str(k)].norm.mul_(40.0)

    states = backbone_pass(model, ids, set(exits))
    ours = distillation_loss(model, states, exits, chunk_size=5, grad_scale=scale, reverse_weight=b)
    chunked = [p.grad.clone() for p in balcony_params]
    assert all(p.grad is None for p in model.backbone_parameters())

    model.zero_grad(set_to_none=True)
    states = backbone_pass(model, ids, set(exits))
    with torch.no_grad():
        teacher = lm_logits(model, final_normed(model, *states.final))
    students = {k: lm_logits(model, balcony_normed(model, k, states)) for k in exits}
    refs = {k: mixed_kl_sum(teacher, students[k], b) for k in exits}
    (sum(refs.values()) * scale).backward()
    for k in exits:
        torch.testing.assert_close(ours[k], refs[k].detach(), rtol=1e-4, atol=1e-5)
        # the reverse KL differs from the forward one: the mixed loss is not the forward KL relabelled
        forward = kl_sum(teacher, students[k]).item()
        assert abs(refs[k].item() - forward) > 0.01 * forward
    for g, p in zip(chunked, balcony_params):
        assert (g - p.grad).norm() <= 1e-3 * p.grad.norm()  # sharp exits: fp32 sums of larger terms, so a norm-wise bound


@pytest.mark.parametrize("bad", [{"reverse_kl_weight": -0.1}, {"reverse_kl_weight": 1.5},
                                 {"reverse_kl_weight": 0.5, "objective": "fisher"}])
def test_reverse_kl_weight_is_checked(bad):
    from balcony_runtime.training.config import TrainConfig
    from balcony_runtime.training.data import DataConfig

    with pytest.raises(ValueError, match="reverse_kl_weight"):
        TrainConfig(data=DataConfig(sources=("x.txt",)), output_dir="out", max_steps=1, **bad)
