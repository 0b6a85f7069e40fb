"""bench/tasks/balcony_facts: the two suites are what make_facts.py writes, well formed, and the
lm-eval task files point at them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[2] / "bench/tasks/balcony_facts"


@pytest.fixture(scope="module")
def make_facts():
    spec = importlib.util.spec_from_file_location("make_facts", SUITE / "make_facts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (SUITE / name).read_text().splitlines()]


@pytest.mark.parametrize("builder, name, task", [
    ("first_suite", "facts.jsonl", "balcony_facts"),
    ("second_suite", "facts_more.jsonl", "balcony_facts_more"),
])
def test_each_suite_file_is_what_make_facts_writes(make_facts, builder, name, task):
    items = getattr(make_facts, builder)()
    assert read(name) == items  # the checked-in file is reproducible from the script
    assert len(items) >= 100
    for item in items:
        choices = item["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4, item
        assert 0 <= item["answer"] < 4
    assert len({item["question"] for item in items}) == len(items)  # no question asked twice
    yaml = (SUITE / f"{task}.yaml").read_text()
    assert f"task: {task}\n" in yaml and f"bench/tasks/balcony_facts/{name}\n" in yaml


def test_the_suites_ask_different_questions_and_spread_the_answer_positions(make_facts):
    first, second = make_facts.first_suite(), make_facts.second_suite()
    assert not {i["question"] for i in first} & {i["question"] for i in second}
    # a model that always picks one position scores near chance: no position holds half the answers
    for items in (first, second):
        positions = [i["answer"] for i in items]
        assert max(positions.count(p) for p in range(4)) < len(items) / 2


def test_hand_checked_items(make_facts):
    by_question = {i["question"]: i["choices"][i["answer"]] for i in make_facts.second_suite()}
    assert by_question["The capital of Switzerland is"] == "Bern"
    assert by_question["The past tense of catch is"] == "caught"
    assert by_question["Brazil is a country in"] == "South America"
    assert by_question["The number of legs a spider has is"] == "eight"
