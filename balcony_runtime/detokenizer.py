"""Incremental text for a stream of tokens, with stop strings that never leak into the output.

Constant work per token, by one of two routes chosen once per tokenizer (:func:`token_texts`):

- Byte-level BPE (GPT-2's scheme: LLaMA-3, SmolLM2, Qwen, ...): a token *is* a byte string, and the
  text of a sequence is the UTF-8 decode (lossy: U+FFFD for what is not UTF-8) of its tokens' bytes
  joined. So each token's bytes are looked up in a table built once, and a UTF-8 incremental decoder
  turns them into text, holding back a multi-byte character until its last byte arrives. No call
  into the tokenizer per token. The table is checked against the tokenizer's own decode when it is
  built, and not used if they disagree.
- Any other tokenizer: a short window of tokens is decoded per step (the offsets of vLLM's
  incremental detokenizer and tokenizers' DecodeStream). ``prefix_offset:read_offset`` are tokens
  whose text was already handed on (kept as context, since some tokenizers decode a token
  differently after another one); ``read_offset:`` are tokens whose text is not out yet. The
  window's text minus the prefix's is the new text, handed on only once it does not end in U+FFFD,
  the replacement character of an incomplete multi-byte sequence: a later token may complete it.

Either way every cut falls where the text so far was complete, so the pieces join to exactly the
full decode of all the tokens (``tokenizer.decode(ids, skip_special_tokens=True)``).
"""

from __future__ import annotations

import codecs
import functools
import random
from dataclasses import dataclass, field
from typing import Callable, Protocol

_INCOMPLETE = "\ufffd"  # what a byte-level decode shows for a multi-byte character cut short


class TextStream(Protocol):
    def text_of(self, token_id: int, final: bool = False) -> str:
        """Append a token; return the text it completes ("" while a character is cut short)."""


class TokenTexts(Protocol):
    """Per tokenizer, built once and shared by every request's stream."""

    def new_stream(self) -> TextStream: ...


@dataclass
class IncrementalDetokenizer:
    texts: TokenTexts  # token_texts(tokenizer), built once per tokenizer
    stop: tuple[str, ...] = ()
    pending: str = ""  # decoded text not handed out yet (held back for stop strings), cut at a stop
    stopped: bool = False  # a stop string matched

    def __post_init__(self) -> None:
        # Text that might still become a stop string is held back until it cannot.
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._stream = self.texts.new_stream()
        if not self.stop:
            # Nothing is held back and nothing can stop: a token's text is the stream's as it
            # completes. The engine calls add once per row per step, so the stream's method takes
            # its place (one call per token, not two).
            self.add = self._stream.text_of

    def add(self, token_id: int, final: bool = False) -> str:
        """Append a token; return the text that is now safe to show (possibly empty)."""
        if self.stopped:
            return ""
        new_text = self._stream.text_of(token_id, final)
        if not new_text and not final:
            return ""
        pending = self.pending + new_text  # [<= hold + len(new_text)] characters
        # Earlier text was searched when it arrived with at least ``hold`` characters after it, so
        # a stop string can only start in what is still pending.
        hits = [i for s in self.stop if (i := pending.find(s)) >= 0]
        if hits:
            pending, self.stopped = pending[: min(hits)], True
        self.pending = pending
        safe = len(pending) if (self.stopped or final) else len(pending) - self._hold
        return self.flush(max(0, safe))

    def flush(self, upto: int | None = None) -> str:
        """Hand out the pending text up to ``upto`` characters of it (all of it by default)."""
        upto = len(self.pending) if upto is None else upto
        out, self.pending = self.pending[:upto], self.pending[upto:]
        return out


def token_texts(tokenizer) -> TokenTexts:
    """The fastest exact route from this tokenizer's tokens to text (module docstring)."""
    table = byte_level_table(tokenizer)
    return ByteTexts(table) if table is not None else WindowTexts(text_decoder(tokenizer))


# ---- byte-level BPE: a table of bytes --------------------------------------------------------


@dataclass(frozen=True)
class ByteTexts:
    table: tuple[bytes, ...]  # token id -> its bytes (b"" for special tokens)
    # token id -> its text when its bytes are whole UTF-8 characters on their own, else None: what
    # a stream with nothing pending hands out for it without decoding (most tokens, most steps).
    whole: tuple[str | None, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "whole", tuple(_whole_text(b) for b in self.table))

    def new_stream(self) -> "ByteStream":
        return ByteStream(self.table, self.whole)


def _whole_text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class ByteStream:
    """UTF-8 decoding of a token's bytes as they come (what codecs' incremental decoder does,
    without its extra Python frame per token): bytes of a cut-short character wait in ``pending``.
    errors="replace" marks invalid bytes as the Rust decoder's from_utf8_lossy does (one U+FFFD
    per maximal invalid subpart)."""

    __slots__ = ("table", "whole", "pending")

    def __init__(self, table: tuple[bytes, ...], whole: tuple[str | None, ...]):
        self.table = table
        self.whole = whole  # ByteTexts.whole
        self.pending = b""  # the start of a character whose last bytes have not come yet

    def text_of(self, token_id: int, final: bool = False) -> str:
        table, pending = self.table, self.pending
        if not 0 <= token_id < len(table):
            data = pending  # an id outside the vocabulary decodes to nothing, as in the backend
        elif pending:
            data = pending + table[token_id]
        else:
            text = self.whole[token_id]
            if text is not None:  # whole characters after whole characters: nothing to decode
                return text
            data = table[token_id]
        text, used = codecs.utf_8_decode(data, "replace", final)
        self.pending = data[used:]
        return text


def byte_level_table(tokenizer, check_sequences: int = 64) -> tuple[bytes, ...] | None:
    """Each token's bytes, when the tokenizer is byte-level BPE decoded by its Rust backend alone;
    None otherwise, or when the table disagrees with the tokenizer's decode on a random sample."""
    try:
        from tokenizers import decoders
    except ImportError:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel) or not _decodes_directly(tokenizer):
        return None
    to_bytes = str.maketrans({ch: chr(b) for ch, b in _byte_level_alphabet().items()})
    vocab = backend.get_vocab(with_added_tokens=False)
    added = backend.get_added_tokens_decoder()  # id -> AddedToken
    size = max([*vocab.values(), *added.keys(), -1]) + 1
    table: list[bytes] = [b""] * size  # ids without a token decode to nothing, as in the backend
    try:
        for token, i in vocab.items():
            table[i] = token.translate(to_bytes).encode("latin-1")
    except UnicodeEncodeError:
        return None  # a character outside the byte alphabet: not plain byte-level BPE
    for i, token in added.items():
        table[i] = b"" if token.special else token.content.encode()
    table_t = tuple(table)
    # The check: the table must reproduce the backend's decode (special tokens, added tokens and
    # invalid UTF-8 included) on random sequences; a few milliseconds, once per engine.
    rng = random.Random(0)
    ids = list(added)
    for _ in range(check_sequences):
        seq = [rng.choice(ids) if ids and rng.random() < 0.1 else rng.randrange(size) for _ in range(16)]
        expected = backend.decode(seq, skip_special_tokens=True)
        if b"".join(table_t[t] for t in seq).decode("utf-8", errors="replace") != expected:
            return None
    return table_t


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    chars = {chr(b): b for b in kept}
    chars.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return chars


# ---- any tokenizer: a window of tokens decoded per step --------------------------------------


@dataclass(frozen=True)
class WindowTexts:
    decode: Callable[[list[int]], str]

    def new_stream(self) -> "WindowStream":
        return WindowStream(self.decode)


@dataclass
class WindowStream:
    decode: Callable[[list[int]], str]
    token_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0  # first token of the decode window (context, its text already out)
    read_offset: int = 0  # first token whose text is not yet handed on

    def text_of(self, token_id: int, final: bool = False) -> str:
        """Text of the tokens from ``read_offset`` on, once complete (or ``final``), else ""."""
        decode, ids = self.decode, self.token_ids
        ids.append(token_id)
        prefix_text = decode(ids[self.prefix_offset : self.read_offset])
        window_text = decode(ids[self.prefix_offset :])
        if len(window_text) <= len(prefix_text) or (window_text.endswith(_INCOMPLETE) and not final):
            return ""  # nothing new yet (a skipped special token), or a character cut short
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return window_text[len(prefix_text) :]


def _decodes_directly(tokenizer) -> bool:
    """Whether ``tokenizer.decode(ids, skip_special_tokens=True)`` is exactly its Rust backend's
    decode (a generic fast tokenizer with no space clean-up)."""
    from transformers import PreTrainedTokenizerFast

    return (getattr(tokenizer, "backend_tokenizer", None) is not None
            and type(tokenizer)._decode is PreTrainedTokenizerFast._decode
            and not getattr(tokenizer, "clean_up_tokenization_spaces", False))


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """``ids -> text`` without special tokens, as ``tokenizer.decode(ids, skip_special_tokens=True)``.

    Where that call is exactly the Rust tokenizer's decode, the Rust decode is called directly:
    transformers' wrapper around it (argument conversion, kwargs, the clean-up check) costs a few
    times the decode of a short window, and a window step runs it twice."""
    if _decodes_directly(tokenizer):
        return functools.partial(tokenizer.backend_tokenizer.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True)
