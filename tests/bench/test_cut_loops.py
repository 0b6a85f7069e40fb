"""bench/cut_loops.py: chat answers keep what they say before they loop, nothing after."""

from __future__ import annotations


class WordTokenizer:
    """One token a word: enough to place a loop in the text and to cut the text there."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return text.split()

    def decode(self, ids: list[str]) -> str:
        return " ".join(ids)


def test_an_answer_is_cut_before_its_loop_and_a_fresh_one_is_kept_whole(bench_script):
    loop = "the sea is a sea of"
    rows = [
        {"prompt": "p1", "text": f"Waves come in. {loop} {loop} {loop} {loop}", "finish": "length"},
        {"prompt": "p2", "text": "A plain answer that never says a run of four words thrice.", "finish": "stop"},
        {"prompt": "p3", "text": "go go go go go go", "finish": "length"},  # runs of 4 at 0, 1 and 2
    ]
    with bench_script("cut_loops") as cut_loops:
        kept, counts = cut_loops.cut_rows(rows, WordTokenizer())
    assert kept[0] == {"prompt": "p1", "text": f"Waves come in. {loop} {loop}", "finish": "loop"}
    assert kept[1] == rows[1]
    assert kept[2] == {"prompt": "p3", "text": "go go", "finish": "loop"}
    assert counts == {"rows": 3, "cut": 2, "tokens_in": 3 + 6 * 4 + 12 + 6, "tokens_out": 3 + 12 + 12 + 2}
