"""bench/wordnet_text.py reads WordNet's data files as wndb(5WN) defines them and keeps suite facts out."""

from __future__ import annotations

import json

# Three synsets in the real file format (offsets, pointers and the licence header as in data.noun).
DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
08932568 15 n 04 Paris 0 City_of_Light 0 French_capital 0 capital_of_France 0 003 @ 08518505 n 0000 #p 08931837 n 0000 | the capital and largest city of France; and international center of culture and commerce
01503061 05 n 01 bird 0 002 @ 01471682 n 0000 ~ 01503976 n 0000 | warm-blooded egg-laying vertebrates characterized by feathers and forelimbs modified as wings
01317541 05 n 02 domestic_animal 0 domesticated_animal 0 001 @ 00015388 n 0000 | any of various animals that have been tamed; "dogs are domestic animals"
"""
DATA_ADJ = "00001740 00 a 01 able 0 001 ! 00002098 a 0101 | (usually followed by `to') having the necessary means; \"able to swim\"\n"


def make_source(tmp_path):
    src = tmp_path / "dict"
    src.mkdir()
    (src / "data.noun").write_text(DATA_NOUN)
    (src / "data.adj").write_text(DATA_ADJ)
    (src / "data.verb").write_text("")
    (src / "data.adv").write_text("")
    return src


def test_entries_are_words_and_gloss_grouped_by_lexicographer_file(bench_script, tmp_path):
    with bench_script("wordnet_text") as wn:
        assert wn.parse_data_line(DATA_NOUN.splitlines()[0]) is None
        lexfile, words, gloss = wn.parse_data_line(DATA_NOUN.splitlines()[2])
        assert lexfile == 15 and words == ["Paris", "City of Light", "French capital", "capital of France"]
        assert gloss.startswith("the capital and largest city of France;")
        assert wn.main([str(make_source(tmp_path)), "--out", str(tmp_path / "out"), "--entries", "1"]) == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["adj-00-0000.txt", "noun-05-0000.txt", "noun-05-0001.txt", "noun-15-0000.txt"]
    assert (tmp_path / "out" / "noun-15-0000.txt").read_text().startswith(
        "Paris, City of Light, French capital, capital of France: the capital and largest city")
    assert (tmp_path / "out" / "adj-00-0000.txt").read_text().startswith("able: (usually followed")


def test_suite_facts_are_dropped(bench_script, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"question": "The capital of France is", "choices": ["London", "Paris"],
                                 "answer": 1}) + "\n")
    out = tmp_path / "out"
    with bench_script("wordnet_text") as wn:
        assert wn.main([str(make_source(tmp_path)), "--out", str(out), "--exclude-facts", str(facts)]) == 0
    text = "".join(p.read_text() for p in out.iterdir())
    assert "Paris" not in text and "warm-blooded" in text and "able to swim" in text


def test_share_keeps_a_seeded_subset(bench_script, tmp_path):
    src = make_source(tmp_path)
    with bench_script("wordnet_text") as wn:
        assert wn.build(src, tmp_path / "all", 1, 1.0, 0) == (4, 4, 0)
        assert wn.build(src, tmp_path / "none", 1, 0.0, 0) == (0, 0, 0)
        draws = [wn.build(src, tmp_path / f"half{i}", 1, 0.5, 3) for i in range(2)]
    assert draws[0] == draws[1]
    assert sorted(p.name for p in (tmp_path / "half0").iterdir()) == sorted(p.name for p in (tmp_path / "half1").iterdir())
