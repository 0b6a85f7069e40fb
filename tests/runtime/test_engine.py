"""The offline engine: generation equal to transformers, continuous batching, stops, logprobs."""

from __future__ import annotations

import pytest
import torch

from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.errors import RequestError
from balcony_runtime.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Here is a list of three colours:",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def hf_greedy(hf, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_greedy_full_depth_equals_transformers_generate(default_model, default_hf):
    engine = LLMEngine(default_model, EngineConfig(num_kv_blocks=2048))
    outs = engine.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(default_hf, default_model.tokenizer, prompt, 24), prompt
        assert out.finish_reason == "length" and out.exit_layer == 30


def test_preemption_and_chunked_prefill_do_not_change_outputs(tiny_model):
    """A pool too small for every request at once, and a token budget that splits prompts."""
    reference = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=4096)).generate(PROMPTS * 2, GREEDY)
    tight = LLMEngine(
        tiny_model, EngineConfig(num_kv_blocks=60, block_size=4, max_num_batched_tokens=7, max_num_seqs=8)
    )
    outs = tight.generate(PROMPTS * 2, GREEDY)
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference]
    assert tight.blocks.num_used_blocks == 0
    assert tight.scheduler.running == [] and len(tight.scheduler.waiting) == 0


def test_preemption_happened_in_tight_pool(tiny_model, count_preemptions):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=60, block_size=4, max_num_seqs=8))
    for p in PROMPTS * 2:
        engine.add_request(p, GREEDY)
    assert count_preemptions(engine) > 0


def test_requests_join_and_leave_at_step_boundaries(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=1024, max_num_batched_tokens=64))
    short = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=2, temperature=0))
    long = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=10, temperature=0))
    finished_at = {}
    joined = None
    for step in range(40):
        if step == 3:
            joined = engine.add_request(PROMPTS[2], SamplingParams(max_tokens=3, temperature=0))
        for out in engine.step():
            if out.finished:
                finished_at[out.request_id] = step
        if not engine.has_unfinished():
            break
    assert finished_at[short] < finished_at[joined] < finished_at[long]


def test_long_prompt_is_chunked_while_decodes_keep_moving(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=2048, max_num_batched_tokens=16))
    decoding = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=30, temperature=0))
    for _ in range(3):
        engine.step()
    engine.add_request("word " * 120, SamplingParams(max_tokens=1, temperature=0))
    tokens_per_step = []
    for _ in range(6):
        outs = {o.request_id: o for o in engine.step()}
        tokens_per_step.append(len(outs[decoding].new_token_ids))
    assert tokens_per_step == [1] * 6  # the 120-token prompt never stalls the running decode


def test_generate_takes_params_and_exits_per_prompt(tiny_model):
    exits = [1, "full", 3]
    params = [SamplingParams(max_tokens=n, temperature=0.8, seed=n, ignore_eos=True) for n in (5, 9, 7)]
    solo = [LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512)).generate([p], sp, exit_layer=e)[0]
            for p, sp, e in zip(PROMPTS, params, exits)]
    together = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512)).generate(PROMPTS[:3], params, exit_layer=exits)
    assert [o.token_ids for o in together] == [o.token_ids for o in solo]
    assert [len(o.token_ids) for o in together] == [5, 9, 7]
    with pytest.raises(ValueError):
        LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512)).generate(PROMPTS[:3], params[:2])


def test_mixed_exits_in_one_engine_match_solo_runs(tiny_model):
    solo = {
        e: LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512)).generate(PROMPTS[:1], GREEDY, exit_layer=e)[0]
        for e in (1, 2, 3, "full")
    }
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512))
    ids = {e: engine.add_request(PROMPTS[0], GREEDY, exit_layer=e) for e in (1, "full", 3, 2)}
    tokens = {rid: [] for rid in ids.values()}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    for e, rid in ids.items():
        assert tokens[rid] == solo[e].token_ids, e
    assert len({tuple(v) for v in tokens.values()}) > 1  # exits really differ


def test_stop_string_is_cut_and_not_returned(default_model):
    engine = LLMEngine(default_model, EngineConfig(num_kv_blocks=512))
    free = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=24, temperature=0))[0]
    stop = free.text[8:12]
    assert stop.strip(), free.text
    out = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=24, temperature=0, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(stop)]


def test_stop_token_id_and_max_tokens(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512))
    free = engine.generate([PROMPTS[0]], GREEDY)[0]
    target = free.token_ids[5]
    first = free.token_ids.index(target)
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=(target,)))[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0))[0]
    assert len(out.token_ids) <= 3


def test_prompt_logprobs_at_each_exit_match_direct_computation(tiny_model, tiny_hf):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512, max_num_batched_tokens=5))
    params = SamplingParams(max_tokens=0, prompt_logprobs=2)
    ids = tiny_model.tokenizer.encode(PROMPTS[2])
    out = engine.generate([PROMPTS[2]], params)[0]  # chunked: 5 tokens a step
    assert out.token_ids == [] and len(out.prompt_logprobs) == len(ids) - 1
    ref = torch.log_softmax(tiny_hf(torch.tensor([ids])).logits[0].float(), -1)  # [S, V]
    for i, lp in enumerate(out.prompt_logprobs):
        assert lp.token_id == ids[i + 1]
        assert lp.logprob == pytest.approx(ref[i, ids[i + 1]].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == ref[i].topk(2).indices.tolist()
    # A balcony exit scores the prompt differently.
    shallow = engine.generate([PROMPTS[2]], params, exit_layer=1)[0]
    assert shallow.prompt_logprobs[3].logprob != pytest.approx(out.prompt_logprobs[3].logprob, abs=1e-4)


def test_seeded_sampling_is_reproducible_across_batches(tiny_model):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    alone = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512)).generate([PROMPTS[0]], params)[0]
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512))
    crowd = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], params)
    assert crowd[1].token_ids == alone.token_ids


def test_abort_frees_blocks_at_once(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=512))
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=50))
    queued = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.blocks.num_used_blocks > 0
    assert engine.abort(rid) and engine.abort(queued)
    assert engine.blocks.num_used_blocks == 0 and not engine.has_unfinished()
    assert not engine.abort(rid)


def test_bad_requests_are_refused_clearly(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=64, block_size=4))
    with pytest.raises(RequestError, match="unknown exit"):
        engine.add_request("hi", exit_layer=7)
    with pytest.raises(RequestError, match="maximum length"):
        engine.add_request("hi", SamplingParams(max_tokens=10_000))
    with pytest.raises(RequestError, match="does not fit in the KV cache"):
        engine.add_request("hi", SamplingParams(max_tokens=200))
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request([1, -5])
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([])
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


def test_load_snapshot_counts_prompt_tokens_not_yet_prefilled(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=2048, max_num_batched_tokens=16))
    decoding = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=30, temperature=0))
    engine.step()  # its short prompt is prefilled and its first token sampled
    assert engine.scheduler.running[0].output_token_ids
    prompt0 = len(engine.tokenize(PROMPTS[0]))
    (row,) = engine.load_snapshot().running
    assert row.pending_prefill_tokens == 0 and row.context_tokens == prompt0 + 1 and row.remaining_steps == 29
    long_prompt = tiny_model.tokenizer("word " * 60).input_ids
    n = len(long_prompt)
    engine.add_request(long_prompt, SamplingParams(max_tokens=1, temperature=0), exit_layer=2)
    (queued,) = engine.load_snapshot().waiting
    assert queued.pending_prefill_tokens == n and queued.exit_layer == 2 and queued.deadline is None
    engine.step()  # 15 of its tokens join the decode row in a 16-token step
    snap = engine.load_snapshot()
    assert [r.pending_prefill_tokens for r in snap.running] == [0, n - 15]
    shape = engine.last_step.shape  # the decode row at full depth, 15 prefill tokens at exit 2 (3 layers)
    full = engine.model.full_depth
    assert shape.decode_token_layers == full and shape.prefill_token_layers == 15 * 3
    assert shape.layers == full + 1 and shape.head_rows == 1  # the chunk does not end its prompt: no head
    assert shape.attention_layers == full * (prompt0 + 1) + 3 * 15 * 16 // 2
    assert decoding in {r.request_id for r in engine.scheduler.running}


def test_each_steps_shape_is_that_of_its_rows(tiny_model):
    """The runner works out a step's shape from the arrays it prepares: at every step of a mixed
    run (prefill chunks, decodes at three exits, a prompt scored for logprobs), it must equal the
    shape of the scheduled rows counted one by one."""
    from balcony_runtime.routing.step_cost import RowShape, StepShape

    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=2048, max_num_batched_tokens=24))
    plans = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda now: plans.append(schedule(now)) or plans[-1]
    params = [SamplingParams(max_tokens=6, temperature=0), SamplingParams(max_tokens=4, temperature=0),
              SamplingParams(max_tokens=5, temperature=0, prompt_logprobs=1)]
    for prompt, sp, e in zip(PROMPTS[:3], params, [1, "full", 3]):
        engine.add_request(prompt, sp, exit_layer=e)
    steps = repeated_decodes = 0  # the runner keeps a decode batch's exits while its rows stay
    while engine.has_unfinished():
        engine.step()
        rows = plans[-1].scheduled
        if not rows:
            continue
        if len(plans) > 1 and all(r.num_tokens == 1 for r in rows) and \
                [r.request for r in rows] == [r.request for r in plans[-2].scheduled]:
            repeated_decodes += 1
        expected = StepShape.of([RowShape(r.request.exit_layer, r.num_tokens, r.start, r.completes_sequence)
                                 for r in rows], engine.model.full_depth)
        assert engine.last_step.shape == expected
        assert engine.last_step.num_prefill_tokens == sum(r.num_tokens for r in rows if r.num_tokens > 1)
        steps += 1
    assert steps >= 6 and repeated_decodes >= 2


def test_a_completed_requests_text_is_its_pieces_in_order_however_often_it_is_read():
    from balcony_runtime.request_output import CompletedRequest, RequestOutput

    done, expected = CompletedRequest("r"), ""
    pieces = ["Hel", "", "lo", " wörld", "", "\n", "🙂", "!"]
    for k, piece in enumerate(pieces):
        done.absorb(RequestOutput("r", 4, [k], piece, (), None, 3, k + 1, False, None, 0.0, None, None))
        expected += piece
        assert done.text_length == len(expected)
        if k % 3 == 0:  # read between appends too: joined so far, then appended to
            assert done.text == expected
    assert done.text == expected == "Hello wörld\n🙂!" and done.text == expected
    assert done.token_ids == list(range(len(pieces)))
