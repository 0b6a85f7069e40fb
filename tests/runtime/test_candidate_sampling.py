"""Drawing a top-k row from its best candidates (balcony_runtime/candidate_sampling.py) against the
whole-vocabulary path it stands in for: the same kept set and, for the same uniform, the same token
(up to a draw landing within the rounding of a block sum of a boundary), on peaked, flat, tied and
floored rows, top-p included, with the rows it cannot settle left to the whole-vocabulary path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from balcony_runtime.candidate_sampling import sample_by_candidates
from balcony_runtime.sampler import (
    _MIN_LOG_WEIGHT, _TOP_P_CANDIDATES, Sampler, SamplingRow, _inverse_cdf_sample, _probability_weights_,
)
from balcony_runtime.sampling_params import SamplingParams


def full_path(scaled, top_k, top_p, uniform):
    weights = _probability_weights_(scaled.clone(), top_k, top_p, False)
    return _inverse_cdf_sample(weights, uniform), weights


def rows_of_every_kind(n: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * torch.linspace(0.5, 12.0, n)[:, None]  # flat to peaked
    logits[0] = 0.0  # every token tied
    logits[1, :100] = 30.0  # a tie run of 100 at the top
    logits[2] = -200.0  # everything but a few tokens under the exp floor
    logits[2, :3] = torch.tensor([0.0, -1.0, -2.0])
    logits[3, ::7] = logits[3].max() + 1.0  # ties spread over the whole row
    return logits


@pytest.mark.parametrize("vocab", [300, 49152])
def test_the_candidates_draw_the_full_paths_token(vocab):
    n, draws = 12, 40
    logits = rows_of_every_kind(n, vocab, seed=vocab)
    settings = [(50, 1.0), (50, 0.9), (1, 1.0), (300, 0.5), (4096, 0.99), (64, 0.95), (65, 1.0)]
    g = torch.Generator().manual_seed(1)
    same = settled = total = 0
    for k, p in settings:
        top_k, top_p = np.full(n, k, np.int64), np.full(n, p, np.float32)
        for _ in range(draws):
            uniform = torch.rand(n, dtype=torch.float64, generator=g)
            drawn = sample_by_candidates(logits, top_k, top_p, uniform, _TOP_P_CANDIDATES, _MIN_LOG_WEIGHT)
            expected, weights = full_path(logits, top_k, top_p, uniform)
            here = drawn >= 0
            assert bool((weights[here.nonzero().squeeze(1), drawn[here]] > 0).all())  # always a kept token
            same += int((drawn[here] == expected[here]).sum())
            settled += int(here.sum())
            if 0 < k < vocab:  # rows 4.. have no ties: each settles among its candidates
                assert bool(here[4:].all())
                total += n - 4
    assert settled >= total > 0
    assert same >= settled - max(1, settled // 1000)  # the same token but for boundary roundings


def test_rows_that_may_keep_more_than_the_candidates_are_left_to_the_full_path():
    vocab = 49152
    logits = torch.zeros(3, vocab)  # flat: any nucleus of 0.99 holds about 48,660 tokens
    logits[1, :5000] = 1.0  # a tie run longer than the largest candidate size
    top_k = np.array([0, 10, 6000], np.int64)
    top_p = np.array([0.99, 1.0, 1.0], np.float32)
    uniform = torch.full((3,), 0.5, dtype=torch.float64)
    drawn = sample_by_candidates(logits, top_k, top_p, uniform, _TOP_P_CANDIDATES, _MIN_LOG_WEIGHT)
    assert drawn.tolist() == [-1, -1, -1]


def test_unfiltered_rows_are_not_drawn_here():
    logits = torch.randn(2, 1000)
    drawn = sample_by_candidates(logits, np.array([0, 5]), np.array([1.0, 1.0], np.float32),
                                 torch.rand(2, dtype=torch.float64), _TOP_P_CANDIDATES, _MIN_LOG_WEIGHT)
    assert drawn[0] == -1 and drawn[1] >= 0


def test_the_sampler_draws_as_often_as_the_filtered_distribution_says():
    """Through Sampler on a CPU (the candidate path): 20,000 draws of a top-k 3 row match its
    renormalised probabilities."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.4, -1.0] + [-5.0] * 995])
    row = SamplingRow(SamplingParams(temperature=1.0, top_k=3, max_tokens=1), (), None)
    torch.manual_seed(0)
    counts = np.zeros(1000)
    for _ in range(20000):
        counts[Sampler()(logits, [row])[0].token_id] += 1
    expected = torch.softmax(logits[0, :3], dim=0).numpy()
    assert counts[3:].sum() == 0
    assert np.abs(counts[:3] / 20000 - expected).max() < 0.015
