"""Draw a top-k row's token from its k best candidates instead of the whole vocabulary.

A row with top-k keeps k tokens of 49,152, yet the whole-vocabulary path (sampler's
_probability_weights_ and _inverse_cdf_sample) takes exp over every token, masks every token below
the cut and sums every block for the inverse CDF. Here the row's k + 1 largest logits (torch.topk)
carry all of it, top-p included, since top-p is measured on the top-k-filtered distribution:

- weights: exp(max(s - s_max, floor)) of the candidates, the same fp32 operations on the same
  values as the whole-vocabulary path, so each candidate's weight is bit for bit that path's;
- top-k: the k-th candidate's weight is the cut, and every candidate at least as heavy is kept
  (ties with the last kept token stay, as on the whole-vocabulary path);
- top-p: the smallest set of heaviest kept candidates holding at least top_p of their mass,
  widened to its ties;
- the draw: the kept candidates in vocabulary order, fp64 cumulative sums, one uniform per row: the
  token the whole-vocabulary inverse CDF picks for the same uniform, up to the rounding of its fp32
  block sums (a draw within about 1e-7 of a boundary can land on the neighbour).

A row is left to the whole-vocabulary path (its token -1 here) when it has no top-k or one above
the largest candidate size, or when a run of ties fills all k + 1 candidates and may continue past
them. That depends on the row's own parameters and logits only, so a seeded row still draws the
same token whatever batch it sits in. Rows without top-k gain nothing here: their top-p needs the
whole row's mass and a nucleus search (sampler._nucleus_by_candidates) that already reads only
candidates. Reads the device (data-dependent shapes): the CPU path only.
"""

from __future__ import annotations

import numpy as np
import torch

from balcony_runtime.staging import to_device


def effective_top_k(top_k: np.ndarray, vocab: int) -> np.ndarray:
    """Each row's top-k as the count of tokens it keeps, 1..V: off (0, -1 or above V) is V."""
    return np.where((top_k <= 0) | (top_k > vocab), vocab, top_k)


def sample_by_candidates(
    scaled: torch.Tensor, top_k: np.ndarray, top_p: np.ndarray, uniform: torch.Tensor,
    sizes: tuple[int, ...], floor: float,
) -> torch.Tensor:
    """Tokens of the top-k rows of ``scaled``, drawn from their candidates; -1 for the rows left to
    the whole-vocabulary path.

    scaled: [N, V] fp32, temperature-scaled logits, read only; top_k: [N] int64 host (0, -1 or >= V:
    off); top_p: [N] fp32 host (1: off); uniform: [N] fp64 in [0, 1); sizes: ascending candidate
    sizes, rows grouped by the smallest that holds their k (one topk per group). Returns [N] int64.
    """
    n, vocab = scaled.shape
    out = torch.full((n,), -1, dtype=torch.long, device=scaled.device)
    k_host = effective_top_k(top_k, vocab)  # [N], in 1..V
    smaller = 0
    for size in sizes:
        group = np.flatnonzero((k_host > smaller) & (k_host <= size) & (k_host < vocab))
        smaller = size
        if group.size:
            rows = to_device(group, torch.long, scaled.device)
            out[rows] = _draw_group(scaled, group, rows, k_host[group], top_p[group], uniform, floor)
    return out


def _draw_group(scaled, group, rows, k, p, uniform, floor) -> torch.Tensor:
    """Tokens of rows ``group`` (host) / ``rows`` (device) with top-k ``k`` [R] and top-p ``p`` [R],
    -1 where a tie run fills every candidate. [R] int64."""
    vocab = scaled.shape[1]
    device = scaled.device
    c = min(int(k.max()) + 1, vocab)  # one beyond the largest k, to see whether ties continue past it
    chosen = scaled if len(group) == scaled.shape[0] else scaled[rows]  # (rows ascending, unique)
    values, ids = chosen.topk(c, dim=-1)  # [R, c], descending
    weights = values.sub_(values[:, :1].clone()).clamp_min_(floor).exp_()  # [R, c], as the whole path's
    position = torch.arange(c, device=device)
    k_cut = weights.gather(1, to_device(k - 1, torch.long, device)[:, None])  # [R, 1]
    kept = (weights >= k_cut).sum(dim=-1)  # [R], k and its ties
    if (p < 1).any():
        mass = (weights * (position < kept[:, None])).sum(dim=-1)  # [R], the top-k-filtered mass
        mass_before = torch.nn.functional.pad(weights.cumsum(dim=-1)[:, :-1], (1, 0))  # [R, c]
        wanted = mass * to_device(p, torch.float32, device)  # [R]
        keep = torch.minimum((mass_before < wanted[:, None]).sum(dim=-1), kept)  # [R], >= 1
        p_cut = weights.gather(1, (keep - 1)[:, None])  # [R, 1]
        nucleus = (weights >= p_cut).sum(dim=-1)  # [R], widened to its ties
        kept = torch.where(to_device(p < 1, torch.bool, device), nucleus, kept)
    resolved = (kept < c) | (c == vocab)  # else the kept run may continue past the candidates
    # The draw, over the kept candidates in vocabulary order (the whole-vocabulary path's order).
    in_set = position < kept[:, None]  # [R, c]
    order = torch.where(in_set, ids, vocab).argsort(dim=-1)  # kept ids ascending, the rest after
    cdf = (weights * in_set).gather(1, order).double().cumsum(dim=-1)  # [R, c]
    total = cdf.gather(1, (kept - 1)[:, None])  # [R, 1]
    target = torch.minimum(uniform[rows][:, None] * total, total.nextafter(torch.zeros_like(total)))
    pick = torch.searchsorted(cdf, target, right=True).clamp_max_(c - 1)  # [R, 1]
    tokens = ids.gather(1, order.gather(1, pick)).squeeze(1)  # [R]
    return torch.where(resolved, tokens, -1)
