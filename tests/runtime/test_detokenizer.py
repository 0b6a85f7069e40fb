"""The incremental detokenizer against full decoding with the default model's tokenizer, by both
routes (the byte table and the decoded window): random tokens, multi-byte characters split across
tokens, invalid UTF-8, stop strings, and constant work per token."""

from __future__ import annotations

import random

import pytest

from balcony_runtime.detokenizer import (
    ByteTexts, IncrementalDetokenizer, WindowTexts, byte_level_table, text_decoder, token_texts,
)

MULTI_BYTE = [
    "héllo 世界 😀 ok",
    "日本語のテキストと絵文字 🎉🎉 and ascii",
    "👩‍👩‍👧‍👦 family, 🇫🇷 flag, e\u0301 combining",
    "中文，标点。Ελληνικά — Кириллица ¿qué?",
]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


@pytest.fixture(scope="module", params=["bytes", "window"])
def texts(request, tokenizer):
    if request.param == "bytes":
        return ByteTexts(byte_level_table(tokenizer))
    return WindowTexts(text_decoder(tokenizer))


def stream(texts, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(texts, stop)
    pieces = []
    for i, token in enumerate(ids):
        pieces.append(detok.add(token, final=i == len(ids) - 1))
        if detok.stopped:
            break
    return pieces, detok


def full(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("seed", range(8))
def test_random_tokens_join_to_the_full_decode(tokenizer, texts, seed):
    rng = random.Random(seed)
    vocab = len(tokenizer)
    specials = list(tokenizer.all_special_ids)
    ids = [rng.choice(specials) if rng.random() < 0.05 else rng.randrange(vocab) for _ in range(rng.randrange(1, 300))]
    pieces, _ = stream(texts, ids)
    assert "".join(pieces) == full(tokenizer, ids)


@pytest.mark.parametrize("text", MULTI_BYTE)
def test_multi_byte_characters_are_never_cut(tokenizer, texts, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids), "the text should split characters across tokens"
    pieces, _ = stream(texts, ids)
    assert "".join(pieces) == full(tokenizer, ids) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("seed", range(6))
def test_bytes_in_any_order_match_the_full_decode(tokenizer, texts, seed):
    """Byte tokens of multi-byte characters shuffled: sequences that never complete, cut short,
    or are completed late; the full decode's replacement characters appear in the same places."""
    rng = random.Random(seed)
    ids = [t for text in MULTI_BYTE for t in tokenizer.encode(text, add_special_tokens=False)]
    rng.shuffle(ids)
    ids = ids[: rng.randrange(1, len(ids))]
    pieces, _ = stream(texts, ids)
    assert "".join(pieces) == full(tokenizer, ids)


@pytest.mark.parametrize("seed", range(6))
def test_stop_strings_cut_the_text_and_never_leak(tokenizer, texts, seed):
    rng = random.Random(seed)
    text = " ".join(rng.choice(["alpha", "beta", "日本", "😀", "stop", "go", "x"]) for _ in range(60))
    ids = tokenizer.encode(text, add_special_tokens=False)
    whole = full(tokenizer, ids)
    start = rng.randrange(len(whole) // 2)
    stops = (whole[start : start + rng.randrange(1, 6)], "never there")
    pieces, detok = stream(texts, ids, stops)
    expected = whole[: min(i for s in stops if (i := whole.find(s)) >= 0)]
    assert detok.stopped
    assert "".join(pieces) == expected


def test_text_after_a_stop_string_search_boundary(tokenizer, texts):
    """A stop string that arrives split over many tokens is still caught."""
    ids = tokenizer.encode("one two three four five", add_special_tokens=False)
    pieces, detok = stream(texts, ids, ("three four",))
    assert detok.stopped and "".join(pieces) == "one two "


def test_special_stop_flushes_what_was_held(tokenizer, texts):
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    detok = IncrementalDetokenizer(texts, ("zzzzzz",))
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
    pieces, _ = stream(token_texts(Counting()), ids)
    assert "".join(pieces) == text
    assert max(decoded_lengths) <= 8


def test_direct_decode_equals_transformers_decode_with_special_tokens(tokenizer):
    decode = text_decoder(tokenizer)
    assert decode.func == tokenizer.backend_tokenizer.decode  # the default tokenizer takes the direct path
    rng = random.Random(3)
    specials = tokenizer.all_special_ids
    for _ in range(50):
        ids = [rng.choice(specials) if rng.random() < 0.2 else rng.randrange(len(tokenizer)) for _ in range(12)]
        assert decode(ids) == full(tokenizer, ids)


def test_tokenizers_with_space_clean_up_keep_transformers_decode(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", True)
    assert text_decoder(tokenizer).func == tokenizer.decode
    assert isinstance(token_texts(tokenizer), WindowTexts)  # its decode is not the bytes joined


def test_the_default_tokenizer_takes_the_byte_table(tokenizer):
    table = byte_level_table(tokenizer)
    assert isinstance(token_texts(tokenizer), ByteTexts)
    assert len(table) == len(tokenizer)
    assert table[tokenizer.eos_token_id] == b""  # special tokens are skipped, as in the decode
    # Every token on its own: the table's bytes, decoded lossily, are the tokenizer's decode.
    for i in range(len(table)):
        assert table[i].decode("utf-8", errors="replace") == full(tokenizer, [i]), i


def test_a_table_that_disagrees_with_the_decode_is_not_used(tokenizer, monkeypatch):
    backend = tokenizer.backend_tokenizer
    wrong = type("Wrong", (), {"decoder": backend.decoder, "get_vocab": backend.get_vocab,
                               "get_added_tokens_decoder": backend.get_added_tokens_decoder,
                               "decode": lambda self, ids, **kw: backend.decode(ids, **kw).upper()})()
    monkeypatch.setattr(type(tokenizer), "backend_tokenizer", property(lambda self: wrong))
    assert byte_level_table(tokenizer) is None


def test_out_of_vocabulary_ids_decode_to_nothing(tokenizer):
    """A model's vocabulary may be padded past the tokenizer's; the backend skips such ids."""
    detok = IncrementalDetokenizer(ByteTexts(byte_level_table(tokenizer)))
    ids = tokenizer.encode("hi there", add_special_tokens=False)
    out = detok.add(ids[0]) + detok.add(len(tokenizer) + 5) + "".join(detok.add(t) for t in ids[1:])
    assert out + detok.flush() == full(tokenizer, ids)
