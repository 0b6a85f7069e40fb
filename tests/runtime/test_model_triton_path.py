"""A whole mixed-depth prefill and decode step through the Triton kernels (interpreted on CPU)
against the same steps through the torch references."""

from __future__ import annotations

import torch

from kernels.dispatch import TORCH_OPS, select_ops


def test_prefill_and_decode_step_through_triton_match_torch(tiny_model, harness):
    model = tiny_model.model
    triton_ops = select_ops("cpu", backend="triton")
    assert triton_ops.name == "triton"
    tokenizer = tiny_model.tokenizer
    texts = ["A balcony layer sits", "after layer k of the frozen", "backbone and", "learns by self-distillation."]
    exits = [model.full_depth, 3, 2, 1]  # deepest first, every exit
    results = {}
    for ops in (TORCH_OPS, triton_ops):
        model.ops = ops
        try:
            h = harness(tiny_model, block_size=4)
            requests = [h.new_request(tokenizer.encode(t) + [5, 6], e) for t, e in zip(texts, exits)]
            prefill = h.feed([(r, r.num_prompt_tokens - 2) for r in requests])
            decode = h.feed([(r, 1) for r in requests])
            results[ops.name] = [torch.cat([p, d]) for p, d in zip(prefill, decode)]
        finally:
            model.ops = TORCH_OPS
    for ours, ref in zip(results["triton"], results["torch"]):
        err = ((ours - ref).norm() / ref.norm()).item()
        assert err < 1e-5, err
