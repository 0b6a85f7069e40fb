"""bench/entity_prompts.py: prompts about WordNet's named instances, with every entity that uses a
word of either facts suite (question or any choice) or of the greedy prompts held out."""

from __future__ import annotations

import re

# data.noun lines in wndb(5WN)'s format: offset lexfile ss_type w_cnt [word lex_id]... p_cnt [ptr]... | gloss
DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by
09041785 15 n 02 Istanbul 0 Constantinople 0 002 @i 08524735 n 0000 #p 09039411 n 0000 | the largest city of Turkey
11022001 18 n 03 Haggard 0 Rider_Haggard 0 Sir_Henry_Rider_Haggard 0 001 @i 10794014 n 0000 | British writer
08524735 15 n 01 city 0 001 @ 08226335 n 0000 | a large and densely populated urban area
09064080 15 n 01 Monterey 0 001 @i 08665504 n 0000 | a town in western California
01272367 04 n 01 Bosworth_Field 0 001 @i 00956485 n 0000 | the battle that ended the Wars of the Roses
02084071 05 n 01 Rex 0 001 @i 02083346 n 0000 | a dog in a lexicographer file the pool does not ask about
"""


def test_instances_are_named_and_held_out_words_leave_them_out(bench_script, tmp_path):
    with bench_script("entity_prompts") as entity:
        (tmp_path / "data.noun").write_text(DATA_NOUN)
        entities = entity.instance_entities(tmp_path)
        # Only synsets with an instance hypernym, in files the pool asks about; a person by a multiword form.
        assert entities == [(15, "Istanbul"), (18, "Rider Haggard"), (15, "Monterey"), (4, "Bosworth Field")]
        pool = entity.build_pool(entities, {"monterey"}, seed=1)
        assert not any("Monterey" in p for p in pool)
        assert sum("Istanbul" in p for p in pool) == 2  # places are asked twice, others once
        assert sum("Rider Haggard" in p for p in pool) == sum("Bosworth Field" in p for p in pool) == 1
        assert pool == entity.build_pool(entities, {"monterey"}, seed=1)
        assert pool != entity.build_pool(entities, {"monterey"}, seed=2)  # (the shuffle)


def test_suite_words_cover_questions_and_every_choice(bench_script):
    with bench_script("entity_prompts") as entity:
        words = entity.suite_words(entity.SUITES)
        # a right answer (Paris), a distractor of another item (Rabat), a question word (netherlands)
        assert {"paris", "rabat", "netherlands", "cinderella"} <= words
        assert "the" not in words


def test_the_committed_pool_uses_no_held_out_word_and_holds_its_end_out(bench_script):
    with bench_script("entity_prompts") as entity, bench_script("chat_prompts") as chat:
        pool = chat.read_pool(entity.DEFAULT_POOL)
        train, heldout = chat.split_pool(pool)
        assert len(train) > 8000 and len(pool) == len(set(pool))
        template_words = set()
        for kinds, _ in entity.KINDS_BY_LEXFILE.values():
            for kind in kinds:
                template_words |= entity.words_of(re.sub(r"\{\w+\}", " ", kind))
        held_out = entity.suite_words(entity.SUITES)
        leaks = [p for p in pool if (entity.words_of(p) - template_words) & held_out]
        assert not leaks, leaks[:5]
