"""Choose the next token of every row in a batch, and report log-probabilities.

Order of operations for one row (the order vLLM and OpenAI use):
1. Penalties (OpenAI's formula, https://platform.openai.com/docs/advanced-usage, "frequency and
   presence penalties"): with c[j] the number of times token j occurs in the row's generated tokens,
   logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty.
   Then logit_bias: logit[j] += bias[j] for the tokens the request names.
2. Greedy rows (temperature below _MIN_TEMPERATURE, which includes 0) take the argmax, first index on
   ties. They ignore top-k, top-p and the seed.
3. Other rows: divide by temperature; top-k keeps the k largest logits; top-p then keeps the smallest
   set of most likely tokens whose probability mass, under the top-k-filtered distribution, is at
   least top_p (always at least one token). Both filters keep every token tied with the last one kept.
4. Sample from softmax of what is left (see probability_weights_) by inverse CDF: one uniform
   number per row, drawn from the row's own generator when it has one, against fp64 cumulative
   sums (see _inverse_cdf_sample). A filtered-out token has weight exactly 0 and is never drawn.
   A seeded row therefore draws the same token whatever batch it sits in and wherever, since
   nothing it reads depends on other rows. On a CPU a top-k row draws among its k best candidates
   instead (candidate_sampling.py): the same kept set and, for the same uniform, the same token.
   (An exponential race, argmax(probs / Exp(1) noise), would draw V random numbers per row: 15 ms
   for 16 x 49152 on two CPU cores, more than the rest of sampling together.)

Reported logprobs (the chosen token's, its rank and the top-n) come from the model's raw distribution,
log_softmax(logits), before penalties, temperature and filters, as vLLM reports them by default.

Top-p needs the tokens in order of probability. A full sort of 16 x 49152 costs about 30 ms on two CPU
cores, so the nucleus is searched in the top 64 candidates first, then 512, then 4096 (torch.topk),
and only rows whose nucleus is larger still are fully sorted. Real next-token distributions are
peaked, so most rows finish in the first round. That search reads the device to shrink its shapes, free on a CPU but a
host sync on an accelerator, where one full sort of the top-p rows finds the same nucleus instead
(Sampler.sync_free). Which rows filter and the largest top-k come from the rows' parameters on the
host, so greedy, top-k and top-p rows read nothing back before the sampled tokens. Reductions over the vocabulary (the top-p mass, the
block sums of the sampler) may round differently when torch splits a row across threads, so "the
same token whatever the batch" holds up to the last bit of a float sum, which moves a draw only
when it lands within about 1e-7 of a boundary.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from balcony_runtime.candidate_sampling import effective_top_k, sample_by_candidates
from balcony_runtime.sampling_params import SamplingParams
from balcony_runtime.staging import to_device

_MIN_LOG_WEIGHT = -87.0  # exp(-87) = 1.6e-38, just above fp32's smallest normal number
_MIN_TEMPERATURE = 1e-5  # below this a row is greedy (as in vLLM): logits / T would overflow
_TOP_P_CANDIDATES = (64, 512, 4096)  # topk sizes tried for the nucleus before a full sort
_CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF
_PROMPT_LOGPROBS_CHUNK = 256  # positions per log_softmax in prompt_logprobs (256 x 49152 fp32 = 48 MiB)


@dataclass(slots=True, eq=False)  # compared by identity: the runner keeps a request's row from step to step
class SamplingRow:
    """One row of a batch to sample."""

    params: SamplingParams  # how this request wants its tokens chosen
    output_token_ids: Sequence[int]  # tokens this request generated so far (penalties count these)
    generator: torch.Generator | None  # this request's RNG (seeded from params.seed), None = global RNG


@dataclass(slots=True)
class TokenLogprobs:
    """A token's log-probability under the model's raw distribution, with the most likely tokens."""

    token_id: int  # the token whose logprob this is
    logprob: float  # its log-probability
    rank: int  # 1 = most likely; 1 + the number of tokens strictly more likely
    top: list[tuple[int, float]]  # top-n (token_id, logprob), most likely first (n may be 0)


@dataclass(slots=True)
class SampledToken:
    """What the sampler chose for one row."""

    token_id: int  # the chosen token
    logprobs: TokenLogprobs | None  # None unless params.logprobs is not None


@dataclass(slots=True)
class RowClasses:
    """Which rows of a batch need which work, from their parameters alone: what stays true while
    the same rows are sampled step after step (the runner reuses it then)."""

    greedy: list[int]  # row indices taking the argmax
    sampled: list[int]  # row indices drawing from the filtered distribution
    wanted: list[int]  # row indices whose request asked for logprobs
    penalized: list[int]  # row indices with a presence or frequency penalty
    has_bias: bool  # some row has a logit_bias
    constrained: list[int] = field(default_factory=list)  # row indices with a structured output (a grammar)


def classify_rows(rows: Sequence["SamplingRow"]) -> RowClasses:
    """One pass over the rows (a decode step has a row per running request)."""
    classes = RowClasses([], [], [], [], False)
    greedy, sampled = classes.greedy, classes.sampled
    for i, r in enumerate(rows):
        params = r.params
        (greedy if params.temperature < _MIN_TEMPERATURE else sampled).append(i)
        if params.logprobs is not None:
            classes.wanted.append(i)
        if params.has_penalties:
            classes.penalized.append(i)
        if params.logit_bias:
            classes.has_bias = True
        if params.structured is not None:
            classes.constrained.append(i)
    return classes


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with `seed` on `device`, or None (use the global RNG) when seed is None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Stateless: every call reads only its logits and rows (the RNG state lives in the generators)."""

    def __init__(self, sync_free: bool | None = None):
        # On a CPU the host reads the "device's" values for free, so top-p narrows its search to
        # the rows and candidates that need it (data-dependent shapes). On an accelerator each such
        # read is a host sync, so there top-p sorts every nucleus row once instead. None: decided
        # by the logits' device.
        self.sync_free = sync_free

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
        """Sample one token per row. logits: [B, V], any float dtype (computed in fp32)."""
        tokens, logprobs = self.sample(logits, rows)
        if logprobs is None:
            return [SampledToken(t, None) for t in tokens]
        return [SampledToken(t, lp) for t, lp in zip(tokens, logprobs)]

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow], classes: RowClasses | None = None
               ) -> tuple[list[int], list[TokenLogprobs | None] | None]:
        """What __call__ returns, as the token ids and (None when no row asked) each row's logprobs:
        the engine's step reads these columns without an object per row. ``classes``:
        classify_rows(rows), when the caller kept it from an earlier step of the same rows.

        Every index and parameter comes from the rows on the host, so greedy, top-k, top-p and
        temperature rows read nothing back from the device until the one transfer of the tokens at
        the end (penalties and logprobs, when asked for, read more).
        """
        if not rows:
            self._check(logits, rows)
            return [], None
        if classes is None:
            classes = classify_rows(rows)
        tokens = self.sample_on_device(logits, rows, classes)  # [B]
        wanted = classes.wanted
        if not wanted:
            return tokens.tolist(), None  # the one transfer
        device = tokens.device
        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        wanted_idx = to_device(wanted, torch.long, device)
        raw_logprobs = torch.log_softmax(_select_rows(logits.float(), wanted_idx), dim=-1)  # [W, V]
        counts = [rows[i].params.logprobs for i in wanted]
        for i, lp in zip(wanted, _token_logprobs(raw_logprobs, tokens[wanted_idx], counts)):
            logprobs[i] = lp
        return tokens.tolist(), logprobs  # the one transfer

    @staticmethod
    def _check(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [{len(rows)}, V], got {list(logits.shape)}")

    def sample_on_device(self, logits: torch.Tensor, rows: list[SamplingRow], classes: RowClasses | None = None
                         ) -> torch.Tensor:
        """The chosen token of every row, [B] int64 on the logits' device, without reading anything
        back (an overlapped engine step hands it to the next step's input before the host sees it).
        Logprobs are not computed here: :meth:`sample` adds them."""
        self._check(logits, rows)
        # [B, V]; may alias the caller's tensor, so never written. (Tensor attributes are read
        # where they cost least: .device.type builds a device and a string on every read.)
        raw = logits if logits.dtype is torch.float32 else logits.float()
        device = raw.device
        sync_free = not raw.is_cpu if self.sync_free is None else self.sync_free
        if classes is None:
            classes = classify_rows(rows)
        greedy, sampled, has_bias = classes.greedy, classes.sampled, classes.has_bias
        has_penalties = any(rows[i].output_token_ids for i in classes.penalized)  # nothing to count yet: no work
        # The one full-size copy: penalties, bias, temperature and filters all write into it.
        work = raw.clone(memory_format=torch.contiguous_format) if sampled or has_penalties or has_bias else raw
        if has_penalties:
            apply_penalties_(work, rows)
        if has_bias:
            apply_logit_bias_(work, rows)

        if not sampled:
            tokens = row_argmax(work)  # [B]
        else:
            tokens = torch.empty(len(rows), dtype=torch.long, device=device)  # [B]
        if greedy and sampled:
            greedy_idx = to_device(greedy, torch.long, device)
            tokens[greedy_idx] = row_argmax(_select_rows(work, greedy_idx))

        if sampled:
            sampled_idx = to_device(sampled, torch.long, device)
            sampled_rows = [rows[i] for i in sampled]
            scaled = _select_rows(work, sampled_idx)  # [S, V]; `work` itself when every row samples
            # Built on the host, where the filters read them, then staged once each.
            temperature = np.array([r.params.temperature for r in sampled_rows], dtype=np.float32)  # [S]
            top_k = np.array([r.params.top_k for r in sampled_rows], dtype=np.int64)  # [S]
            top_p = np.array([r.params.top_p for r in sampled_rows], dtype=np.float32)  # [S]
            scaled.div_(to_device(temperature, torch.float32, device)[:, None])
            uniform = _uniforms([r.generator for r in sampled_rows], device)  # [S]
            tokens[sampled_idx] = self._draw(scaled, top_k, top_p, uniform, sync_free)
        return tokens


    @staticmethod
    def _draw(scaled: torch.Tensor, top_k: np.ndarray, top_p: np.ndarray, uniform: torch.Tensor,
              sync_free: bool) -> torch.Tensor:
        """The sampled rows' tokens [S] from their temperature-scaled logits [S, V] (overwritten).
        On a CPU a top-k row draws from its k best candidates (candidate_sampling.py), and only the
        rest pay for the whole vocabulary; that reads the device, so with sync_free every row takes
        the whole-vocabulary path."""
        if sync_free or not (effective_top_k(top_k, scaled.shape[1]) < scaled.shape[1]).any():
            return _inverse_cdf_sample(_probability_weights_(scaled, top_k, top_p, sync_free), uniform)
        drawn = sample_by_candidates(scaled, top_k, top_p, uniform, _TOP_P_CANDIDATES, _MIN_LOG_WEIGHT)  # [S]
        rest_host = np.flatnonzero(drawn.cpu().numpy() < 0)
        if rest_host.size:
            rest = to_device(rest_host, torch.long, scaled.device)
            weights = _probability_weights_(_select_rows(scaled, rest), top_k[rest_host], top_p[rest_host], False)
            drawn[rest] = _inverse_cdf_sample(weights, uniform[rest])
        return drawn


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """The argmax of each row of ``x`` [B, V] as [B] int64: the first index of the maximum, NaN
    counting as the maximum, as torch's and numpy's argmax both do. On a CPU numpy's: its vectorized
    reduction runs several times faster than torch's CPU argmax kernel (docs/benchmarks.md), which
    a greedy step pays over the whole vocabulary for every row."""
    if x.is_cpu and x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
        return torch.from_numpy(np.argmax(x.numpy(), axis=-1).astype(np.int64, copy=False))
    return x.argmax(dim=-1)


def apply_penalties_(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """OpenAI's presence and frequency penalties, counted over each row's generated tokens, in place.

    logits: [B, V] contiguous, one row per SamplingRow. With c[j] the count of token j in the row's
    output_token_ids: logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty.

    Work is proportional to the generated tokens, with no counting pass: the presence penalty is
    written at every occurrence of a token as (its logit before any penalty - the penalty), the same
    value however often the token occurs, so it lands once; the frequency penalty is then added at
    every occurrence, so c times. No torch.unique (a sort: tens of ms a step on a CPU at 64 rows of
    512 tokens, docs/benchmarks.md "Penalties"; and on an accelerator its data-dependent size is a
    sync) and no [B, V] buffer.
    """
    penalized = [i for i, r in enumerate(rows) if r.params.has_penalties and r.output_token_ids]
    if not penalized:
        return
    device = logits.device
    vocab = logits.shape[1]
    lengths = [len(rows[i].output_token_ids) for i in penalized]
    tokens = np.fromiter(itertools.chain.from_iterable(rows[i].output_token_ids for i in penalized),
                         dtype=np.int64, count=sum(lengths))  # [n]
    if tokens.min() < 0 or tokens.max() >= vocab:  # checked on the host: no device read
        raise ValueError(f"output token ids must lie in [0, {vocab})")
    # (output_size given: without it repeat_interleave reads the repeats back to size its output)
    local = torch.repeat_interleave(torch.arange(len(penalized), device=device),
                                    to_device(lengths, torch.long, device),
                                    output_size=len(tokens))  # [n] index among the penalized rows
    batch_row = to_device(penalized, torch.long, device)[local]  # [n]
    flat = batch_row * vocab + to_device(tokens, torch.long, device)  # [n] into logits.view(-1)
    values = logits.view(-1)  # [B * V]
    if any(rows[i].params.presence_penalty for i in penalized):
        presence = to_device([rows[i].params.presence_penalty for i in penalized], logits.dtype, device)  # [P]
        values.index_put_((flat,), values[flat] - presence[local])
    frequency = to_device([rows[i].params.frequency_penalty for i in penalized], logits.dtype, device)  # [P]
    values.index_add_(0, flat, -frequency[local])


def apply_logit_bias_(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Add each row's logit_bias to its logits, in place. logits: [B, V]."""
    biased = [(i, token, value) for i, r in enumerate(rows) for token, value in r.params.logit_bias]
    if not biased:
        return
    vocab = logits.shape[1]
    flat = to_device([i * vocab + token for i, token, _ in biased], torch.long, logits.device)  # [u]
    values = to_device([value for _, _, value in biased], logits.dtype, logits.device)  # [u]
    logits.view(-1).index_add_(0, flat, values)


def probability_weights_(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, sync_free: bool = False
) -> torch.Tensor:
    """Turn temperature-scaled logits, in place, into unnormalised probabilities (the best token's
    weight is 1), with every token outside the row's top-k, and then outside its nucleus, set to 0.

    logits: [N, V] contiguous fp32; top_k: [N] (0, -1 or >= V: off); top_p: [N] (1: off). Top-p is
    measured on the distribution left by top-k. Ties with the last kept token are kept. Weights are
    exp(max(logit - max_logit, -87)): the floor keeps exp out of fp32 denormals, which cost 8x on
    CPU, and only lifts tokens e^87 times less likely than the best to that ratio. Returns `logits`.
    ``sync_free``: find every nucleus with one full sort instead of the narrowing candidate search
    (same tokens kept; no device value is read on the host).
    """
    return _probability_weights_(logits, top_k.cpu().long().numpy(), top_p.cpu().float().numpy(), sync_free)


def _probability_weights_(logits: torch.Tensor, top_k: np.ndarray, top_p: np.ndarray, sync_free: bool) -> torch.Tensor:
    """probability_weights_ with top_k [N] int64 and top_p [N] fp32 as host arrays: which rows
    filter, and the largest k, are read there instead of from the device."""
    vocab = logits.shape[1]
    device = logits.device
    weights = logits.sub_(logits.amax(dim=-1, keepdim=True)).clamp_min_(_MIN_LOG_WEIGHT).exp_()  # [N, V]
    k_host = effective_top_k(top_k, vocab)  # [N], in 1..V
    k = to_device(k_host, torch.long, device)  # [N]
    threshold = torch.zeros_like(weights[:, 0])  # [N]; weights below it are dropped

    k_rows_host = np.flatnonzero(k_host < vocab)  # on the host: no device read
    if k_rows_host.size:
        k_rows = to_device(k_rows_host, torch.long, device)
        k_sub = k[k_rows]
        kmax = int(k_host[k_rows_host].max())
        candidates = _select_rows(weights, k_rows).topk(kmax, dim=-1).values  # [Nk, kmax]
        threshold[k_rows] = candidates.gather(1, (k_sub - 1)[:, None]).squeeze(1)
        weights.masked_fill_(weights < threshold[:, None], 0.0)

    pending_host = np.flatnonzero(top_p < 1)
    if pending_host.size:
        pending = to_device(pending_host, torch.long, device)
        p_pending = to_device(top_p[pending_host], torch.float32, device)  # [Np]
        wanted_mass = _select_rows(weights, pending).sum(dim=-1) * p_pending  # [Np], after top-k
        if sync_free:
            _nucleus_by_sort(weights, pending, wanted_mass, k, threshold)
        else:
            _nucleus_by_candidates(weights, pending, wanted_mass, k, threshold)
        weights.masked_fill_(weights < threshold[:, None], 0.0)
    return weights


def _nucleus_cut(best: torch.Tensor, wanted_mass: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From weights sorted descending [Np, size]: (how many tokens the nucleus keeps [Np], the
    weight of the last one kept [Np])."""
    mass_before = torch.nn.functional.pad(best.cumsum(dim=-1)[:, :-1], (1, 0))  # [Np, size]
    # A token is in the nucleus if the tokens more likely than it hold less than top_p.
    keep = (mass_before < wanted_mass[:, None]).sum(dim=-1)  # [Np], >= 1
    keep = torch.minimum(keep, k)
    return keep, best.gather(1, (keep - 1)[:, None]).squeeze(1)


def _nucleus_by_candidates(weights, pending, wanted_mass, k, threshold) -> None:
    """Nucleus thresholds of rows ``pending`` into ``threshold``: the top 64 candidates first, then
    512, then 4096, and a full sort only for rows whose nucleus is larger still (reads the device)."""
    vocab = weights.shape[1]
    for size in (*_TOP_P_CANDIDATES, vocab):
        size = min(size, vocab)
        subset = _select_rows(weights, pending)  # [Np, V]
        if size < vocab:
            best = subset.topk(size, dim=-1).values  # [Np, size], descending
        else:
            best = subset.sort(dim=-1, descending=True).values  # [Np, V]
        keep, cut = _nucleus_cut(best, wanted_mass, k[pending])
        done = (keep < size) | (size == vocab)  # else the nucleus may reach past the candidates
        threshold[pending[done]] = cut[done]
        pending, wanted_mass = pending[~done], wanted_mass[~done]
        if not pending.numel():
            break


def _nucleus_by_sort(weights, pending, wanted_mass, k, threshold) -> None:
    """Nucleus thresholds of rows ``pending`` into ``threshold`` from one full sort: no shape
    depends on the data, so nothing is read back (as vLLM's top-p on a GPU)."""
    best = _select_rows(weights, pending).sort(dim=-1, descending=True).values  # [Np, V]
    _, cut = _nucleus_cut(best, wanted_mass, k[pending])
    threshold[pending] = cut


def _select_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] (a copy), or x itself when idx is every row in order. idx: [n] long, ascending."""
    if idx.numel() == x.shape[0]:  # ascending and unique, so it is arange(len(x))
        return x
    return x[idx]


def _uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One U[0, 1) fp64 draw per row: from the row's generator, else from the global RNG. [N]"""
    out = torch.empty(len(generators), dtype=torch.float64, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        draws = torch.rand(len(unseeded), dtype=torch.float64, device=device)  # one global-RNG call
        out[to_device(unseeded, torch.long, device)] = draws
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if seeded:
        draws = [
            torch.rand((), dtype=torch.float64, device=generators[i].device, generator=generators[i])
            for i in seeded
        ]
        out[to_device(seeded, torch.long, device)] = torch.stack(draws).to(device)
    return out


def _inverse_cdf_sample(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Draw index i with probability weights[i] / sum(weights), for each row; weight 0 is never drawn.

    weights: [N, V] fp32, >= 0, unnormalised; uniform: [N] fp64 in [0, 1). Returns [N] long.
    Two levels, so no [N, V] fp64 tensor is built: pick a block of _CDF_BLOCK tokens by the fp64
    cumulative sum of the block masses, then a token inside it by the fp64 cumulative sum of its
    weights. At each level the pick j satisfies cdf[j - 1] <= target < cdf[j], so its mass is > 0.
    """
    n, vocab = weights.shape
    pad = -vocab % _CDF_BLOCK
    if pad:
        weights = torch.nn.functional.pad(weights, (0, pad))  # zero weights: never drawn
    blocks = weights.view(n, -1, _CDF_BLOCK)  # [N, nb, C]
    block_cdf = blocks.sum(dim=-1).double().cumsum(dim=-1)  # [N, nb]
    total = block_cdf[:, -1:]  # [N, 1]
    target = torch.minimum(uniform[:, None] * total, _just_below(total))  # [N, 1], in [0, total)
    block = torch.searchsorted(block_cdf, target, right=True)  # [N, 1]
    before = block_cdf.gather(1, (block - 1).clamp_min(0)) * (block > 0)  # [N, 1], mass of earlier blocks
    inner_cdf = blocks[torch.arange(n, device=weights.device), block.squeeze(1)]  # [N, C]
    inner_cdf = inner_cdf.double().cumsum(dim=-1)  # [N, C]
    rest = torch.minimum(target - before, _just_below(inner_cdf[:, -1:]))  # [N, 1], >= 0
    offset = torch.searchsorted(inner_cdf, rest, right=True)  # [N, 1]
    return (block * _CDF_BLOCK + offset).squeeze(1)  # [N]


def _just_below(x: torch.Tensor) -> torch.Tensor:
    """The largest float below each (positive) element of x."""
    return x.nextafter(torch.zeros_like(x))


def _token_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int]
) -> list[TokenLogprobs]:
    """Each row's token logprob, rank and top-n. logprobs: [N, V]; token_ids: [N]; num_top: N ints."""
    chosen = logprobs.gather(1, token_ids[:, None])  # [N, 1]
    ranks = torch.count_nonzero(logprobs > chosen, dim=-1) + 1  # [N]; .sum() would copy to int64
    most = min(max(num_top, default=0), logprobs.shape[1])
    if most:
        top_values, top_ids = logprobs.topk(most, dim=-1)  # [N, most], one topk for the batch
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    else:
        top_values = top_ids = [[] for _ in num_top]
    return [
        TokenLogprobs(token, value, rank, list(zip(ids[:n], values[:n])))
        for token, value, rank, ids, values, n in zip(
            token_ids.tolist(), chosen.squeeze(1).tolist(), ranks.tolist(), top_ids, top_values, num_top
        )
    ]


def prompt_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, num_top: int) -> list[TokenLogprobs]:
    """Each prompt token's logprob, rank and top-n under log_softmax(logits), the raw distribution.

    logits: [T, V], the model's logits at positions 0..T-1; target_ids: [T], the tokens at positions
    1..T. Computed in fp32, _PROMPT_LOGPROBS_CHUNK positions at a time to bound memory.
    """
    if logits.dim() != 2 or target_ids.shape != logits.shape[:1]:
        raise ValueError(
            f"need logits [T, V] and target_ids [T], got {list(logits.shape)} and {list(target_ids.shape)}"
        )
    out: list[TokenLogprobs] = []
    targets = target_ids.to(device=logits.device, dtype=torch.long)
    for start in range(0, logits.shape[0], _PROMPT_LOGPROBS_CHUNK):
        stop = start + _PROMPT_LOGPROBS_CHUNK
        chunk = torch.log_softmax(logits[start:stop].float(), dim=-1)  # [C, V]
        out += _token_logprobs(chunk, targets[start:stop], [num_top] * chunk.shape[0])
    return out
