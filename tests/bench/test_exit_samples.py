"""bench/exit_samples.py's loop count: an answer loops when some run of tokens comes back again and
again, not when a phrase is said twice."""

from __future__ import annotations


def test_a_run_of_tokens_three_times_is_a_loop(bench_script):
    with bench_script("exit_samples") as exit_samples:
        sea = [5, 6, 7, 8, 9] * 3  # "the sea is a sea of sea." three times
        assert exit_samples.loops(sea)
        assert exit_samples.loops([1, 2] + [3, 3, 3, 3, 3, 3])  # one token over and over
        twice = [1, 2, 3, 4, 9, 1, 2, 3, 4, 10, 11]  # a phrase said twice
        assert not exit_samples.loops(twice)
        assert not exit_samples.loops(list(range(40)))
        assert not exit_samples.loops([1, 2, 3])  # shorter than a run


def test_a_loop_starts_where_its_run_comes_the_third_time(bench_script):
    with bench_script("exit_samples") as exit_samples:
        fresh = [20, 21, 22]
        sea = fresh + [5, 6, 7, 8, 9] * 3  # the run 5 6 7 8 starts at 3, 8 and 13
        assert exit_samples.loop_start(sea) == 13
        assert exit_samples.loop_start([3] * 6) == 2  # runs 3 3 3 3 at 0, 1 and 2
        assert exit_samples.loop_start([1, 2, 3, 4, 9, 1, 2, 3, 4]) is None  # said twice


def test_decoding_options_become_request_fields_words_and_the_flags_again(bench_script):
    import argparse

    with bench_script("exit_samples") as exit_samples:
        parser = argparse.ArgumentParser()
        exit_samples.add_decoding_options(parser)
        greedy = exit_samples.decoding_settings(parser.parse_args([]))
        assert greedy == {"temperature": 0.0}
        assert (exit_samples.decoding_words(greedy), exit_samples.decoding_flags(greedy)) == ("greedy", "")
        argv = ["--temperature", "0.7", "--top-p", "0.9", "--seed", "0"]
        sampled = exit_samples.decoding_settings(parser.parse_args(argv))
        assert sampled == {"temperature": 0.7, "top_p": 0.9, "seed": 0}
        assert exit_samples.decoding_words(sampled) == "temperature 0.7, top_p 0.9, seed 0"
        assert exit_samples.decoding_flags(sampled).split() == argv
        penalised = exit_samples.decoding_settings(parser.parse_args(["--frequency-penalty", "0.5"]))
        assert exit_samples.decoding_words(penalised) == "greedy, frequency_penalty 0.5"
