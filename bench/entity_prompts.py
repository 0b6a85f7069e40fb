"""A pool of chat prompts about named things (places, people, events, works), for on-policy
distillation aimed at what the exits lose most: recalling one entity from another.

On both facts suites the exits keep morphology and languages but lose items that recall an entity
("the capital of ...", "the currency of ...", "the city of this landmark"): knowledge the skipped
layers hold. The general pool (bench/chat_prompts.py) is common nouns, so the full model's answers
in it rarely state such facts. Here the topics are WordNet's *instances* (synsets with an instance
hypernym: Istanbul, the Danube, Arnold Palmer, the Battle of Bosworth Field), answered by the full
model through bench/own_answers.py --pool ... --exits full.

Held out, so that the suites still measure knowledge the exits were not shown: any entity that
shares a word with either suite's questions or with any of its choices (the distractors are
entities of the same kind, often another item's answer), or with bench/exit_samples.py's subjects.
own_answers.py --exclude-facts also drops answers that state a suite item outright.

    python bench/entity_prompts.py /tmp/wn/usr/share/wordnet --out bench/data/entity_prompts.txt.xz
    python bench/own_answers.py --pool bench/data/entity_prompts.txt.xz --exits full --exclude-facts \\
        bench/tasks/balcony_facts/facts.jsonl bench/tasks/balcony_facts/facts_more.jsonl --out ANSWERS.jsonl ...
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_prompts import write_pool  # noqa: E402
from exit_samples import SUBJECT_WORDS  # noqa: E402
from facts_eval import SUITE_DIR, TASKS  # noqa: E402
from wordnet_text import TEMPLATE_WORDS, words_of  # noqa: E402

DEFAULT_POOL = Path(__file__).resolve().parent / "data" / "entity_prompts.txt.xz"
SUITES = [SUITE_DIR / name for name in TASKS.values()]

PLACE_KINDS = [
    "Tell me about {t}.",
    "Where is {t}, and what is it known for?",
    "Give me three facts about {t}.",
    "Write a paragraph for an encyclopedia about {t}.",
    "What country or region is {t} in? Tell me a little about it.",
]
PERSON_KINDS = [
    "Who was {t}?",
    "What is {t} known for?",
    "Tell me about {t}.",
    "Write a short biography of {t}.",
]
EVENT_KINDS = [
    "What was {t}?",
    "Tell me about {t}.",
    "When did {t} happen, and why does it matter?",
]
THING_KINDS = [
    "What is {t}?",
    "Tell me about {t}.",
    "Give me three facts about {t}.",
]
# WordNet lexicographer files (lexnames(5WN)) -> (prompt kinds, prompts per entity). Places and
# natural objects ask the relations the suites lose (city -> country, landmark -> city).
KINDS_BY_LEXFILE = {
    15: (PLACE_KINDS, 2),   # noun.location: cities, countries, regions
    17: (PLACE_KINDS, 2),   # noun.object: rivers, mountains, continents
    6: (THING_KINDS, 1),    # noun.artifact: bridges, buildings
    18: (PERSON_KINDS, 1),  # noun.person: writers, leaders, scientists
    4: (EVENT_KINDS, 1),    # noun.act: wars, battles
    10: (THING_KINDS, 1),   # noun.communication: books, documents
    14: (THING_KINDS, 1),   # noun.group: bands, organisations
    28: (THING_KINDS, 1),   # noun.time: eras
}


def suite_words(suites: list[Path]) -> set[str]:
    """Content words of every question and every choice of the suites, and the greedy prompts'
    subjects: an entity that uses one is held out."""
    words = set(SUBJECT_WORDS)
    for path in suites:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                item = json.loads(line)
                words |= words_of(item["question"])
                for choice in item["choices"]:
                    words |= words_of(choice)
    return words - TEMPLATE_WORDS


def instance_entities(wordnet: Path) -> list[tuple[int, str]]:
    """(lexicographer file, name) of every noun synset with an instance hypernym (pointer ``@i``),
    in data.noun's order. A person is named by their first multiword form ("Rider Haggard", not
    the bare surname "Haggard"); anything else by its first form.

    data.noun lines (wndb(5WN)): offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt [ptr]... | gloss
    """
    entities = []
    for line in (wordnet / "data.noun").read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # the licence header
        fields = line.split("|", 1)[0].split()
        lexfile, count = int(fields[1]), int(fields[3], 16)
        pointers = fields[5 + 2 * count:]
        if lexfile not in KINDS_BY_LEXFILE or "@i" not in pointers:
            continue
        forms = [re.sub(r"\(\w+\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(count)]
        multiword = [f for f in forms if " " in f]
        name = multiword[0] if lexfile == 18 and multiword else forms[0]
        entities.append((lexfile, name))
    return entities


def build_pool(entities: list[tuple[int, str]], held_out: set[str], seed: int) -> list[str]:
    """The prompts, shuffled with ``seed``; no entity that uses a held-out word."""
    rng = random.Random(seed)
    pool = []
    for lexfile, name in entities:
        if words_of(name) & held_out or len(name) < 3:
            continue
        kinds, per_entity = KINDS_BY_LEXFILE[lexfile]
        pool += [k.format(t=name) for k in rng.sample(kinds, per_entity)]
    pool = list(dict.fromkeys(pool))  # (a name can belong to two synsets: "Georgia")
    rng.shuffle(pool)
    return pool


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("wordnet", type=Path, help="WordNet's dict folder (data.noun)")
    p.add_argument("--out", type=Path, required=True, help="pool file, one prompt a line (.xz: compressed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.wordnet / "data.noun").is_file():
        p.error(f"{args.wordnet} has no data.noun (WordNet's dict folder?)")
    entities = instance_entities(args.wordnet)
    pool = build_pool(entities, suite_words(SUITES), args.seed)
    write_pool(pool, args.out, f"{len(entities)} entities")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
