"""Predicts how long a request will take at each exit under the current load.

A step's time is set mostly by its deepest row (every layer's weights are read once per step,
whatever the number of rows running it), plus a small cost per row, per cached token the decoding
rows attend to, per prefill token, and per (prompt token, earlier token) pair that prefill attends
to (the quadratic part: at 4k tokens, more than half of a CPU prefill). So a request's end-to-end
latency at exit e, joining a batch whose deepest running exit is d, is about

    queue wait + prefill of the prompts ahead + prefill(e, prompt tokens, their pairs)
        + max_tokens * decode_step(max(e, d), rows + 1, context tokens of those rows)

Coefficients are measured by :func:`calibrate` at start-up through the real engine, then corrected
online from every step's measured time (exponentially weighted ratio of measured to predicted).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class ExitCost:
    decode_base_s: float  # a decode step whose deepest row exits here, with one row
    decode_per_row_s: float  # added by each further row
    prefill_per_token_s: float  # each prompt token prefilled at this exit
    prefill_per_pair_s: float = 0.0  # each (prompt token, cached-or-earlier token) pair attended
    decode_per_context_s: float = 0.0  # each cached token one decoding row attends to


@dataclass(frozen=True)
class LoadSnapshot:
    """The engine's load when a request arrives."""

    running_exits: tuple[int, ...]  # exit of every running request
    num_waiting: int  # requests queued ahead
    mean_remaining_tokens: float  # tokens the running requests still have to generate, on average
    max_num_seqs: int  # running slots
    waiting_exits: tuple[int, ...] = ()  # exit of every queued request (they will share our steps)
    pending_prefill_tokens: int = 0  # prompt tokens of running and queued requests not yet prefilled
    pending_prefill_pairs: int = 0  # attention pairs of those tokens (see prompt_pairs)
    context_tokens: int = 0  # tokens in context of every running and queued request


@dataclass
class LatencyModel:
    costs: dict[int, ExitCost]  # by exit layer (full depth included)
    smoothing: float = 0.2  # weight of each new observation in the online correction
    observations: int = field(default=0)
    # Measured / predicted end-to-end latency of recent requests: what the step model misses
    # (arrivals that join later, prefill chunks of others, scheduling gaps), learnt as a whole,
    # separately for each admission batch class (see e2e_class): a request admitted into a small
    # batch is slowed far more by later arrivals than one admitted into a full batch, and one
    # factor for both (the 95th percentile of the mix) made the router 2-3x pessimistic at load.
    e2e_ratios: dict = field(default_factory=dict)  # e2e_class -> deque of measured / predicted
    e2e_window: int = 128  # finished requests remembered per class
    e2e_quantile: float = 0.95  # predictions are scaled so this share of requests would have fit
    min_e2e_samples: int = 8  # below this many finished requests in a class, all classes pooled

    @staticmethod
    def e2e_class(rows: int) -> int:
        """Admission batch class: rows 1, 2-3, 4-7, 8-15, ... (the batch's size to a factor of 2)."""
        return max(1, rows).bit_length()

    def e2e_factor(self, rows: int) -> float:
        """The ``e2e_quantile`` of measured / predicted for requests admitted into a batch of
        ``rows`` (its class; every class pooled while it has too few), never below 1."""
        ratios = list(self.e2e_ratios.get(self.e2e_class(rows), ()))
        if len(ratios) < self.min_e2e_samples:
            ratios = [r for q in list(self.e2e_ratios.values()) for r in list(q)]  # copies: another thread appends
        if len(ratios) < self.min_e2e_samples:
            return 1.0
        ordered = sorted(ratios)
        return max(1.0, ordered[min(len(ordered) - 1, int(self.e2e_quantile * len(ordered)))])

    def observe_request(self, predicted_s: float, measured_s: float, rows: int) -> None:
        """Learn from one finished request: ``predicted_s`` is :meth:`predict`'s unscaled value,
        ``rows`` the batch it was predicted to join (:meth:`batch_rows`)."""
        if predicted_s > 0 and measured_s > 0:
            window = self.e2e_ratios.setdefault(self.e2e_class(rows), deque(maxlen=self.e2e_window))
            window.append(measured_s / predicted_s)

    @staticmethod
    def batch_rows(load: LoadSnapshot) -> int:
        """Rows of the batch a request arriving now joins: running and queued requests, and itself."""
        return min(len(load.running_exits) + len(load.waiting_exits) + 1, load.max_num_seqs)

    def decode_step(self, deepest_exit: int, rows: int, context_tokens: float = 0) -> float:
        """One decode step of ``rows`` rows attending to ``context_tokens`` cached tokens in all."""
        cost = self.costs[deepest_exit]
        return (cost.decode_base_s + cost.decode_per_row_s * max(0, rows - 1)
                + cost.decode_per_context_s * context_tokens)

    def prefill(self, exit_layer: int, tokens: int, pairs: int | None = None) -> float:
        """Prefill of ``tokens`` tokens attending to ``pairs`` (token, key) pairs in all (default:
        one fresh prompt of that many tokens)."""
        cost = self.costs[exit_layer]
        pairs = prompt_pairs(tokens) if pairs is None else pairs
        return cost.prefill_per_token_s * tokens + cost.prefill_per_pair_s * pairs

    def queue_wait(self, load: LoadSnapshot) -> float:
        """Time until a slot frees for a request arriving now."""
        deepest = max(load.running_exits, default=min(self.costs))
        step = self.decode_step(deepest, len(load.running_exits), load.context_tokens)
        if len(load.running_exits) < load.max_num_seqs and load.num_waiting == 0:
            return step / 2  # joins at the next step boundary
        # Slots free as running requests finish; those ahead of us take the first ones.
        rounds = (load.num_waiting + 1) / load.max_num_seqs
        return step / 2 + rounds * load.mean_remaining_tokens * step

    def predict(self, exit_layer: int, prompt_tokens: int, max_tokens: int, load: LoadSnapshot) -> float:
        """End-to-end seconds for a request served at ``exit_layer``.

        Requests already queued will run beside this one, so they count in its batch too.
        """
        others = load.running_exits + load.waiting_exits
        deepest = max(exit_layer, *others) if others else exit_layer
        # Our context grows from the prompt to prompt + max_tokens: half of that on average.
        context = load.context_tokens + prompt_tokens + max_tokens / 2
        return (
            self.queue_wait(load)
            # Prefill is first come, first served: the prompts ahead run in the steps before ours.
            + self.prefill(deepest, load.pending_prefill_tokens, load.pending_prefill_pairs)
            + self.prefill(exit_layer, prompt_tokens)
            + max(1, max_tokens) * self.decode_step(deepest, self.batch_rows(load), context)
        )

    def observe(self, seconds: float, deepest_exit: int, num_rows: int, num_prefill_tokens: int,
                prefill_pairs: int = 0, context_tokens: int = 0) -> None:
        """Correct the coefficients with one measured step (its shape as :class:`StepStats` gives it).

        The step's deepest exit learns at full weight; the other exits follow at half weight, since
        what moves one step's time (other load on the machine, cache effects) mostly moves all.
        """
        cost = self.costs.get(deepest_exit)
        if cost is None or seconds <= 0:
            return
        decode = self.decode_step(deepest_exit, num_rows, context_tokens)
        prefill = self.prefill(deepest_exit, num_prefill_tokens, prefill_pairs)
        ratio = min(max(seconds / (decode + prefill), 0.25), 4.0)  # one outlier cannot wreck the model
        for exit_layer, c in self.costs.items():
            weight = self.smoothing if exit_layer == deepest_exit else self.smoothing / 2
            scale = 1 + weight * (ratio - 1)
            if num_prefill_tokens == 0:
                c.decode_base_s *= scale
                c.decode_per_row_s *= scale
                c.decode_per_context_s *= scale
            else:
                c.prefill_per_token_s *= scale
                c.prefill_per_pair_s *= scale
        self.observations += 1


def prompt_pairs(tokens: int, cached: int = 0) -> int:
    """(query, key) pairs causal attention visits when ``tokens`` new tokens follow ``cached`` ones."""
    return tokens * cached + tokens * (tokens + 1) // 2


def calibrate(engine, exits=None, batch: int = 8, steps: int = 6, prompt_tokens: int = 96,
              burst: int = 32, long_prompt_tokens: int = 1024) -> LatencyModel:
    """Measure each exit's decode and prefill costs through the real engine (a few seconds).

    First a burst of ``burst`` short requests (capped by max_num_seqs) runs a few full-depth
    steps, so the first burst of real traffic does not meet shapes the kernels have never run:
    measured on the default model on CPU, a cold 16-request burst took 2-4x its prediction, and
    the router learnt that as if load always did so.
    Then, per exit: decode steps of one row and of ``batch`` rows, and the prefill of a
    ``prompt_tokens`` prompt. Last, at the deepest exit only, a ``long_prompt_tokens`` prompt and
    decode steps at that context separate the attention terms (cost per prefill pair, per cached
    token decoded) from the per-token ones; other exits get them in proportion to the attention
    layers they run, since only the number of layers differs.
    The engine must be idle. Requests used here are aborted afterwards, leaving no blocks held.
    """
    from balcony_runtime.sampling_params import SamplingParams

    exits = exits or engine.exits
    batch = max(2, min(batch, engine.config.max_num_seqs))
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    filler = [1000 + (i % 500) for i in range(max(prompt_tokens, long_prompt_tokens))]
    warm = [engine.add_request(filler[: 8 + i % 24], params, engine.exits[-1])
            for i in range(max(1, min(burst, engine.config.max_num_seqs)))]
    for _ in range(4):  # prefill (possibly in chunks) and decode steps at the burst's batch size
        engine.step()
    for rid in warm:
        engine.abort(rid)

    def median_step() -> float:
        """Median of ``steps`` timed steps: robust to a stall on a busy host."""
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    def prefill(exit_layer: int, prompt: list[int]) -> tuple[str, float, int]:
        """Queue the prompt and step until it is prefilled (in chunks where it is long): its
        request id (still running, for decode steps at its context), seconds and steps taken."""
        rid = engine.add_request(prompt, params, exit_layer)
        seconds, chunks = 0.0, 0
        while engine.request_needs_prefill(rid):
            start = time.perf_counter()
            engine.step()
            seconds += time.perf_counter() - start
            chunks += 1
        return rid, seconds, chunks

    def median_decode(exit_layer: int, prompts: list[list[int]]) -> float:
        """Median decode step of these prompts' rows, after their prefill."""
        ids = [engine.add_request(p, params, exit_layer) for p in prompts]
        while any(engine.request_needs_prefill(rid) for rid in ids):
            engine.step()
        elapsed = median_step()
        for rid in ids:
            engine.abort(rid)
        return elapsed

    costs, short_prefill = {}, {}
    for exit_layer in exits:
        median_decode(exit_layer, [filler[:8]])  # warm-up: first steps at a new shape are slower
        one = median_decode(exit_layer, [filler[:8]])
        many = median_decode(exit_layer, [filler[: 8 + r] for r in range(batch)])
        rid, seconds, chunks = prefill(exit_layer, filler[:prompt_tokens])
        engine.abort(rid)
        short_prefill[exit_layer] = max(seconds - chunks * one, 0.0)  # less each step's fixed cost
        costs[exit_layer] = ExitCost(
            decode_base_s=one,
            decode_per_row_s=max(0.0, (many - one) / (batch - 1)),
            prefill_per_token_s=short_prefill[exit_layer] / prompt_tokens,
        )

    deepest = max(exits)
    long_tokens = min(long_prompt_tokens, engine.loaded.max_model_len - params.max_tokens - 1)
    deepest_layers = len(engine.model.cache_layers_of(deepest))
    while long_tokens > 2 * prompt_tokens and not engine.blocks.fits_at_all(deepest_layers, long_tokens + params.max_tokens):
        long_tokens //= 2  # a small KV cache: measure what fits (attention terms stay 0 if nothing does)
    if long_tokens > 2 * prompt_tokens:
        rid, seconds, chunks = prefill(deepest, filler[:long_tokens])
        long_decode = median_step()  # one row at the long context
        engine.abort(rid)
        long_prefill = max(seconds - chunks * costs[deepest].decode_base_s, 0.0)
        # Two prompt lengths, two unknowns: s = per_token * n + per_pair * pairs(n).
        short_pairs, long_pairs = prompt_pairs(prompt_tokens), prompt_pairs(long_tokens)
        ratio = long_tokens / prompt_tokens
        per_pair = max(0.0, (long_prefill - ratio * short_prefill[deepest]) / (long_pairs - ratio * short_pairs))
        per_context = max(0.0, (long_decode - costs[deepest].decode_base_s) / (long_tokens - 8))
        layers = {e: len(engine.model.cache_layers_of(e)) for e in exits}
        for exit_layer, cost in costs.items():
            share = layers[exit_layer] / layers[deepest]
            cost.prefill_per_pair_s = per_pair * share
            cost.decode_per_context_s = per_context * share
            cost.prefill_per_token_s = max(0.0, short_prefill[exit_layer] - cost.prefill_per_pair_s * short_pairs) / prompt_tokens
    return LatencyModel(costs)
