"""Start-up calibration: run a spread of step shapes through the real engine and fit the step cost.

Every step the calibration runs is one sample (its shape, its measured seconds) for one joint
non-negative fit over all exits (routing/step_cost.py), so a stall in one measurement moves the
fit a little instead of making one exit cost more than a deeper one.
"""

from __future__ import annotations

import time

from balcony_runtime.routing.step_cost import StepCostModel, StepShape


def calibrate(engine, batch: int = 8, steps: int = 3, prompt_tokens: int = 96, burst: int = 16,
              long_prompt_tokens: int = 1024) -> StepCostModel:
    """Measure through ``engine`` (which must be idle) and return a fitted :class:`StepCostModel`.

    Shapes: a warm-up burst at full depth (not recorded); per exit, a ``prompt_tokens`` prefill then
    decode steps of one row, and a prefill of ``batch`` short prompts then their decode steps; a
    batch spread over every exit; at full depth a ``long_prompt_tokens`` prompt (shrunk to what the
    cache holds) and decode steps at its context, for the attention term. The first decode step
    after each prefill is not recorded (a new shape's first step is slower). Every request used is
    aborted afterwards.
    """
    from balcony_runtime.sampling_params import SamplingParams

    exits = engine.exits
    batch = max(2, min(batch, engine.config.max_num_seqs))
    params = SamplingParams(max_tokens=steps + 3, temperature=0, ignore_eos=True)
    filler = [1000 + (i % 500) for i in range(max(prompt_tokens, long_prompt_tokens))]
    samples: list[tuple[StepShape, float]] = []

    def step(record: bool) -> None:
        start = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - start
        if record and engine.last_step is not None:
            samples.append((engine.last_step.shape, seconds))

    def run(prompts_and_exits: list[tuple[list[int], int]], decode_steps: int, record: bool = True) -> None:
        ids = [engine.add_request(p, params, e) for p, e in prompts_and_exits]
        while any(engine.request_needs_prefill(rid) for rid in ids):
            step(record)
        step(record=False)
        for _ in range(decode_steps):
            step(record)
        for rid in ids:
            engine.abort(rid)

    warm = max(1, min(burst, engine.config.max_num_seqs))
    run([(filler[: 8 + i % 24], exits[-1]) for i in range(warm)], 0, record=False)
    for e in exits:
        run([(filler[:prompt_tokens], e)], steps)
        run([(filler[: 8 + r], e) for r in range(batch)], steps)
    run([(filler[: 8 + r], exits[r % len(exits)]) for r in range(batch)], steps)

    deepest = exits[-1]
    layers = len(engine.model.cache_layers_of(deepest))
    long_tokens = min(long_prompt_tokens, engine.loaded.max_model_len - params.max_tokens - 1)
    while long_tokens > 2 * prompt_tokens and not engine.blocks.fits_at_all(layers, long_tokens + params.max_tokens):
        long_tokens //= 2  # a small KV cache: measure what fits
    if long_tokens > 2 * prompt_tokens:
        run([(filler[:long_tokens], deepest)], steps)

    model = StepCostModel(engine.model.full_depth)
    model.fit(samples)
    return model
