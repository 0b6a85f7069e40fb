"""The sampler against independent numpy computations: greedy, seeds, top-k, top-p, temperature,
OpenAI penalties, logprobs and prompt logprobs. Every random draw is seeded, so nothing can flake."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from balcony_runtime.sampler import (
    SampledToken,
    Sampler,
    SamplingRow,
    apply_logit_bias_,
    apply_penalties_,
    make_generator,
    probability_weights_,
    prompt_logprobs,
    row_argmax,
)
from balcony_runtime.sampling_params import SamplingParams

sampler = Sampler()


def make_row(seed: int | None = None, output: tuple[int, ...] = (), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(seed=seed, **params), list(output), make_generator(seed, "cpu"))


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_nucleus(logits: np.ndarray, top_k: int, top_p: float) -> tuple[set[int], float]:
    """Token ids kept by top-k then top-p (smallest most-likely set of mass >= top_p), computed
    in float64; also the distance of the nearest cumulative mass to top_p (ambiguity margin)."""
    order = np.argsort(-logits.astype(np.float64), kind="stable")
    if 0 < top_k < len(order):
        order = order[:top_k]
    probs = np.exp(np_log_softmax(logits[order]))
    cumulative = np.cumsum(probs)
    keep = int(np.searchsorted(cumulative, top_p) + 1) if top_p < 1 else len(order)
    keep = min(keep, len(order))
    margin = float(np.min(np.abs(cumulative[max(keep - 2, 0) : keep] - top_p))) if top_p < 1 else 1.0
    return {int(i) for i in order[:keep]}, margin


def assert_top_matches(top: list[tuple[int, float]], reference: np.ndarray, n: int) -> None:
    """top is the n most likely (id, logprob), most likely first; tie order is not checked."""
    ids = [i for i, _ in top]
    values = np.array([v for _, v in top])
    assert len(ids) == n == len(set(ids))
    np.testing.assert_allclose(values, np.sort(reference)[::-1][:n], atol=1e-4)
    np.testing.assert_allclose(reference[ids], values, atol=1e-4)


def draw_many(logits_row: torch.Tensor, n: int, seed: int, **params) -> list[int]:
    """n draws from one distribution: n rows in one batch sharing one seeded generator."""
    generator = make_generator(seed, "cpu")
    rows = [SamplingRow(SamplingParams(**params), [], generator) for _ in range(n)]
    return [t.token_id for t in sampler(logits_row.expand(n, -1), rows)]


def chi_square(tokens: list[int], probs: np.ndarray) -> float:
    observed = np.bincount(tokens, minlength=len(probs)).astype(np.float64)
    expected = probs * len(tokens)
    support = expected > 0
    assert observed[~support].sum() == 0, "drew a token of probability 0"
    return float(((observed[support] - expected[support]) ** 2 / expected[support]).sum())


# ---------------------------------------------------------------------------------------------------
# greedy and seeds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax_and_ignores_filters(dtype):
    logits = (torch.randn(6, 500, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    rows = [make_row(temperature=0.0), make_row(temperature=0.0, top_k=3, top_p=0.1, seed=5)] * 3
    tokens = [t.token_id for t in sampler(logits, rows)]
    assert tokens == logits.float().argmax(dim=-1).tolist()


def test_seed_reproduces_tokens_whatever_the_batch():
    g = torch.Generator().manual_seed(1)
    steps, vocab = 25, 3000
    target_logits = torch.randn(steps, vocab, generator=g)  # flat enough that draws really vary
    target = dict(temperature=0.9, top_k=400, top_p=0.95, seed=1234)

    def run(batch_size: int, position: int) -> list[int]:
        row = make_row(**target)
        others = [
            make_row(temperature=0.0),
            make_row(seed=7, top_p=0.5, logprobs=3),
            make_row(temperature=1.3),  # global RNG
            make_row(seed=8, output=(1, 2, 2), frequency_penalty=1.0, top_k=5),
        ]
        tokens = []
        for step in range(steps):
            logits = torch.randn(batch_size, vocab, generator=g) * 2
            logits[position] = target_logits[step]
            rows = [others[i % len(others)] for i in range(batch_size)]
            rows[position] = row
            tokens.append(sampler(logits, rows)[position].token_id)
        return tokens

    alone = run(1, 0)
    assert len(set(alone)) > steps // 2, "the draws should be random, not near-greedy"
    assert run(5, 3) == alone
    assert run(9, 0) == alone
    assert run(3, 2) == alone


def test_different_seeds_differ_and_same_seed_repeats():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(2))

    def sequence(seed: int) -> list[int]:
        row = make_row(seed=seed)
        return [sampler(logits, [row])[0].token_id for _ in range(20)]

    assert sequence(11) == sequence(11)
    assert sequence(11) != sequence(12)


def test_unseeded_rows_follow_the_global_rng():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(3))
    rows = [make_row() for _ in range(4)]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first = [t.token_id for t in sampler(logits, rows)]
        torch.manual_seed(0)
        second = [t.token_id for t in sampler(logits, rows)]
    assert first == second


def test_make_generator():
    assert make_generator(None, "cpu") is None
    a, b = make_generator(5, "cpu"), make_generator(5, torch.device("cpu"))
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


# ---------------------------------------------------------------------------------------------------
# top-k and top-p


def test_top_k_1_equals_greedy():
    logits = torch.randn(8, 2000, generator=torch.Generator().manual_seed(4)) * 2
    rows = [make_row(seed=i, top_k=1, temperature=1.7) for i in range(8)]
    assert [t.token_id for t in sampler(logits, rows)] == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("top_k", [2, 7, 40])
def test_top_k_restricts_support(top_k):
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(top_k)) * 0.5
    allowed = set(np.argsort(-logits[0].numpy())[:top_k].tolist())
    drawn = set(draw_many(logits, 4000, seed=top_k, top_k=top_k, temperature=1.0))
    assert drawn <= allowed
    assert len(drawn) == top_k if top_k <= 7 else len(drawn) > top_k // 2  # not narrower either


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 0.6), (0.7, 0, 0.9), (1.5, 0, 0.3), (1.0, 12, 0.8), (1.0, -1, 0.05)]
)
def test_top_p_draws_exactly_the_nucleus(temperature, top_k, top_p):
    logits = torch.randn(1, 60, generator=torch.Generator().manual_seed(10)) * 1.5
    nucleus, margin = np_nucleus(logits[0].numpy() / temperature, top_k, top_p)
    assert margin > 1e-4, "test logits sit on a top-p boundary; pick another seed"
    drawn = set(draw_many(logits, 6000, seed=1, temperature=temperature, top_k=top_k, top_p=top_p))
    assert drawn == nucleus


@pytest.mark.parametrize("sync_free", [False, True])
def test_probability_weights_keep_exactly_the_numpy_nucleus_on_a_real_vocabulary(sync_free):
    """Covers every round of the candidate search: nuclei under 64, under 512, under 4096, larger;
    and the accelerator's one full sort (sync_free) keeps the same tokens."""
    vocab = 49152
    g = torch.Generator().manual_seed(5)
    scales = [0.3, 1.0, 3.0, 3.5, 4.5, 6.0, 1.0, 2.5, 4.0, 10.0]
    logits = torch.stack([torch.randn(vocab, generator=g) * s for s in scales])  # [10, V]
    top_p = torch.tensor([0.9, 0.95, 0.9, 0.8, 0.95, 0.5, 0.99, 0.8, 1.0, 0.97])
    top_k = torch.tensor([0, 0, 0, 0, 0, 0, 20000, 100, 30, -1])
    weights = probability_weights_(logits.clone(), top_k, top_p, sync_free)
    sizes = []
    for i in range(len(scales)):
        nucleus, margin = np_nucleus(logits[i].numpy(), int(top_k[i]), float(top_p[i]))
        assert margin > 1e-6, f"row {i} sits on a top-p boundary"
        kept = weights[i].nonzero().squeeze(1)
        assert set(kept.tolist()) == nucleus, f"row {i}"
        expected = np.exp(logits[i].double().numpy() - logits[i].max().item())[kept.numpy()]
        np.testing.assert_allclose(weights[i, kept].numpy(), expected, rtol=1e-5)
        sizes.append(len(kept))
    for low, high in [(1, 64), (64, 512), (512, 4096), (4096, vocab)]:
        assert any(low <= size < high for size in sizes), sizes


# ---------------------------------------------------------------------------------------------------
# the distribution itself


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax_of_scaled_logits(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    tokens = draw_many(logits, 20000, seed=int(temperature * 10), temperature=temperature)
    expected = np.exp(np_log_softmax(logits[0].numpy() / temperature))
    # 5 degrees of freedom: 30 has p < 1e-5, while the wrong temperature scores in the hundreds.
    assert chi_square(tokens, expected) < 30
    wrong = np.exp(np_log_softmax(logits[0].numpy() / (temperature * 1.5)))
    assert chi_square(tokens, wrong) > 100


def test_low_temperature_and_wide_logits():
    """Logit gaps past fp32's exp range (weights floored at exp(-87)) still sample the right tokens."""
    logits = torch.tensor([[0.0, 3.0, 2.9, -50.0, -400.0] + [-100.0] * 300])
    tokens = draw_many(logits, 4000, seed=4, temperature=0.05)  # gaps of 2000 after scaling
    assert set(tokens) == {1, 2}  # token 2: exp(-2) / (1 + exp(-2)) = 11.9% of draws
    assert 0.10 < tokens.count(2) / len(tokens) < 0.17
    assert draw_many(logits, 50, seed=5, temperature=0.05, top_k=1) == [1] * 50


def test_sampling_across_cdf_blocks_and_padding():
    """Mass in the first, middle and last blocks of a vocabulary that is not a multiple of 256."""
    vocab = 1000
    logits = torch.full((1, vocab), float("-inf"))
    support = [0, 255, 256, 511, 700, 999]
    logits[0, support] = torch.tensor([0.5, 1.0, -0.5, 0.0, 1.5, 0.2])
    tokens = draw_many(logits, 20000, seed=3)
    expected = torch.softmax(logits[0].double(), dim=-1).numpy()
    assert chi_square(tokens, expected) < 35  # 5 degrees of freedom


# ---------------------------------------------------------------------------------------------------
# penalties


def assert_openai_penalties(logits: torch.Tensor, rows: list, atol: float) -> torch.Tensor:
    """apply_penalties_ on a copy of ``logits`` against OpenAI's formula in float64; the copy."""
    expected = logits.double().numpy().copy()
    for i, row in enumerate(rows):
        for token, count in Counter(row.output_token_ids).items():
            expected[i, token] -= count * row.params.frequency_penalty + row.params.presence_penalty
    penalized = logits.clone()
    apply_penalties_(penalized, rows)
    np.testing.assert_allclose(penalized.numpy(), expected, rtol=0, atol=atol)
    return penalized


def test_penalties_match_openai_formula():
    vocab = 50
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(6)) * 2
    rows = [
        make_row(output=(1, 1, 1, 7, 49), presence_penalty=0.7, frequency_penalty=0.3),
        make_row(output=(0, 0, 2, 3, 3, 3, 3), presence_penalty=-1.5, frequency_penalty=0.8),
        make_row(output=(4, 4, 5), frequency_penalty=-2.0),
        make_row(output=(6, 6), presence_penalty=0.0, frequency_penalty=0.0),  # no penalties
        make_row(output=(), presence_penalty=2.0, frequency_penalty=2.0),  # nothing generated yet
    ]
    assert_openai_penalties(logits, rows, atol=1e-5)


def test_penalties_over_long_outputs_with_many_repeats_match_the_formula():
    # many occurrences of each token: presence must land once, frequency once per occurrence
    rng = np.random.default_rng(3)
    vocab = 64
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(4))
    rows = [make_row(output=tuple(int(t) for t in rng.integers(0, vocab, size=n)),
                     presence_penalty=float(rng.uniform(-2, 2)), frequency_penalty=float(rng.uniform(-2, 2)))
            for n in (300, 1, 0, 150, 64, 500)]
    rows[2] = make_row(output=(5, 5, 5))  # no penalties: untouched
    penalized = assert_openai_penalties(logits, rows, atol=1e-4)
    assert torch.equal(penalized[2], logits[2])


def test_penalties_decide_greedy_choices():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])

    def choose(**params) -> int:
        return sampler(logits, [make_row(temperature=0.0, output=(0, 0, 2), **params)])[0].token_id

    assert choose(frequency_penalty=0.6) == 1  # 5 - 2 * 0.6 = 3.8 < 4
    assert choose(frequency_penalty=0.4) == 0  # 4.2 > 4
    assert choose(presence_penalty=1.5) == 1  # 3.5 < 4
    assert choose(presence_penalty=0.5) == 0  # 4.5 > 4
    assert choose(presence_penalty=0.5, frequency_penalty=0.3) == 1  # 5 - (2 * 0.3 + 0.5) = 3.9
    assert choose(presence_penalty=0.3, frequency_penalty=0.3) == 0  # 5 - (2 * 0.3 + 0.3) = 4.1


def test_penalty_token_ids_are_checked():
    with pytest.raises(ValueError):
        apply_penalties_(torch.zeros(1, 10), [make_row(output=(10,), presence_penalty=1.0)])


def test_logit_bias_adds_to_the_named_logits_after_penalties():
    vocab = 40
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(11))
    rows = [make_row(logit_bias={3: 2.5, 39: -100}), make_row(), make_row(logit_bias={0: -0.25})]
    expected = logits.double().numpy().copy()
    expected[0, 3] += 2.5
    expected[0, 39] -= 100
    expected[2, 0] -= 0.25
    biased = logits.clone()
    apply_logit_bias_(biased, rows)
    np.testing.assert_allclose(biased.numpy(), expected, rtol=0, atol=1e-5)


def test_logit_bias_forces_and_bans_tokens_but_not_reported_logprobs():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]] * 4)
    rows = [
        make_row(temperature=0.0, logit_bias={0: -100}, logprobs=1),  # banned: greedy takes the next
        make_row(temperature=0.0, logit_bias={3: 100}),  # forced
        make_row(seed=5, temperature=1.0, logit_bias={2: 100}),  # sampling: forced as well
        make_row(temperature=0.0, output=(0,), frequency_penalty=2.0, logit_bias={0: 1.5}),  # 5 - 2 + 1.5
    ]
    out = sampler(logits, rows)
    assert [o.token_id for o in out] == [1, 3, 2, 0]
    raw = np_log_softmax(logits[0].numpy())
    assert out[0].logprobs.logprob == pytest.approx(raw[1], abs=1e-5)  # raw distribution, as vLLM


def test_logit_bias_is_validated():
    with pytest.raises(ValueError, match="100"):
        SamplingParams(logit_bias={1: 101.0})
    with pytest.raises(ValueError, match="non-negative"):
        SamplingParams(logit_bias={-1: 1.0})
    assert SamplingParams(logit_bias={"7": 1}).logit_bias == ((7, 1.0),)


# ---------------------------------------------------------------------------------------------------
# logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_rank_and_top_n_come_from_the_raw_distribution(dtype):
    vocab = 800
    logits = (torch.randn(5, vocab, generator=torch.Generator().manual_seed(7)) * 3).to(dtype)
    rows = [
        make_row(temperature=0.0, logprobs=3),
        make_row(seed=1, temperature=0.4, top_k=50, logprobs=0),
        make_row(seed=2, logprobs=20, output=(5, 5, 9), presence_penalty=2.0, frequency_penalty=2.0),
        make_row(seed=3),  # no logprobs
        make_row(seed=4, temperature=1.8, top_p=0.9, logprobs=5),
    ]
    out = sampler(logits, rows)
    reference = np_log_softmax(logits.float().numpy())  # raw: no penalties, temperature or filters
    assert out[3].logprobs is None
    for i in (0, 1, 2, 4):
        lp = out[i].logprobs
        token = out[i].token_id
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(reference[i, token], abs=1e-4)
        assert lp.rank == 1 + int((reference[i] > reference[i, token]).sum())
        assert_top_matches(lp.top, reference[i], rows[i].params.logprobs)
    assert out[0].logprobs.rank == 1  # greedy without penalties takes the most likely token


def test_prompt_logprobs_match_direct_computation():
    steps, vocab = 300, 400  # more positions than one chunk
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(steps, vocab, generator=g) * 2
    targets = torch.randint(0, vocab, (steps,), generator=g)
    reference = np_log_softmax(logits.numpy())
    out = prompt_logprobs(logits, targets, num_top=4)
    assert len(out) == steps
    for t in range(steps):
        token = int(targets[t])
        assert out[t].token_id == token
        assert out[t].logprob == pytest.approx(reference[t, token], abs=1e-4)
        assert out[t].rank == 1 + int((reference[t] > reference[t, token]).sum())
        assert_top_matches(out[t].top, reference[t], 4)
    half = prompt_logprobs(logits.to(torch.float16), targets, num_top=4)  # computed in fp32
    reference16 = np_log_softmax(logits.to(torch.float16).float().numpy())
    np.testing.assert_allclose(
        [lp.logprob for lp in half], reference16[np.arange(steps), targets.numpy()], atol=1e-4
    )
    assert all(lp.top == [] for lp in prompt_logprobs(logits[:3], targets[:3], num_top=0))
    with pytest.raises(ValueError):
        prompt_logprobs(logits, targets[:-1], num_top=1)


# ---------------------------------------------------------------------------------------------------
# whole batches


def test_mixed_batch():
    vocab = 2000
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(9)) * 2
    top = logits.argmax(dim=-1)
    rows = [
        make_row(temperature=0.0),
        make_row(temperature=0.0, output=(int(top[1]),) * 3, frequency_penalty=2.0),
        make_row(seed=21, top_k=10, temperature=0.8),
        make_row(seed=22, top_p=0.7, logprobs=2),
        make_row(temperature=1.1),  # global RNG
        make_row(temperature=0.0, logprobs=1, presence_penalty=1.0, output=(3,)),
    ]
    before = logits.clone()
    out = sampler(logits, rows)
    assert torch.equal(logits, before), "the caller's logits must not change"
    assert all(isinstance(t, SampledToken) and 0 <= t.token_id < vocab for t in out)
    assert out[0].token_id == int(top[0])
    penalized = logits[1].clone()
    penalized[top[1]] -= 6.0
    assert out[1].token_id == int(penalized.argmax())
    for i in (2, 3):  # the same token as when sampled alone with a fresh generator
        alone = SamplingRow(rows[i].params, [], make_generator(rows[i].params.seed, "cpu"))
        assert sampler(logits[i : i + 1], [alone])[0].token_id == out[i].token_id
    assert out[2].token_id in set(logits[2].topk(10).indices.tolist())
    assert [t.logprobs is None for t in out] == [True, True, True, False, True, False]
    assert len(out[3].logprobs.top) == 2 and len(out[5].logprobs.top) == 1


def test_strided_logits():
    """The model's last-position logits are often a strided view of [B, T, V]."""
    g = torch.Generator().manual_seed(12)
    full = torch.randn(3, 4, 500, generator=g)

    def sample(logits: torch.Tensor) -> list[int]:
        rows = [
            make_row(seed=1, output=(2, 2), frequency_penalty=1.0, top_p=0.8),
            make_row(seed=2, top_k=9, logprobs=2),
        ]
        return [t.token_id for t in sampler(logits, rows)]

    for view in (full[:2, -1, :], torch.randn(500, 2, generator=g).t()):  # gaps; transposed
        assert not view.is_contiguous()
        assert sample(view) == sample(view.contiguous())


class DeviceReads(TorchDispatchMode):
    """Records the ops that make an accelerator's host wait: reading a value (item, int, bool),
    shapes that depend on values (nonzero, unique, masked_select, boolean-mask indexing)."""

    READS = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "equal", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        boolean_index = name.startswith("index") and any(
            isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in a)
            for a in args
        )
        if boolean_index or any(r in name for r in self.READS):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_greedy_and_unseeded_filters_read_nothing_back_before_the_tokens():
    logits = torch.randn(8, 3000, generator=torch.Generator().manual_seed(13)) * 3
    rows = [
        make_row(temperature=0.0),
        make_row(temperature=0.8),
        make_row(top_k=20),
        make_row(top_p=0.9),
        make_row(top_k=50, top_p=0.5, temperature=1.3),
        make_row(temperature=0.0, top_p=0.3),
        make_row(top_k=-1, top_p=0.99),
        make_row(temperature=0.5, top_k=3000),
    ]
    for batch in (rows[:1] * 8, rows):  # greedy only, then everything mixed
        reads = DeviceReads()
        with reads:
            out = Sampler(sync_free=True)(logits, batch)
        assert reads.reads == [], reads.reads
        assert len(out) == 8
    reads = DeviceReads()
    with reads:
        Sampler(sync_free=False)(logits, rows)  # the CPU's narrowing search does read: the recorder sees it
    assert reads.reads


def test_sync_free_sampling_draws_the_same_tokens():
    """Greedy and seeded rows choose the same tokens with either nucleus search."""
    logits = torch.randn(12, 4000, generator=torch.Generator().manual_seed(14)) * 4
    params = [dict(temperature=0.0), dict(seed=1, top_p=0.9), dict(seed=2, top_k=40, top_p=0.7),
              dict(seed=3, temperature=1.5, top_p=0.95), dict(seed=4), dict(seed=5, top_p=0.2)]
    for _ in range(5):
        tokens = []
        for sync_free in (False, True):
            rows = [make_row(**p) for p in params * 2]
            tokens.append([t.token_id for t in Sampler(sync_free=sync_free)(logits, rows)])
        assert tokens[0] == tokens[1]
        logits = logits.roll(1, dims=0)


def test_empty_batch_and_shape_checks():
    assert sampler(torch.zeros(0, 10), []) == []
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, 10), [make_row()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_row_argmax_is_torchs_argmax_ties_nan_and_infinities_included(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1000, generator=g).to(dtype)
    x[1, [3, 700]] = 9.0  # a tie: the first index
    x[2, 5] = float("nan")  # NaN counts as the maximum
    x[2, 9] = float("nan")
    x[3] = float("-inf")  # every token masked
    x[4, [10, 20]] = float("inf")
    x[5, 999] = float("nan")
    x[5, 998] = float("inf")
    view = x[::2, 1:]  # a strided view, as _select_rows may hand over
    for t in (x, view):
        got = row_argmax(t)
        assert got.dtype == torch.int64 and torch.equal(got, t.argmax(dim=-1))
