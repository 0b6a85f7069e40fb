"""The short path of LLMEngine._postprocess (a plain request's decode token that does not end it)
against the whole path (_row_output) for every row: the same outputs, field by field, under
arrivals of every kind of request (stop strings, stop tokens, end of sequence, logprobs, prompt
logprobs, lengths of one token), aborts, synchronous and overlapped steps."""

from __future__ import annotations

import collections
import dataclasses
import random

import pytest

from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.sampling_params import SamplingParams

# Fields a twin engine reproduces (the times are each engine's own clock readings).
_COMPARED = ("request_id", "exit_layer", "new_token_ids", "new_text", "new_logprobs", "prompt_logprobs",
             "num_prompt_tokens", "num_output_tokens", "finished", "finish_reason", "num_cached_tokens")


def _emitted(model) -> list[int]:
    """Tokens this model often writes (its stop tokens are met only if they come up)."""
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 300) for _ in range(rng.randint(2, 20))] for _ in range(12)]
    seen: collections.Counter = collections.Counter()
    for exit_layer in (1, 3, "full"):
        done = LLMEngine(model, EngineConfig()).generate(prompts, SamplingParams(max_tokens=20, temperature=0),
                                                        exit_layer=exit_layer)
        seen.update(token for d in done for token in d.token_ids)
    return [token for token, _ in seen.most_common(16)]


def _params(rng: random.Random, emitted: list[int]) -> SamplingParams:
    kind = rng.random()
    return SamplingParams(
        max_tokens=rng.choice([1, 2, rng.randint(3, 40), rng.randint(3, 40)]),
        temperature=0,
        stop=rng.choice([["e"], ["the", "."], [" a"]]) if kind < 0.2 else [],
        stop_token_ids=rng.sample(emitted, 4) if rng.random() < 0.5 else [],
        ignore_eos=rng.random() < 0.5,
        logprobs=2 if 0.2 <= kind < 0.3 else None,
        prompt_logprobs=1 if 0.3 <= kind < 0.35 else None,
    )


def _drive(model, whole_path: bool, overlap: bool, seed: int, emitted: list[int]):
    rng = random.Random(seed)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=6, max_num_batched_tokens=64, overlap_steps=overlap))
    whole = 0
    row_output = engine._row_output

    def counted(*args):
        nonlocal whole
        whole += 1
        return row_output(*args)

    engine._row_output = counted
    outputs = []
    shared = [[rng.randrange(5, 300) for _ in range(40)] for _ in range(2)]  # prompts cached for later requests

    times: dict[str, set] = collections.defaultdict(set)

    def step():
        for out in engine.step():
            outputs.append(tuple(getattr(out, name) for name in _COMPARED))
            if out.new_token_ids:
                times[out.request_id].add((out.arrival_time, out.first_scheduled_time, out.first_token_time))

    for i in range(300):
        if rng.random() < (0.6 if i % 30 < 8 else 0.05):
            prompt = rng.choice(shared) if rng.random() < 0.3 else [rng.randrange(5, 300) for _ in range(rng.randint(2, 20))]
            rid = engine.add_request(prompt, _params(rng, emitted), exit_layer=rng.choice([1, 3, "full"]), request_id=f"r{i}")
            if whole_path:
                engine._tracked[rid].plain_text = None  # every row of it by the whole path
        if rng.random() < 0.01 and engine._tracked:
            engine.abort(rng.choice(sorted(engine._tracked)))
        step()
    while engine.has_unfinished():
        step()
    # A request's times, the same in each output with a token: arrival, first step, first token.
    assert all(len(seen) == 1 and a <= s <= t for seen in times.values() for a, s, t in seen)
    return outputs, whole


@pytest.mark.parametrize("overlap", [False, True])
def test_the_short_path_gives_the_outputs_the_whole_path_gives(tiny_model, overlap):
    emitted = _emitted(tiny_model)
    (outputs, whole), (reference, whole_ref) = (_drive(tiny_model, w, overlap, 3, emitted) for w in (False, True))
    assert whole_ref == len(reference)
    assert whole < len(outputs) / 2  # most outputs took the short path
    stops = sum(reason == "stop" for *_, reason, _ in reference)
    assert stops >= 5, stops  # stop tokens and strings were met
    assert outputs == reference


def test_a_plain_request_is_one_with_nothing_but_its_tokens_to_follow(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig())
    plain = SamplingParams(max_tokens=4, stop_token_ids=[7])
    for params, expected in [(plain, True), (dataclasses.replace(plain, stop=["x"]), False),
                             (dataclasses.replace(plain, logprobs=0), False),
                             (dataclasses.replace(plain, prompt_logprobs=0), False),
                             (dataclasses.replace(plain, max_tokens=0, prompt_logprobs=0), False)]:
        rid = engine.add_request([5, 6, 7], params)
        assert (engine._tracked[rid].plain_text is not None) == expected, params
    tracked = engine._tracked[engine.add_request([5, 6], plain)]
    assert tracked.stop_ids == engine.eos_token_ids | {7}
