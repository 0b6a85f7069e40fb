"""A pool of varied chat prompts for on-policy distillation: the full model answers them on the GPU
and the balconies are trained on those answers (issue 12, item 3, at GPU scale).

The exits serve chat answers; the training text so far is mostly documentation and definitions,
with 320 answers of the full model read about five times over by the GPU run. At the H200's pace
the full model answers tens of thousands of prompts in a minute (``bench/gpu_train.py
--answers-minutes``), so the prompts, not the compute, limit how varied that text is. The pool:

- every WordNet noun SemCor tagged at least once (the common ones: "improvement", "hound",
  "scholarship"), each with two of NOUN_KINDS, drawn with the seed;
- bench/train_data.py's 12 kinds x 49 topics and its 12 fixed prompts;
- Python's standard-library modules (``sys.stdlib_module_names``) with PYTHON_KINDS;
- arithmetic with random operands.

Held out, so that what they measure stays unseen: any topic that shares a word with the subjects of
bench/exit_samples.py's ten greedy prompts (``SUBJECT_WORDS``), or with the facts suite's questions
or right answers (every content word: "water", "heart", "blue" go too).

    cd /tmp && apt-get download wordnet-base && dpkg -x wordnet-base_*.deb /tmp/wn && cd -
    python bench/chat_prompts.py /tmp/wn/usr/share/wordnet --out bench/data/chat_prompts.txt.xz
"""

from __future__ import annotations

import argparse
import lzma
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exit_samples import SUBJECT_WORDS  # noqa: E402
from train_data import EXTRA_PROMPTS, KINDS, TOPICS  # noqa: E402
from wordnet_text import TEMPLATE_WORDS, facts_keys, parse_data_line, words_of  # noqa: E402

NOUN_KINDS = [
    "What is {t}?",
    "Tell me about {t}.",
    "Explain {t} in a few sentences.",
    "Give me three interesting facts about {t}.",
    "Write a short poem about {t}.",
    "Write a short story that involves {t}.",
    "Describe {t} to a ten-year-old.",
    "What are the most common questions people ask about {t}? Answer two of them.",
    "Write a paragraph for an encyclopedia about {t}.",
    "How would you explain the word \"{t}\" to someone learning English? Give examples.",
    "Give me some practical advice related to {t}.",
    "What is the history of {t}?",
    "Write a short dialogue between two friends about {t}.",
    "List the pros and cons of {t}.",
    "Summarize what a beginner should know about {t}.",
    "Why is {t} important?",
]
PYTHON_KINDS = [
    "What is Python's {t} module for? Show a short example.",
    "How do I use the {t} module in Python?",
    "Explain the main functions of Python's {t} module.",
]
ARITHMETIC_KINDS = [
    "What is {a} times {b}? Show your working.",
    "What is {a} plus {b}? Explain step by step.",
    "If I have {a} apples and give away {b}, how many are left?",
    "Divide {a} by {b} and explain the result.",
]

FACTS = Path(__file__).resolve().parent / "tasks" / "balcony_facts" / "facts.jsonl"
DEFAULT_POOL = Path(__file__).resolve().parent / "data" / "chat_prompts.txt.xz"
HELDOUT_PROMPTS = 256  # the pool's last prompts: never answered for training (bench/loop_rate.py reads them)


def held_out_words(facts: Path) -> set[str]:
    """Every content word of the facts suite's questions and right answers, and the greedy
    prompts' subjects: a topic that uses one is left out of the pool."""
    words = set(SUBJECT_WORDS)
    for answer, question in facts_keys(facts):  # (question words less the template's)
        words |= question | words_of(answer)
    return words - TEMPLATE_WORDS


def common_nouns(wordnet: Path, min_tagged: int = 1) -> list[str]:
    """Nouns of WordNet's index whose senses SemCor tagged ``min_tagged`` times or more, letters
    only (no "1-hitter"), in index order, cased as WordNet's synsets write them ("Damascus").

    index.noun lines (wndb(5WN)): lemma pos synset_cnt p_cnt [ptr_symbol]... sense_cnt tagsense_cnt ...
    """
    # The index is lowercase; the synsets keep proper nouns' capitals (the first form seen wins).
    cased: dict[str, str] = {}
    for line in (wordnet / "data.noun").read_text(encoding="utf-8", errors="replace").splitlines():
        parsed = parse_data_line(line)
        for word in parsed[1] if parsed else ():
            cased.setdefault(word.lower(), word)
    nouns = []
    for line in (wordnet / "index.noun").read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  "):
            continue  # the licence header
        fields = line.split()
        tagged = int(fields[5 + int(fields[3])])
        lemma = fields[0].replace("_", " ")
        if tagged >= min_tagged and re.fullmatch(r"[a-z][a-z ]{2,}", lemma):  # (index lemmas are lowercase)
            nouns.append(cased.get(lemma, lemma))
    return nouns


def build_pool(nouns: list[str], held_out: set[str], seed: int, kinds_per_noun: int = 2) -> list[str]:
    """The prompts, shuffled with ``seed``; no topic that uses a held-out word."""
    rng = random.Random(seed)
    keep = [t for t in nouns if not words_of(t) & held_out]
    pool = []
    for topic in keep:
        kinds = rng.sample(NOUN_KINDS, kinds_per_noun)
        pool += [k.format(t=topic) for k in kinds]
    pool += [k.format(t=t) for k in KINDS for t in TOPICS if not words_of(t) & held_out]
    pool += [p for p in EXTRA_PROMPTS if not words_of(p) & held_out]
    modules = sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in {"this", "antigravity"})
    pool += [k.format(t=m) for m in modules for k in PYTHON_KINDS if not words_of(m) & held_out]
    for _ in range(len(ARITHMETIC_KINDS) * 100):
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        pool.append(rng.choice(ARITHMETIC_KINDS).format(a=a, b=b))
    pool = list(dict.fromkeys(pool))  # (the arithmetic draws can repeat)
    rng.shuffle(pool)
    return pool


def read_pool(path: Path) -> list[str]:
    """The prompts of a pool file (one per line, xz-compressed when its name ends in .xz)."""
    raw = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
    return [line for line in raw.decode("utf-8").splitlines() if line.strip()]


def write_pool(pool: list[str], path: Path, source: str) -> None:
    """One prompt a line, xz-compressed when the name ends in .xz (what read_pool reads); says what
    was written and from how many topics (``source``: "N tagged nouns")."""
    data = ("\n".join(pool) + "\n").encode("utf-8")
    path.write_bytes(lzma.compress(data) if path.suffix == ".xz" else data)
    print(f"{len(pool)} prompts ({source} before the held-out words) in {path}, {path.stat().st_size:,} bytes")


def split_pool(pool: list[str], heldout: int = HELDOUT_PROMPTS) -> tuple[list[str], list[str]]:
    """(prompts a training run may answer, the held-out prompts at the pool's end)."""
    if len(pool) <= heldout:
        raise ValueError(f"a pool of {len(pool)} prompts leaves nothing beside {heldout} held out")
    return pool[:-heldout], pool[-heldout:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("wordnet", type=Path, help="WordNet's dict folder (index.noun)")
    p.add_argument("--out", type=Path, required=True, help="pool file, one prompt a line (.xz: compressed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-tagged", type=int, default=1, help="SemCor tags a noun needs (default %(default)s)")
    args = p.parse_args(argv)
    if not (args.wordnet / "index.noun").is_file():
        p.error(f"{args.wordnet} has no index.noun (WordNet's dict folder?)")
    nouns = common_nouns(args.wordnet, args.min_tagged)
    pool = build_pool(nouns, held_out_words(FACTS), args.seed)
    write_pool(pool, args.out, f"{len(nouns)} tagged nouns")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
