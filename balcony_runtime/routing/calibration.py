"""Start-up calibration: run a spread of step shapes through the real engine and fit the step cost.

Every step the calibration runs is one sample (its shape, its measured seconds) for one joint
non-negative fit over all exits (routing/step_cost.py), so a stall in one measurement moves the
fit a little instead of making one exit cost more than a deeper one.

With a cache (routing/calibration_cache.py) a fit measured earlier for the same model, machine and
settings is read back instead, after a short warm-up: the engine refits it from live steps anyway.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from balcony_runtime.cpu_contention import BUSY_CORES, CpuContention
from balcony_runtime.routing.calibration_cache import CalibrationCache, CalibrationKey
from balcony_runtime.routing.step_cost import RowShape, StepCostModel, StepShape

log = logging.getLogger("balcony.calibration")


@dataclass(frozen=True)
class Run:
    """Requests started together, stepped until all have prefilled, then ``decode_steps`` more."""

    requests: tuple[tuple[tuple[int, ...], int], ...]  # (prompt ids, exit) of each request
    decode_steps: int  # recorded decode steps after the first (a new shape's first step is slower)


def calibrate(engine, batch: int = 8, steps: int = 3, prompt_tokens: int = 96, burst: int = 16,
              long_prompt_tokens: int = 1024, cache: CalibrationCache | None = None,
              on_phase: Callable[[str], None] | None = None) -> StepCostModel:
    """Measure through ``engine`` (which must be idle) and return a fitted :class:`StepCostModel`.

    Shapes: a warm-up burst at full depth (not recorded); per exit, a ``prompt_tokens`` prefill then
    decode steps of one row, and a prefill of ``batch`` short prompts then their decode steps; a
    batch spread over every exit; at full depth a ``long_prompt_tokens`` prompt (shrunk to what the
    cache holds) and decode steps at its context, for the attention term. The first decode step
    after each prefill is not recorded. Every request used is aborted afterwards.

    ``cache``: read a fit for this engine's key instead of measuring (then only a short warm-up
    runs), and store what is measured. ``on_phase`` is told "warm-up", then "calibration".
    """
    from balcony_runtime.sampling_params import SamplingParams

    announce = on_phase or (lambda phase: None)
    settings = dict(batch=batch, steps=steps, prompt_tokens=prompt_tokens, burst=burst,
                    long_prompt_tokens=long_prompt_tokens)
    key = CalibrationKey.of(engine, settings) if cache is not None else None
    cached = cache.load(key, engine.model.full_depth) if cache is not None else None
    exits = engine.exits
    params = SamplingParams(max_tokens=steps + 3, temperature=0, ignore_eos=True)
    # A server started with a short --max-model-len measures with prompts that fit it (the filler
    # is cut to this length, so every prompt below is at most this long).
    room = max(1, engine.loaded.max_model_len - params.max_tokens)
    prompt_tokens = min(prompt_tokens, room)
    filler = tuple(1000 + (i % 500) for i in range(min(max(prompt_tokens, long_prompt_tokens), room)))
    salt = itertools.count()  # makes every prompt's first block its own (see _run)
    announce("warm-up")
    if cached is not None:
        # One short request per exit, batched as far as max_num_seqs allows: every balcony and the
        # head run before the first client does.
        log.info("warm-up: one short request at each exit")
        requests = [(filler[: 8 + i], e) for i, e in enumerate(exits)]
        per_run = max(1, engine.config.max_num_seqs)
        for first in range(0, len(requests), per_run):
            _run(engine, params, Run(tuple(requests[first:first + per_run]), 0), [], salt)
        announce("calibration")
        log.info("calibration: step costs read from %s (measured %s in %.0f s; --recalibrate measures again); "
                 "refined from live steps", cached.path, cached.measured_at, cached.seconds)
        return cached.model

    warm = max(1, min(burst, engine.config.max_num_seqs))
    log.info("warm-up: %d short requests at full depth, then one prompt at the shallowest and deepest exits", warm)
    _run(engine, params, Run(tuple((filler[: 8 + i % 24], exits[-1]) for i in range(warm)), 1), [], salt)
    # Steps of two shapes the plan measures, for its duration's estimate (the burst's first steps
    # pay the process's one-time costs: they would inflate it several times over).
    warm_samples: list[tuple[StepShape, float]] = []
    for e in sorted({exits[0], exits[-1]}):
        _run(engine, params, Run(((filler[:prompt_tokens], e),), 1), warm_samples, salt)

    plan = measuring_plan(engine, filler, params.max_tokens, batch, steps, prompt_tokens, long_prompt_tokens)
    announce("calibration")
    log.info("calibration: measuring step costs at exits %s in %d runs, about %.0f s",
             ", ".join(map(str, exits)), len(plan), expected_seconds(plan, warm_samples, engine.model.full_depth))
    started = time.perf_counter()
    contention = CpuContention()
    contention.start()
    samples: list[tuple[StepShape, float]] = []
    for attempt in range(1 + REMEASURES):
        for run in plan:
            _run(engine, params, run, samples, salt)
        model = StepCostModel(engine.model.full_depth)
        model.fit(samples)  # every round's samples: a second round halves the noise's share
        if costs_depth(model, exits, batch, prompt_tokens):
            break
        # Beside a busy machine the samples can be noisier than the depth's share of a step, and the
        # non-negative fit then puts nothing on the layers: every exit predicted alike, and no
        # budget could buy latency with depth. More samples, not a flat model.
        if attempt < REMEASURES:
            log.warning("calibration: the fitted step costs do not grow with depth (a busy machine?); "
                        "measuring again (%d of %d)", attempt + 1, REMEASURES)
    else:
        log.warning("calibration: the step costs still do not grow with depth; routing by budget will "
                    "pick the deepest exit predicted to meet it, whatever the measurements say")
    seconds = time.perf_counter() - started
    others = contention.others_cores()
    if cache is not None and others is not None and others >= BUSY_CORES:
        # Costs measured beside another job would be the cached start of every later start here;
        # live steps refit the model either way.
        log.warning("calibration: measured in %.0f s while other processes used %.1f CPU cores; not cached, "
                    "the next start measures again", seconds, others)
    elif cache is not None:
        path = cache.store(key, model, seconds)
        log.info("calibration: measured in %.0f s, cached at %s", seconds, path)
    return model


REMEASURES = 2  # rounds of the plan measured again while the fit puts no cost on depth


def costs_depth(model: StepCostModel, exits: tuple[int, ...], batch: int, context: int) -> bool:
    """Whether a step of the deepest exit is predicted to take longer than one of the shallowest,
    alone and in a batch (trivially true with one exit). Longer by more than rounding: a fit that
    clamps the layers' terms to zero leaves them at about 1e-14 of a step."""
    if len(exits) < 2:
        return True
    return all(model.step_seconds([RowShape(exits[0], 1, context)] * rows) * (1 + 1e-6)
               < model.step_seconds([RowShape(exits[-1], 1, context)] * rows) for rows in (1, max(1, batch)))


def measuring_plan(engine, filler: tuple[int, ...], max_tokens: int, batch: int, steps: int,
                   prompt_tokens: int, long_prompt_tokens: int) -> list[Run]:
    """The runs whose steps are recorded (see :func:`calibrate`)."""
    exits = engine.exits
    batch = max(2, min(batch, engine.config.max_num_seqs))
    plan = []
    for e in exits:
        plan.append(Run(((filler[:prompt_tokens], e),), steps))
        plan.append(Run(tuple((filler[: 8 + r], e) for r in range(batch)), steps))
    plan.append(Run(tuple((filler[: 8 + r], exits[r % len(exits)]) for r in range(batch)), steps))

    deepest = exits[-1]
    layers = len(engine.model.cache_layers_of(deepest))
    long_tokens = min(long_prompt_tokens, engine.loaded.max_model_len - max_tokens - 1)
    while long_tokens > 2 * prompt_tokens and not engine.blocks.fits_at_all(layers, long_tokens + max_tokens):
        long_tokens //= 2  # a small KV cache: measure what fits
    if long_tokens > 2 * prompt_tokens:
        plan.append(Run(((filler[:long_tokens], deepest),), steps))
    return plan


def expected_seconds(plan: list[Run], warm_samples: list[tuple[StepShape, float]], full_depth: int) -> float:
    """How long measuring ``plan`` should take, from a step-cost fit to the warm-up's steps.

    Each run is priced as one prefill step and ``decode_steps + 1`` decode steps (prefill chunking
    is ignored): a figure for the log, not for routing.
    """
    model = StepCostModel(full_depth)
    model.fit(warm_samples)
    total = 0.0
    for run in plan:
        total += model.step_seconds([RowShape(e, len(p), 0) for p, e in run.requests])
        for i in range(run.decode_steps + 1):
            total += model.step_seconds([RowShape(e, 1, len(p) + i) for p, e in run.requests])
    return total


def _run(engine, params, run: Run, samples: list[tuple[StepShape, float]], salt: Iterator[int]) -> None:
    """Step ``run`` through ``engine``, appending (shape, seconds) of its recorded steps to ``samples``.

    Each prompt's first token comes from ``salt``, so no prompt shares a block with another and the
    prefix cache cannot turn a measured prefill into a few tokens: the prompts all cut the filler."""

    def step(record: bool) -> None:
        before = engine.last_step
        start = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - start
        # An overlapped engine reads each step during the call that launches the next (and none
        # during the first): the call's time is then the step period, paired with the step it read.
        if record and engine.last_step is not None and engine.last_step is not before:
            samples.append((engine.last_step.shape, seconds))

    # Token ids of the filler's range (which the vocabulary has); a calibration runs far fewer
    # requests than the range holds.
    ids = [engine.add_request([1000 + next(salt) % 500, *p[1:]], params, e) for p, e in run.requests]
    while any(engine.request_needs_prefill(rid) for rid in ids):
        step(record=True)
    step(record=False)
    for _ in range(run.decode_steps):
        step(record=True)
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():  # an overlapped step still in flight: read (and drop) it
        engine.step()
