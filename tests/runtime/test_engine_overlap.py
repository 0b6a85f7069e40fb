"""Overlapped steps (EngineConfig.overlap_steps): the same outputs as synchronous steps.

On a CPU nothing runs in parallel, but every piece of the overlap runs: the next step is scheduled
and launched before the last one's tokens are read, its inputs take the unread tokens through
placeholders, stops are seen a step late and the extra token dropped. The reference is the same
engine stepping synchronously, itself tested against transformers (test_engine.py).
"""

from __future__ import annotations

import pytest

from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.sampling_params import SamplingParams
from balcony_runtime.structured.constraint import StructuredOutput

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Here is a list of three colours:",
    "1, 2, 3, 4,",
]


def run_both(model, prompts, params, exits=None, **config):
    """generate() with synchronous and with overlapped steps; both engines checked drained."""
    outs = []
    for overlap in (False, True):
        engine = LLMEngine(model, EngineConfig(overlap_steps=overlap, **config))
        outs.append(engine.generate(prompts, params, exits))
        assert not engine.has_unfinished() and engine.blocks.num_used_blocks == 0
        assert not engine._tracked and not engine.runner.input_batch.slot_of
    return outs


def same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert (x.token_ids, x.text, x.finish_reason, x.exit_layer) == (y.token_ids, y.text, y.finish_reason, y.exit_layer)
        assert all(t >= 0 for t in y.token_ids)


def test_greedy_lengths_and_exits_match_synchronous_steps(tiny_model):
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (1, 2, 7, 16, 5)]
    exits = [None, 2, "full", 2, None]
    sync, overlapped = run_both(tiny_model, PROMPTS, params, exits, num_kv_blocks=1024)
    same(sync, overlapped)
    assert [len(o.token_ids) for o in overlapped] == [1, 2, 7, 16, 5]


def test_stops_seen_a_step_late_drop_the_extra_token(tiny_model):
    """Stop tokens and stop strings end requests mid-batch while others go on; the overlapped
    engine has already launched the next step with them, and must drop what it sampled for them."""
    reference = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=1024)).generate(
        PROMPTS, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    params = [
        SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[reference[0].token_ids[3]]),
        SamplingParams(max_tokens=16, temperature=0, stop=[reference[1].text[5:9]]),
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[reference[3].token_ids[0]]),
        SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
    ]
    sync, overlapped = run_both(tiny_model, PROMPTS, params, num_kv_blocks=1024)
    same(sync, overlapped)
    assert [o.finish_reason for o in overlapped] == ["stop", "stop", "length", "stop", "length"]
    assert len(overlapped[3].token_ids) == 1


def test_preemption_and_chunked_prefill_match_synchronous_steps(tiny_model, count_preemptions):
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    config = dict(num_kv_blocks=60, block_size=4, max_num_batched_tokens=7, max_num_seqs=8)
    sync, overlapped = run_both(tiny_model, PROMPTS * 2, greedy, **config)
    same(sync, overlapped)
    engine = LLMEngine(tiny_model, EngineConfig(overlap_steps=True, **config))
    for p in PROMPTS * 2:
        engine.add_request(p, greedy)
    assert count_preemptions(engine) > 0


def test_seeded_sampling_matches_synchronous_steps(tiny_model):
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=s) for s in range(5)]
    sync, overlapped = run_both(tiny_model, PROMPTS, params, num_kv_blocks=1024)
    same(sync, overlapped)


def test_rows_needing_the_host_ride_with_overlapped_rows(tiny_model):
    """Logprobs, penalties and prompt logprobs make the engine read the step in flight first; the
    plain rows beside them must come out the same."""
    plain = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    params = [
        plain,
        SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, frequency_penalty=1.5),
        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=2),
        plain,
    ]
    sync, overlapped = run_both(tiny_model, PROMPTS, params, num_kv_blocks=1024)
    same(sync, overlapped)
    assert [[(lp.token_id, round(lp.logprob, 5), lp.top) for lp in o.logprobs] for o in overlapped] == \
        [[(lp.token_id, round(lp.logprob, 5), lp.top) for lp in o.logprobs] for o in sync]
    assert [lp.token_id for lp in overlapped[3].prompt_logprobs] == [lp.token_id for lp in sync[3].prompt_logprobs]


def test_structured_output_matches_synchronous_steps(tiny_model):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    structured = SamplingParams(max_tokens=24, temperature=0,
                                structured=StructuredOutput.of_schema(schema))
    plain = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    sync, overlapped = run_both(tiny_model, PROMPTS[:3], [plain, structured, plain], num_kv_blocks=1024)
    same(sync, overlapped)


def test_steps_really_overlap_and_drain(tiny_model):
    """A step stays in flight between calls, and requests added meanwhile join the next one."""
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=1024, overlap_steps=True))
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    first = engine.add_request(PROMPTS[0], greedy)
    assert engine.step() == []  # the prefill is launched, its token not read yet
    assert engine.has_unfinished() and engine._in_flight is not None
    outs = engine.step()  # reads the prefill's token while the first decode is in flight
    assert [(o.request_id, len(o.new_token_ids), o.num_output_tokens) for o in outs] == [(first, 1, 1)]
    second = engine.add_request(PROMPTS[1], greedy)
    tokens: dict[str, list[int]] = {first: list(outs[0].new_token_ids), second: []}
    while engine.has_unfinished():
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
            assert o.num_output_tokens == len(tokens[o.request_id])
    solo = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=1024)).generate(PROMPTS[:2], greedy)
    assert [tokens[first], tokens[second]] == [o.token_ids for o in solo]
    assert engine._in_flight is None and engine.blocks.num_used_blocks == 0


def test_abort_while_a_step_is_in_flight(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=1024, overlap_steps=True))
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    gone = engine.add_request(PROMPTS[0], greedy)
    kept = engine.add_request(PROMPTS[1], greedy)
    tokens = []
    for _ in range(3):
        tokens += [t for o in engine.step() if o.request_id == kept for t in o.new_token_ids]
    assert engine._in_flight is not None and engine.abort(gone)
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == kept
            tokens += o.new_token_ids
    reference = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=1024)).generate([PROMPTS[1]], greedy)[0]
    assert tokens == reference.token_ids
    assert engine.blocks.num_used_blocks == 0


@pytest.mark.parametrize("n", [3])
def test_choices_sharing_a_prompt_match_synchronous_steps(tiny_model, n):
    """Later choices wait for the first one's prefill (prefix_leader) and read its blocks."""
    greedy = SamplingParams(max_tokens=6, temperature=0.8, seed=7, ignore_eos=True)
    outs = []
    for overlap in (False, True):
        engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=1024, block_size=4, overlap_steps=overlap))
        leader = engine.add_request(PROMPTS[2], greedy)
        ids = [leader] + [engine.add_request(PROMPTS[2], greedy, prefix_leader=leader) for _ in range(n - 1)]
        tokens = {rid: [] for rid in ids}
        cached = {}
        while engine.has_unfinished():
            for o in engine.step():
                tokens[o.request_id] += o.new_token_ids
                cached[o.request_id] = o.num_cached_tokens
        outs.append(([tokens[r] for r in ids], [cached[r] for r in ids]))
    assert outs[0] == outs[1]
    assert outs[1][1][1] > 0  # the follower read the leader's prompt blocks


def test_a_step_that_fails_to_be_read_is_not_read_again(tiny_model):
    """A device error surfaces when a step is read; the server then aborts what was in flight
    (server/async_engine.py) and keeps stepping: the failed step must not come back."""
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=1024, overlap_steps=True))
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    doomed = [engine.add_request(p, greedy) for p in PROMPTS[:2]]
    engine.step()  # launched, not read

    class DeviceError(RuntimeError):
        pass

    class Failing:  # the launched step, as a device that died under it would hand it back
        def __init__(self, pending):
            self.tokens, self.sampling = pending.tokens, pending.sampling

        def result(self):
            raise DeviceError("device lost")

    engine._in_flight.pending = Failing(engine._in_flight.pending)
    with pytest.raises(DeviceError):
        engine.step()
    for rid in doomed:
        engine.abort(rid)
    later = engine.add_request(PROMPTS[2], greedy)
    tokens = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.new_token_ids if o.request_id == later]
    reference = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=1024)).generate([PROMPTS[2]], greedy)[0]
    assert tokens == reference.token_ids and engine.blocks.num_used_blocks == 0


def test_rows_needing_the_host_keep_steps_in_flight(tiny_model):
    """A penalized row needs its last token counted before sampling: its step's forward is launched,
    the step in flight read meanwhile, then the rows sampled; the new step stays in flight."""
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=1024, overlap_steps=True))
    deferred = []
    sample = engine.runner.sample

    def counting_sample(step, some_finished=False):
        deferred.append(some_finished)  # True: sampled after the step before was read
        return sample(step, some_finished)

    engine.runner.sample = counting_sample
    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, presence_penalty=1.0),
              SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)]
    ids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS[:2], params)]
    tokens = {rid: [] for rid in ids}
    in_flight_after = []
    while engine.has_unfinished():
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
        in_flight_after.append(engine._in_flight is not None)
    reference = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=1024)).generate(PROMPTS[:2], params)
    assert [tokens[r] for r in ids] == [o.token_ids for o in reference]
    assert sum(deferred) >= 8  # every decode step read the step before during its forward
    assert all(in_flight_after[:10])


def test_prompt_scoring_in_chunks_is_not_scheduled_again(tiny_model):
    """max_tokens=0 with prompt logprobs (lm-eval's loglikelihood) has nothing to compute once its
    prompt is: no step may schedule it again while the step that scores it is in flight."""
    score = SamplingParams(max_tokens=0, prompt_logprobs=2)
    decode = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = []
    for overlap in (False, True):
        engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512, max_num_batched_tokens=5, overlap_steps=overlap))
        schedule = engine.scheduler.schedule

        def checked(now, schedule=schedule):
            plan = schedule(now)
            assert all(item.num_tokens > 0 for item in plan.scheduled)
            return plan

        engine.scheduler.schedule = checked
        alone = engine.generate([PROMPTS[2]], score)  # the scored prompt alone in its steps
        beside = engine.generate(PROMPTS[:3], [decode, score, decode])
        outs.append(alone + beside)
    sync, overlapped = outs
    same(sync, overlapped)
    for s_out, o_out in ((sync[0], overlapped[0]), (sync[2], overlapped[2])):
        assert o_out.token_ids == [] and o_out.finish_reason == "length"
        assert [(lp.token_id, round(lp.logprob, 5)) for lp in o_out.prompt_logprobs] == \
            [(lp.token_id, round(lp.logprob, 5)) for lp in s_out.prompt_logprobs]
