"""bench/chat_prompts.py: the pool the GPU run answers keeps the greedy prompts' subjects and the
facts suite's content out of its topics, is reproducible from its seed, and holds its last prompts
out of training."""

from __future__ import annotations

import re


def test_topics_that_use_a_held_out_word_are_left_out(bench_script):
    with bench_script("chat_prompts") as chat_prompts:
        held_out = chat_prompts.held_out_words(chat_prompts.FACTS)
        assert {"cinderella", "photosynthesis", "paris", "heart", "honey"} <= held_out
        assert "the" not in held_out  # template words tie nothing to an item
        nouns = ["violin", "Cinderella", "honey bee", "glacier", "heart muscle", "Damascus"]
        pool = chat_prompts.build_pool(nouns, held_out, seed=3)
        named = {t for t in nouns if any(t in p for p in pool)}
        assert named == {"violin", "glacier", "Damascus"}
        assert pool == chat_prompts.build_pool(nouns, held_out, seed=3)  # the seed fixes the pool
        assert pool != chat_prompts.build_pool(nouns, held_out, seed=4)
        assert len(pool) == len(set(pool))


def test_the_committed_pool_was_built_with_the_filter_and_holds_its_end_out(bench_script):
    with bench_script("chat_prompts") as chat_prompts:
        pool = chat_prompts.read_pool(chat_prompts.DEFAULT_POOL)
        train, heldout = chat_prompts.split_pool(pool)
        assert len(heldout) == chat_prompts.HELDOUT_PROMPTS and len(train) > 20_000
        assert not set(train) & set(heldout) and len(pool) == len(set(pool))
        template_words = set()
        for kind in (chat_prompts.NOUN_KINDS + chat_prompts.PYTHON_KINDS + chat_prompts.ARITHMETIC_KINDS
                     + chat_prompts.KINDS + chat_prompts.EXTRA_PROMPTS):
            template_words |= chat_prompts.words_of(re.sub(r"\{\w+\}", " ", kind))
        held_out = chat_prompts.held_out_words(chat_prompts.FACTS)
        leaks = [p for p in pool if (chat_prompts.words_of(p) - template_words) & held_out]
        assert not leaks, leaks[:5]
