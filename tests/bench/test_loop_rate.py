"""bench/loop_rate.py: the agreement it reports is measured on the prefix each token followed (the
full model's own greedy answer agrees with itself everywhere), and its loop share counts answers."""

from __future__ import annotations


def test_the_full_models_greedy_answer_is_its_own_argmax_at_every_token(bench_script, default_model):
    from balcony_runtime.engine import EngineConfig, LLMEngine
    from balcony_runtime.sampling_params import SamplingParams

    with bench_script("loop_rate") as loop_rate:
        prompts = ["Tell me about violins.", "What is a glacier?", "Write a haiku about rain."]
        ids = [loop_rate.chat_ids(default_model.tokenizer, p) for p in prompts]
        engine = LLMEngine(default_model, EngineConfig(max_num_seqs=4))
        greedy = SamplingParams(max_tokens=12, temperature=0.0)
        answers = loop_rate.answers_at(engine, ids, ["full", "8"], greedy)
        agreement = loop_rate.full_model_agreement(default_model.model, ids, answers["full"])
        agree, total = agreement["all"]
        assert total == sum(map(len, answers["full"])) >= 30 and agree == total
        assert agreement["repeats"][1] + agreement["fresh"][1] == total
        # (logits read one position off would score the token after next: far from all of them)
        # A shallow exit's answer (a fresh balcony after 8 layers) is mostly not what the full model writes.
        agree8, total8 = loop_rate.full_model_agreement(default_model.model, ids, answers["8"])["all"]
        assert agree8 < 0.5 * total8


def test_a_token_repeats_when_the_run_it_ends_was_written_before(bench_script):
    with bench_script("loop_rate") as loop_rate:
        #        a  b  c  d  a  b  c  d  e
        marks = loop_rate.repeats([1, 2, 3, 4, 1, 2, 3, 4, 5])
        assert marks == [False] * 7 + [True, False]  # only the second "a b c d" ends a repeated run
        assert loop_rate.repeats([7, 7, 7, 7, 7]) == [False, False, False, False, True]


def test_measure_reports_every_exit(bench_script, default_model):
    with bench_script("loop_rate") as loop_rate:
        result = loop_rate.measure(default_model, ["Name three rivers.", "Describe a violin."], max_tokens=8)
        assert set(result["exits"]) == {"8", "15", "22", "full"}
        assert all(0 <= row["loops"] <= 1 and 0 < row["mean_tokens"] <= 8 for row in result["exits"].values())
        assert all(row["loops"] == len(row["looped_prompts"]) / 2 for row in result["exits"].values())
        # some answer ended before the limit exactly when the mean is under it
        assert all(0 <= row["stopped"] <= 1 and (row["stopped"] > 0) == (row["mean_tokens"] < 8)
                   for row in result["exits"].values())
        assert "agreement" not in result["exits"]["full"] and 0 <= result["exits"]["22"]["agreement"] <= 1
        assert "loops 8" in loop_rate.markdown_line(result)


def test_measure_decodes_as_asked_at_the_exits_asked(bench_script, default_model):
    with bench_script("loop_rate") as loop_rate:
        prompts = ["Name three rivers.", "Describe a violin."]
        greedy = loop_rate.measure(default_model, prompts, max_tokens=8, exits=["22"])
        sampled = loop_rate.measure(default_model, prompts, max_tokens=8, exits=["22"],
                                    decoding={"temperature": 5.0, "seed": 3})
        assert set(greedy["exits"]) == set(sampled["exits"]) == {"22"}
        # near-uniform sampling over the vocabulary rarely hits the full model's greedy token
        assert sampled["exits"]["22"]["agreement"] < greedy["exits"]["22"]["agreement"]
        assert greedy["decoding"] == {"temperature": 0.0}
        assert sampled["decoding"] == {"temperature": 5.0, "seed": 3}
        assert "temperature 5.0, seed 3" in loop_rate.markdown_line(sampled)
        assert loop_rate.decoding_words({"temperature": 0.0, "frequency_penalty": 0.5}) == "greedy, frequency_penalty 0.5"
