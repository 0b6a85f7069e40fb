"""A training step on a model built with the Triton kernels (interpreted on CPU), as on a GPU where
``select_ops`` picks them: the forward-only kernels must not break backward, and the gradients must
be those of the torch references."""

from __future__ import annotations

import torch

from balcony_runtime.training.data import DataConfig
from balcony_runtime.training.config import TrainConfig
from balcony_runtime.training.trainer import train
from kernels.dispatch import TORCH_OPS, select_ops


def balconies_after_one_step(loaded, config: TrainConfig, tmp_path) -> dict[str, list[torch.Tensor]]:
    """The balconies' parameters after one training step from the same start, with the torch ops and
    with the Triton kernels (interpreted): {"torch": [...], "triton": [...]}."""
    model = loaded.model
    start = {k: v.clone() for k, v in model.balconies.state_dict().items()}
    moved = {}
    for ops in (TORCH_OPS, select_ops("cpu", backend="triton")):
        model.balconies.load_state_dict(start, strict=False)  # (a closed-form start adds lens maps: refitted)
        model.ops = ops
        try:
            train(TrainConfig(**{**config.__dict__, "output_dir": str(tmp_path / ops.name)}), loaded=loaded,
                  log=lambda _: None)
        finally:
            model.ops = TORCH_OPS
        moved[ops.name] = [p.detach().clone() for p in model.balconies.parameters()]
    return moved


def test_a_training_step_with_triton_ops_gives_the_torch_gradients(text_corpus, tiny_model_dir, tiny_trainable, tmp_path):
    start = [p.detach().clone() for p in tiny_trainable.model.balconies.parameters()]
    config = TrainConfig(
        data=DataConfig((str(text_corpus),), seq_len=16, heldout_fraction=0.1, seed=3),
        output_dir=str(tmp_path / "run"), model=str(tiny_model_dir), exits=(1, 2, 3), device="cpu",
        autocast="off", micro_batch_size=1, max_steps=1, log_every=1, save_every=100, kl_chunk=16, lr=1e-3,
    )
    moved = balconies_after_one_step(tiny_trainable, config, tmp_path)
    assert any(not torch.equal(a, b) for a, b in zip(start, moved["triton"]))  # it trained
    for a, b in zip(moved["torch"], moved["triton"]):
        # One Adam step from the same start: equal updates up to the backbone kernels' rounding.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_bf16_autocast_step_with_triton_ops_matches_the_torch_ops(text_corpus, tiny_model_dir, tiny_trainable, tmp_path):
    """Under autocast (what a GPU run uses) the backbone's matmuls return bf16 while the residual
    stream stays fp32; the Triton kernels insist on one dtype, so the no-grad passes (the backbone
    and the closed-form start) must not hand them that mix. The first GPU run stopped there."""
    config = TrainConfig(
        data=DataConfig((str(text_corpus),), seq_len=16, heldout_fraction=0.1, seed=3),
        output_dir=str(tmp_path / "run"), model=str(tiny_model_dir), exits=(1, 2, 3), device="cpu",
        autocast="bf16", init="lens", lens_tokens=64, micro_batch_size=1, max_steps=1, log_every=1,
        save_every=100, kl_chunk=16, lr=1e-3,
    )
    moved = balconies_after_one_step(tiny_trainable, config, tmp_path)
    for a, b in zip(moved["torch"], moved["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # the same ops ran: bf16 rounding aside
