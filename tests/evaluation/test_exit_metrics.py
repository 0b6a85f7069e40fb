"""Eval numbers on a tiny model equal a direct computation from transformers pieces; CLI outputs."""

from __future__ import annotations

import json
import math
import random

import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from balcony_runtime.evaluation.metrics import evaluate_exits
from balcony_runtime.loader import load_model
from server.cli import main


def tiny_with_balconies(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2, 3), dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in loaded.model.balconies.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.float().std().clamp_min(0.1))
    return loaded


def hf_layer(hf, tensors: dict, hidden: torch.Tensor) -> torch.Tensor:
    """One LlamaDecoderLayer holding ``tensors``, run causally on hidden [B, S, H]."""
    layer = LlamaDecoderLayer(hf.config, layer_idx=0).eval()
    layer.load_state_dict(tensors)
    positions = torch.arange(hidden.shape[1])[None]
    mask = torch.full((hidden.shape[1],) * 2, float("-inf")).triu(1)[None, None]
    out = layer(hidden, attention_mask=mask, position_ids=positions,
                position_embeddings=hf.model.rotary_emb(hidden, positions))
    return out[0] if isinstance(out, tuple) else out


def direct_metrics(logits: torch.Tensor, full: torch.Tensor, ids: torch.Tensor) -> dict:
    """logits, full: [B, S, V]; metrics over positions with a next token."""
    logp, full_logp = logits[:, :-1].log_softmax(-1), full[:, :-1].log_softmax(-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).mean()
    kl = (full_logp.exp() * (full_logp - logp)).sum(-1).mean()
    agree = (logp.argmax(-1) == full_logp.argmax(-1)).float().mean()
    return {"perplexity": math.exp(nll.item()), "kl_per_token": kl.item(), "top1_agreement": agree.item()}


def test_eval_equals_direct_computation(tiny_model_dir):
    loaded = tiny_with_balconies(tiny_model_dir)
    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, loaded.model.arch.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    result = evaluate_exits(loaded.model, ids, batch_size=2, chunk_size=13)

    L = hf.config.num_hidden_layers
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        full, hidden = out.logits, out.hidden_states  # hidden[L] is already final-normed in transformers
        head = lambda h: hf.lm_head(hf.model.norm(h))  # noqa: E731
        full_ppl = math.exp(-full[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).mean().item())
        assert math.isclose(result["full"]["perplexity"], full_ppl, rel_tol=1e-4)
        assert result["tokens"] == 3 * 19
        last = {n[len(f"model.layers.{L - 1}."):]: t for n, t in hf.state_dict().items()
                if n.startswith(f"model.layers.{L - 1}.")}
        for k in loaded.model.exits:
            balcony = loaded.model.balconies[str(k)]
            norm = LlamaRMSNorm(hf.config.hidden_size, eps=hf.config.rms_norm_eps)
            norm.weight.data.copy_(balcony.norm.detach())
            refs = {
                "balcony": hf.lm_head(norm(hf_layer(hf, balcony.layer.hf_state_dict(), hidden[k]))),
                "naive_k": head(hidden[k]),
                "naive_k+1": full if k + 1 == L else head(hidden[k + 1]),
                "layer_drop": head(hf_layer(hf, last, hidden[k])),
            }
            for method, logits in refs.items():
                ours, ref = result["exits"][str(k)][method], direct_metrics(logits, full, ids)
                for name, value in ref.items():
                    assert math.isclose(ours[name], value, rel_tol=1e-4, abs_tol=1e-5), (k, method, name)
                assert ours["layers"] == (k if method == "naive_k" else k + 1)


def test_eval_command_writes_table_json_and_plot(tiny_model_dir, tmp_path, capsys):
    rng = random.Random(0)
    data = tmp_path / "heldout"
    data.mkdir()
    for i in range(3):
        (data / f"d{i}.txt").write_text(" ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(200)))
    out = tmp_path / "eval"
    code = main(["eval", str(data), "--model", str(tiny_model_dir), "--adapters", "none",
                 "--heldout-fraction", "1", "--seq-len", "32", "--max-sequences", "3", "--device", "cpu",
                 "--output-dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "naive exit @k+1" in printed and "layer drop" in printed
    result = json.loads((out / "eval.json").read_text())
    assert result["sequences"] == 3 and set(result["exits"]) == {"1", "2", "3"}
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert "| exit |" in (out / "eval.md").read_text()


def test_bf16_autocast_eval_with_triton_ops_matches_the_torch_ops(tiny_model_dir):
    """`balcony eval --autocast` on a GPU runs the model's Triton kernels; under autocast the
    matmuls return bf16 beside the fp32 residual, which the kernels refuse, so every dense pass
    (the layer-drop baseline's included) takes the torch ops there."""
    from kernels.dispatch import TORCH_OPS, select_ops

    loaded = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2), dtype="float32", device="cpu")
    ids = torch.randint(0, loaded.model.arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    results = {}
    for ops in (TORCH_OPS, select_ops("cpu", backend="triton")):
        loaded.model.ops = ops
        results[ops.name] = evaluate_exits(loaded.model, ids, batch_size=2, chunk_size=12, autocast=True)
    loaded.model.ops = TORCH_OPS
    for k in ("1", "2"):
        for method, row in results["torch"]["exits"][k].items():
            assert math.isclose(row["perplexity"], results["triton"]["exits"][k][method]["perplexity"], rel_tol=1e-6)
