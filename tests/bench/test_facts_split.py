"""bench/facts_split.py: half the suites' items become training prompts (questions only), and each
half is scored before and after, item by item."""

from __future__ import annotations


def test_half_a_prompts_carry_questions_of_the_trained_half_only(bench_script):
    with bench_script("facts_split") as split:
        items = split.suite_items()
        assert len(items) == 135 + 167 and items[0][0] == "balcony_facts" and items[-1][0] == "balcony_facts_more"
        trained = split.half_a(len(items), seed=0)
        assert len(trained) == len(items) // 2 and trained == split.half_a(len(items), seed=0)
        assert trained != split.half_a(len(items), seed=1)
        prompts = split.prompts_for(items, trained)
        assert len(prompts) == len(trained) * len(split.PROMPT_FORMS)
        for k, (_, _, item) in enumerate(items):
            asked = sum(item["question"] in p for p in prompts)
            assert asked >= (len(split.PROMPT_FORMS) if k in trained else 0)
        # a prompt is a fixed form around a trained question and nothing else: no choice, no answer
        forms = [f.split("{q}") for f in split.PROMPT_FORMS]
        questions = {items[k][2]["question"] for k in trained}
        for prompt in prompts:
            assert any(prompt.startswith(head) and prompt.endswith(tail)
                       and prompt[len(head):len(prompt) - len(tail)] in questions for head, tail in forms)

def test_split_scores_count_each_halfs_flips(bench_script):
    with bench_script("facts_split") as split:
        before = [{"results": {"22": {"item_acc": [0, 0, 1, 1]}}}, {"results": {"22": {"item_acc": [0, 1]}}}]
        after = [{"results": {"22": {"item_acc": [1, 1, 1, 0]}}}, {"results": {"22": {"item_acc": [0, 1]}}}]
        report = split.split_scores(before, after, trained={0, 1, 4})
        a, b = report["22 A (trained)"], report["22 B (held out)"]
        assert (a["items"], a["before"], a["after"], a["gained"], a["lost"]) == (3, 0.0, 0.667, 2, 0)
        assert (b["items"], b["before"], b["after"], b["gained"], b["lost"]) == (3, 1.0, 0.667, 0, 1)
        assert a["p"] == split.mcnemar_exact_p(2, 0)
