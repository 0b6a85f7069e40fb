"""Writes facts.jsonl: a 4-way multiple-choice suite of plain facts for lm-evaluation-harness.

Each item is a sentence opening whose true continuation is one word or short phrase; the three
distractors are other answers of the same kind (drawn with a fixed seed), so a model that only knows
the kind of answer scores 0.25. Facts, not trivia: the full default model should know most of them,
which is what makes the suite say how much of that an exit keeps.

    python bench/tasks/balcony_facts/make_facts.py   # rewrites facts.jsonl beside this file
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Russia": "Moscow", "Egypt": "Cairo", "China": "Beijing", "England": "London", "Greece": "Athens",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Norway": "Oslo", "Sweden": "Stockholm",
    "Poland": "Warsaw", "Canada": "Ottawa", "Australia": "Canberra", "Kenya": "Nairobi", "Peru": "Lima",
    "Argentina": "Buenos Aires", "Thailand": "Bangkok", "South Korea": "Seoul", "Turkey": "Ankara",
    "Denmark": "Copenhagen", "Finland": "Helsinki", "Belgium": "Brussels", "Hungary": "Budapest",
    "Cuba": "Havana", "India": "New Delhi",
}
OPPOSITES = {
    "hot": "cold", "up": "down", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
    "open": "closed", "early": "late", "full": "empty", "strong": "weak", "rich": "poor", "wet": "dry",
    "old": "young", "hard": "soft", "loud": "quiet", "thick": "thin", "inside": "outside", "win": "lose",
    "buy": "sell", "remember": "forget",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve"]
# (opening, answer, kind): distractors are drawn from the other answers of the same kind.
GENERAL = [
    ("On a clear day the sky is", "blue", "color"), ("Fresh grass is", "green", "color"),
    ("Snow is", "white", "color"), ("A ripe banana is", "yellow", "color"),
    ("Coal is", "black", "color"), ("A ripe tomato is", "red", "color"),
    ("A carrot is", "orange", "color"),
    ("The largest planet in our solar system is", "Jupiter", "planet"),
    ("The planet closest to the Sun is", "Mercury", "planet"),
    ("The planet we live on is", "Earth", "planet"), ("The Red Planet is", "Mars", "planet"),
    ("The ringed planet best known for its rings is", "Saturn", "planet"),
    ("A baby dog is called a", "puppy", "young"), ("A baby cat is called a", "kitten", "young"),
    ("A baby cow is called a", "calf", "young"), ("A baby sheep is called a", "lamb", "young"),
    ("A baby horse is called a", "foal", "young"), ("A young frog is called a", "tadpole", "young"),
    ("Bees make", "honey", "product"), ("Cows give us", "milk", "product"),
    ("Hens lay", "eggs", "product"), ("Sheep give us", "wool", "product"),
    ("Silkworms make", "silk", "product"),
    ("Water is made of hydrogen and", "oxygen", "element"),
    ("The gas that plants take in from the air is carbon", "dioxide", "gasword"),
    ("Plants make food from sunlight by", "photosynthesis", "process"),
    ("Water turning into vapour is called", "evaporation", "process"),
    ("Water vapour turning back into liquid is called", "condensation", "process"),
    ("Liquid water turning into ice is called", "freezing", "process"),
    ("The organ that pumps blood through the body is the", "heart", "organ"),
    ("We breathe with our", "lungs", "organ"), ("We think with our", "brain", "organ"),
    ("We see with our", "eyes", "organ"), ("We hear with our", "ears", "organ"),
    ("The author of Romeo and Juliet is William", "Shakespeare", "author"),
    ("The theory of relativity was developed by Albert", "Einstein", "author"),
    ("The laws of motion and gravity were described by Isaac", "Newton", "author"),
    ("Evolution by natural selection was proposed by Charles", "Darwin", "author"),
    ("The Mona Lisa was painted by Leonardo da", "Vinci", "painter"),
    ("The largest ocean on Earth is the", "Pacific", "ocean"),
    ("The ocean between Europe and America is the", "Atlantic", "ocean"),
    ("The ocean around the North Pole is the", "Arctic", "ocean"),
    ("The longest river in Africa is the", "Nile", "river"),
    ("The river that flows through London is the", "Thames", "river"),
    ("The river that flows through Paris is the", "Seine", "river"),
    ("A week has seven", "days", "unit"), ("An hour has sixty", "minutes", "unit"),
    ("A minute has sixty", "seconds", "unit"), ("A year has twelve", "months", "unit"),
    ("A century is one hundred", "years", "unit"),
    ("A triangle has three", "sides", "shape"), ("A square has four equal", "sides", "shape"),
    ("The fastest land animal is the", "cheetah", "animal"), ("The largest animal on Earth is the blue", "whale", "animal"),
    ("The animal known as the king of the jungle is the", "lion", "animal"),
    ("The tallest animal is the", "giraffe", "animal"), ("An animal with a trunk is the", "elephant", "animal"),
]


def add(items, rng, question, answer, pool, kind):
    distractors = rng.sample(sorted(set(pool) - {answer}), 3)
    choices = distractors + [answer]
    rng.shuffle(choices)
    items.append({"question": question, "choices": choices, "answer": choices.index(answer), "kind": kind})


def main() -> None:
    rng = random.Random(2026)
    items: list[dict] = []
    for country, city in CAPITALS.items():
        add(items, rng, f"The capital of {country} is", city, CAPITALS.values(), "capital")
    for word, opposite in OPPOSITES.items():
        add(items, rng, f"The opposite of {word} is", opposite, OPPOSITES.values(), "opposite")
    for i, day in enumerate(DAYS):
        add(items, rng, f"The day after {day} is", DAYS[(i + 1) % 7], DAYS, "day")
    for i, month in enumerate(MONTHS[:-1]):
        add(items, rng, f"The month after {month} is", MONTHS[i + 1], MONTHS, "month")
    for a, b in [(1, 1), (2, 2), (2, 3), (3, 4), (5, 5), (6, 3), (4, 4), (7, 2), (1, 8), (3, 3)]:
        add(items, rng, f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} equals", NUMBERS[a + b], NUMBERS, "sum")
    by_kind: dict[str, list[str]] = {}
    for _, answer, kind in GENERAL:
        by_kind.setdefault(kind, []).append(answer)
    vocabulary = sorted({answer for _, answer, _ in GENERAL})
    for question, answer, kind in GENERAL:
        pool = by_kind[kind] if len(set(by_kind[kind]) - {answer}) >= 3 else vocabulary
        add(items, rng, question, answer, pool, kind)
    out = Path(__file__).with_name("facts.jsonl")
    out.write_text("".join(json.dumps(item) + "\n" for item in items))
    print(f"{len(items)} items -> {out}")


if __name__ == "__main__":
    main()
