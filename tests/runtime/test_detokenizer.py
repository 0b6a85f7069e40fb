"""The incremental detokenizer against full decoding with the default model's tokenizer: random
tokens, multi-byte characters split across tokens, stop strings, and constant work per token."""

from __future__ import annotations

import random

import pytest

from balcony_runtime.detokenizer import IncrementalDetokenizer

MULTI_BYTE = [
    "héllo 世界 😀 ok",
    "日本語のテキストと絵文字 🎉🎉 and ascii",
    "👩‍👩‍👧‍👦 family, 🇫🇷 flag, e\u0301 combining",
    "中文，标点。Ελληνικά — Кириллица ¿qué?",
]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for i, token in enumerate(ids):
        pieces.append(detok.add(token, final=i == len(ids) - 1))
        if detok.stopped:
            break
    return pieces, detok


def full(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("seed", range(8))
def test_random_tokens_join_to_the_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    vocab = len(tokenizer)
    specials = list(tokenizer.all_special_ids)
    ids = [rng.choice(specials) if rng.random() < 0.05 else rng.randrange(vocab) for _ in range(rng.randrange(1, 300))]
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == full(tokenizer, ids)


@pytest.mark.parametrize("text", MULTI_BYTE)
def test_multi_byte_characters_are_never_cut(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids), "the text should split characters across tokens"
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == full(tokenizer, ids) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("seed", range(6))
def test_bytes_in_any_order_match_the_full_decode(tokenizer, seed):
    """Byte tokens of multi-byte characters shuffled: sequences that never complete, cut short,
    or are completed late; the full decode's replacement characters appear in the same places."""
    rng = random.Random(seed)
    ids = [t for text in MULTI_BYTE for t in tokenizer.encode(text, add_special_tokens=False)]
    rng.shuffle(ids)
    ids = ids[: rng.randrange(1, len(ids))]
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == full(tokenizer, ids)


@pytest.mark.parametrize("seed", range(6))
def test_stop_strings_cut_the_text_and_never_leak(tokenizer, seed):
    rng = random.Random(seed)
    text = " ".join(rng.choice(["alpha", "beta", "日本", "😀", "stop", "go", "x"]) for _ in range(60))
    ids = tokenizer.encode(text, add_special_tokens=False)
    whole = full(tokenizer, ids)
    start = rng.randrange(len(whole) // 2)
    stops = (whole[start : start + rng.randrange(1, 6)], "never there")
    pieces, detok = stream(tokenizer, ids, stops)
    expected = whole[: min(i for s in stops if (i := whole.find(s)) >= 0)]
    assert detok.stopped
    assert "".join(pieces) == expected
    assert detok.emitted == len(expected)


def test_text_after_a_stop_string_search_boundary(tokenizer):
    """A stop string that arrives split over many tokens is still caught."""
    ids = tokenizer.encode("one two three four five", add_special_tokens=False)
    pieces, detok = stream(tokenizer, ids, ("three four",))
    assert detok.stopped and "".join(pieces) == "one two "


def test_special_stop_flushes_what_was_held(tokenizer):
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, ("zzzzzz",))
    out = "".join(detok.add(t) for t in ids)
    assert len(out) < len("hello world")  # five characters held back for the stop string
    out += detok.add(tokenizer.eos_token_id, final=True) + detok.flush()
    assert out == "hello world"


def test_work_per_token_is_constant(tokenizer):
    """Each token decodes a short window, not the whole output."""
    decoded_lengths = []

    class Counting:
        def decode(self, ids, **kwargs):
            decoded_lengths.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    text = ("The history of printing 😀 日本語 " * 200)[:4000]
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 1000
    pieces, _ = stream(Counting(), ids)
    assert "".join(pieces) == text
    assert max(decoded_lengths) <= 8


def test_direct_decode_equals_transformers_decode_with_special_tokens(tokenizer):
    from balcony_runtime.detokenizer import text_decoder

    decode = text_decoder(tokenizer)
    assert decode.func == tokenizer.backend_tokenizer.decode  # the default tokenizer takes the direct path
    rng = random.Random(3)
    specials = tokenizer.all_special_ids
    for _ in range(50):
        ids = [rng.choice(specials) if rng.random() < 0.2 else rng.randrange(len(tokenizer)) for _ in range(12)]
        assert decode(ids) == full(tokenizer, ids)


def test_tokenizers_with_space_clean_up_keep_transformers_decode(tokenizer, monkeypatch):
    from balcony_runtime.detokenizer import text_decoder

    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", True)
    assert text_decoder(tokenizer).func == tokenizer.decode
