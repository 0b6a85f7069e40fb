"""bench/own_answers.py: the exits' greedy answers to training prompts, written as training JSONL
that `balcony train --unlikely-repeats` reads."""

from __future__ import annotations

import json


def test_answers_are_each_exits_greedy_text_on_training_prompts_only(bench_script, default_model, tmp_path):
    from balcony_runtime.engine import EngineConfig, LLMEngine
    from balcony_runtime.training.data import DataConfig, iter_documents

    with bench_script("own_answers") as own, bench_script("chat_prompts") as pool:
        prompts = own.training_prompts(pool.DEFAULT_POOL, 4, seed=3)
        assert prompts == own.training_prompts(pool.DEFAULT_POOL, 4, seed=3)
        assert prompts != own.training_prompts(pool.DEFAULT_POOL, 4, seed=4)
        _, heldout = pool.split_pool(pool.read_pool(pool.DEFAULT_POOL))
        assert not set(own.training_prompts(pool.DEFAULT_POOL, 2000, seed=3)) & set(heldout)

        out = tmp_path / "own.jsonl"
        report = own.write_answers(default_model, prompts, ["8", "full"], 10, out)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert report["answers"] == len(rows) == 4
        # prompt i is answered at exits[i % 2]
        assert {(r["prompt"], r["exit"]) for r in rows} == {(p, ["8", "full"][i % 2]) for i, p in enumerate(prompts)}
        engine = LLMEngine(default_model, EngineConfig(max_num_seqs=4))
        for row in rows:
            ids = own.chat_ids(default_model.tokenizer, row["prompt"])
            answer = own.greedy_answers(engine, [ids], [row["exit"]], 10)[row["exit"]][0]
            assert row["text"] == default_model.tokenizer.decode(answer, skip_special_tokens=True).strip()
            assert row["loops"] == own.loops(answer)

        docs = list(iter_documents(DataConfig((str(out),), chat_template=True, unlikely_repeats=True)))
        assert sorted(d.writer for d in docs) == ["8", "8", "full", "full"]


def test_answers_that_state_a_suite_item_are_dropped(bench_script, default_model, tmp_path):
    with bench_script("own_answers") as own, bench_script("chat_prompts") as pool:
        words_of = pool.words_of
        prompts = own.training_prompts(pool.DEFAULT_POOL, 6, seed=5)
        every = tmp_path / "every.jsonl"
        own.write_answers(default_model, prompts, ["full"], 12, every)
        rows = [json.loads(line) for line in every.read_text().splitlines()]
        # An item asking the first prompt's longest word, answered by its answer's longest word:
        # a row states it when its prompt and answer hold both words.
        question_word = max(words_of(rows[0]["prompt"]), key=len)
        answer_word = max(words_of(rows[0]["text"]), key=len)
        states = [{question_word, answer_word} <= words_of(f"{r['prompt']} {r['text']}") for r in rows]
        out = tmp_path / "kept.jsonl"
        report = own.write_answers(default_model, prompts, ["full"], 12, out, [(answer_word, {question_word})])
        kept = [json.loads(line) for line in out.read_text().splitlines()]
        assert states[0] and report["dropped_as_facts"] == sum(states)
        assert kept == [r for r, s in zip(rows, states) if not s] and report["answers"] == len(kept)
