"""bench/record_evaluation.py: what /v1/models shows per exit is what the measurements said."""

from __future__ import annotations

import pytest


def eval_run(ratio22: float) -> dict:
    """The parts of a `balcony eval` eval.json the block reads."""
    metrics = {"perplexity": 30.0, "perplexity_ratio": ratio22, "kl_per_token": 0.5, "top1_agreement": 0.7}
    return {"exits": {"22": {"balcony": metrics}}, "full": {"perplexity": 20.0},
            "data": {"sources": ["/data/english"]}, "tokens": 8176, "sequences": 16}


def loop_run(decoding: dict | None, share22: float, prompts: int = 256) -> dict:
    run = {"prompts": prompts, "max_tokens": 64, "exits": {"22": {"loops": share22}, "full": {"loops": 0.2}}}
    return run if decoding is None else {**run, "decoding": decoding}


def test_the_block_holds_each_set_the_facts_and_the_loops_per_decoding(bench_script):
    with bench_script("record_evaluation") as record:
        # a first-suite file from before facts_eval recorded its task; the second suite in two files
        facts = [{"results": {"22": {"acc": 0.68}, "full": {"acc": 0.79}}},
                 {"task": "balcony_facts_more", "results": {"22": {"acc": 0.67}}},
                 {"task": "balcony_facts_more", "results": {"full": {"acc": 0.84}}}]
        loops = [loop_run(None, 0.46), loop_run({"temperature": 0.0, "frequency_penalty": 0.5}, 0.07)]
        block = record.evaluation_block({"english": eval_run(1.58)}, facts, "the commands", loops)
    assert block["22"]["english"]["perplexity_ratio"] == 1.58 and block["full"]["english"] == {"perplexity": 20.0}
    assert block["22"]["facts_suite_acc"] == 0.68 and block["full"]["facts_suite_acc"] == 0.79
    assert block["22"]["balcony_facts_more_acc"] == 0.67 and block["full"]["balcony_facts_more_acc"] == 0.84
    # a file from before loop_rate recorded its decoding was greedy
    assert block["22"]["loop_share"] == {"greedy": 0.46, "greedy, frequency_penalty 0.5": 0.07}
    assert block["full"]["loop_share"] == {"greedy": 0.2, "greedy, frequency_penalty 0.5": 0.2}
    assert block["loop_prompts"]["prompts"] == 256 and block["loop_prompts"]["max_tokens"] == 64
    assert block["command"] == "the commands"


def test_loop_counts_over_different_prompts_are_refused(bench_script):
    with bench_script("record_evaluation") as record:
        with pytest.raises(ValueError, match="different prompts"):
            record.loop_shares([loop_run(None, 0.46), loop_run({"temperature": 0.7}, 0.1, prompts=64)])


def test_one_suite_measured_twice_at_an_exit_is_refused(bench_script):
    with bench_script("record_evaluation") as record:
        twice = [{"task": "balcony_facts", "results": {"22": {"acc": 0.68}}},
                 {"task": "balcony_facts", "results": {"22": {"acc": 0.70}}}]
        with pytest.raises(ValueError, match="two facts files"):
            record.evaluation_block({"english": eval_run(1.58)}, twice, "")
