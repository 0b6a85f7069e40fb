"""bench/skip_probe.py: with nothing transplanted it is the runtime's own exit; a transplanted MLP
is transformers' LlamaMLP behind its RMSNorm."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from balcony_runtime.loader import load_model
from balcony_runtime.training.dense_forward import backbone_pass, balcony_normed, lm_logits


def tiny(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2, 3), dtype="float32", device="cpu")
    model = loaded.model
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.balconies.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.float().std().clamp_min(0.1))
        size = model.arch.hidden_size
        model.balconies["2"].set_lens(torch.eye(size) + 0.02 * torch.randn(size, size, generator=g),
                                      0.01 * torch.randn(size, generator=g))
    return model


def test_nothing_transplanted_is_the_runtime_exit(tiny_model_dir, bench_script):
    model = tiny(tiny_model_dir)
    ids = torch.randint(0, model.arch.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    with bench_script("skip_probe") as probe, torch.no_grad():
        for k in (1, 2):
            states = backbone_pass(model, ids, keep={k})
            want = lm_logits(model, balcony_normed(model, k, states))
            got = probe.exit_logits(model, k, states, [], [], 0.0)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
            moved = probe.exit_logits(model, k, states, [k, k + 1], [], 1.0)
            assert (moved - want).abs().max() > 1e-3  # a transplant changes the exit


def test_transplanted_mlp_is_llama_mlp(tiny_model_dir, bench_script):
    model = tiny(tiny_model_dir)
    arch, layer = model.arch, model.layers[2]
    config = LlamaConfig(hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
                         rms_norm_eps=arch.rms_norm_eps, hidden_act="silu")
    hf_mlp, hf_norm = LlamaMLP(config), LlamaRMSNorm(arch.hidden_size, eps=arch.rms_norm_eps)
    gate, up = layer.gate_up_proj.detach().chunk(2)
    hf_mlp.load_state_dict({"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": layer.down_proj.detach()})
    hf_norm.load_state_dict({"weight": layer.post_attention_norm.detach()})
    x = torch.randn(5, arch.hidden_size, generator=torch.Generator().manual_seed(3))
    with bench_script("skip_probe") as probe, torch.no_grad():
        torch.testing.assert_close(probe.mlp(layer, x, arch.rms_norm_eps), hf_mlp(hf_norm(x)), rtol=1e-4, atol=1e-5)
        assert probe.parse_layers("22-24,27") == [22, 23, 24, 27] and probe.parse_layers("") == []
