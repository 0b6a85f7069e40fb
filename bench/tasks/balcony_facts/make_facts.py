"""Writes facts.jsonl and facts_more.jsonl: two 4-way multiple-choice suites of plain facts for
lm-evaluation-harness (tasks balcony_facts and balcony_facts_more).

Each item is a sentence opening whose true continuation is one word or short phrase; the three
distractors are other answers of the same kind (drawn with a fixed seed), so a model that only knows
the kind of answer scores 0.25. Facts, not trivia: the full default model should know most of them,
which is what makes the suite say how much of that an exit keeps.

    python bench/tasks/balcony_facts/make_facts.py   # rewrites both files beside this one
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


# The second suite (facts_more.jsonl, task balcony_facts_more): other kinds of plain facts, so a
# figure does not rest on one list of 135. The first suite's items and their order are unchanged.
MORE_CAPITALS = {
    "the Netherlands": "Amsterdam", "Switzerland": "Bern", "Mexico": "Mexico City", "Brazil": "Brasilia",
    "Chile": "Santiago", "Colombia": "Bogota", "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh",
    "Indonesia": "Jakarta", "the Philippines": "Manila", "Vietnam": "Hanoi", "the Czech Republic": "Prague",
    "Romania": "Bucharest", "Scotland": "Edinburgh", "Wales": "Cardiff", "Nigeria": "Abuja", "Morocco": "Rabat",
    "New Zealand": "Wellington", "Pakistan": "Islamabad",
}
MORE_OPPOSITES = {
    "north": "south", "east": "west", "left": "right", "day": "night", "question": "answer", "begin": "end",
    "push": "pull", "true": "false", "give": "take", "love": "hate", "before": "after", "above": "below",
    "always": "never", "friend": "enemy", "summer": "winter",
}
CONTINENTS = {
    "Kenya": "Africa", "Egypt": "Africa", "Nigeria": "Africa", "Japan": "Asia", "India": "Asia",
    "China": "Asia", "Vietnam": "Asia", "France": "Europe", "Germany": "Europe", "Poland": "Europe",
    "Brazil": "South America", "Argentina": "South America", "Chile": "South America",
    "Mexico": "North America", "Canada": "North America",
}
LANGUAGES = {
    "Brazil": "Portuguese", "Mexico": "Spanish", "Japan": "Japanese", "Germany": "German", "France": "French",
    "Italy": "Italian", "Russia": "Russian", "China": "Chinese", "Greece": "Greek", "the Netherlands": "Dutch",
    "Poland": "Polish", "Turkey": "Turkish", "Sweden": "Swedish", "Egypt": "Arabic",
}
CURRENCIES = {
    "Japan": "yen", "the United Kingdom": "pound", "the United States": "dollar", "India": "rupee",
    "China": "yuan", "Russia": "ruble", "Mexico": "peso", "Switzerland": "franc", "Germany": "euro",
    "South Korea": "won",
}
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
    "goose": "geese", "person": "people", "leaf": "leaves", "knife": "knives", "ox": "oxen", "wolf": "wolves",
}
PAST_TENSES = {
    "go": "went", "eat": "ate", "see": "saw", "run": "ran", "write": "wrote", "take": "took", "buy": "bought",
    "think": "thought", "swim": "swam", "sing": "sang", "drink": "drank", "fly": "flew", "speak": "spoke",
    "teach": "taught", "catch": "caught",
}
MORE_GENERAL = [
    ("The Eiffel Tower is in", "Paris", "city"), ("The Colosseum is in", "Rome", "city"),
    ("Big Ben is in", "London", "city"), ("The Statue of Liberty is in", "New York", "city"),
    ("The Kremlin is in", "Moscow", "city"), ("The Brandenburg Gate is in", "Berlin", "city"),
    ("The Sydney Opera House is in", "Sydney", "city"), ("The Acropolis is in", "Athens", "city"),
    ("The Golden Gate Bridge is in", "San Francisco", "city"), ("The Forbidden City is in", "Beijing", "city"),
    ("A person who fixes teeth is a", "dentist", "job"), ("A person who flies an airplane is a", "pilot", "job"),
    ("A person who bakes bread is a", "baker", "job"), ("A person who grows crops is a", "farmer", "job"),
    ("A person who teaches children at a school is a", "teacher", "job"),
    ("A person who puts out fires is a", "firefighter", "job"),
    ("A person who cooks in a restaurant is a", "chef", "job"),
    ("A person who repairs pipes and taps is a", "plumber", "job"),
    ("A person who cares for patients in a hospital beside the doctors is a", "nurse", "job"),
    ("A person who writes books is a", "writer", "job"),
    ("You unlock a door with a", "key", "tool"), ("You dig a hole with a", "shovel", "tool"),
    ("You sweep the floor with a", "broom", "tool"), ("You measure a length with a", "ruler", "tool"),
    ("You eat soup with a", "spoon", "tool"), ("You brush your teeth with a", "toothbrush", "tool"),
    ("You look at faraway stars through a", "telescope", "tool"),
    ("You look at tiny cells through a", "microscope", "tool"), ("You tell the time with a", "clock", "tool"),
    ("The number of legs a spider has is", "eight", "count"), ("The number of legs an insect has is", "six", "count"),
    ("The number of days in a week is", "seven", "count"), ("The number of sides of a hexagon is", "six", "count"),
    ("The number of wheels on a bicycle is", "two", "count"), ("The number of months in a year is", "twelve", "count"),
    ("The number of continents on Earth is", "seven", "count"),
    ("The number of players a football team has on the field is", "eleven", "count"),
    ("The number of hours in a day is", "twenty-four", "count"),
    ("The season after winter is", "spring", "season"), ("The season after summer is", "autumn", "season"),
    ("The coldest season of the year is", "winter", "season"), ("The hottest season of the year is", "summer", "season"),
    ("Sushi is a dish from", "Japan", "country"), ("Pizza is a dish from", "Italy", "country"),
    ("Tacos are a dish from", "Mexico", "country"), ("Paella is a dish from", "Spain", "country"),
    ("The croissant is a pastry from", "France", "country"), ("Kangaroos live in the wild in", "Australia", "country"),
    ("The Great Wall is in", "China", "country"), ("The largest country in the world by area is", "Russia", "country"),
    ("In tennis, players hit the ball with a", "racket", "equipment"),
    ("In baseball, the batter hits the ball with a", "bat", "equipment"),
    ("In golf, players hit the ball with a", "club", "equipment"),
    ("In ice hockey, players hit the puck with a", "stick", "equipment"),
    ("Mixing blue and yellow paint makes", "green", "mix"), ("Mixing red and white paint makes", "pink", "mix"),
    ("Mixing red and yellow paint makes", "orange", "mix"), ("Mixing red and blue paint makes", "purple", "mix"),
    ("Mixing black and white paint makes", "grey", "mix"),
    ("The force that pulls things toward the ground is", "gravity", "science"),
    ("The center of an atom is the", "nucleus", "science"),
    ("The star at the center of our solar system is the", "Sun", "science"),
    ("The natural satellite that orbits the Earth is the", "Moon", "science"),
    ("The tallest mountain in the world is Mount", "Everest", "science"),
    ("The largest desert in Africa is the", "Sahara", "science"),
    ("The hardest natural material is", "diamond", "science"),
]

def add(items, rng, question, answer, pool, kind):
    distractors = rng.sample(sorted(set(pool) - {answer}), 3)
    choices = distractors + [answer]
    rng.shuffle(choices)
    items.append({"question": question, "choices": choices, "answer": choices.index(answer), "kind": kind})


def general_items(items, rng, table) -> None:
    """Items of an (opening, answer, kind) table: distractors of the same kind, or any answer of the
    table where a kind has fewer than four."""
    by_kind: dict[str, list[str]] = {}
    for _, answer, kind in table:
        by_kind.setdefault(kind, []).append(answer)
    vocabulary = sorted({answer for _, answer, _ in table})
    for question, answer, kind in table:
        pool = by_kind[kind] if len(set(by_kind[kind]) - {answer}) >= 3 else vocabulary
        add(items, rng, question, answer, pool, kind)


def first_suite() -> list[dict]:
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
    general_items(items, rng, GENERAL)
    return items


def second_suite() -> list[dict]:
    rng = random.Random(2027)
    items: list[dict] = []
    tables = [
        (MORE_CAPITALS, "The capital of {} is", "capital"), (MORE_OPPOSITES, "The opposite of {} is", "opposite"),
        (CONTINENTS, "{} is a country in", "continent"), (LANGUAGES, "The main language of {} is", "language"),
        (CURRENCIES, "The currency of {} is the", "currency"), (PLURALS, "The plural of {} is", "plural"),
        (PAST_TENSES, "The past tense of {} is", "past"),
    ]
    for table, opening, kind in tables:
        for key, answer in table.items():
            question = opening.format(key)
            add(items, rng, question[0].upper() + question[1:], answer, table.values(), kind)
    general_items(items, rng, MORE_GENERAL)
    return items


def main() -> None:
    for name, items in (("facts.jsonl", first_suite()), ("facts_more.jsonl", second_suite())):
        out = Path(__file__).with_name(name)
        out.write_text("".join(json.dumps(item) + "\n" for item in items))
        print(f"{len(items)} items -> {out}")

if __name__ == "__main__":
    main()
