"""Incremental text for a stream of tokens, with stop strings that never leak into the output.

Constant work per token (the offsets of vLLM's incremental detokenizer and tokenizers' DecodeStream):
only a short window of tokens is decoded at each step. ``prefix_offset:read_offset`` are tokens whose
text was already handed on (kept as context, since some tokenizers decode a token differently after
another one); ``read_offset:`` are tokens whose text is not out yet. The window's text minus the
prefix's text is the new text, handed on only once it does not end in U+FFFD, the replacement
character of an incomplete multi-byte sequence: a later token may complete it. Every cut falls where
the text so far was complete, so the pieces join to exactly the full decode of all the tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

_INCOMPLETE = "\ufffd"  # what a byte-level decode shows for a multi-byte character cut short


@dataclass
class IncrementalDetokenizer:
    tokenizer: object  # transformers tokenizer
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0  # first token of the decode window (context, its text already out)
    read_offset: int = 0  # first token whose text is not yet decoded into ``pending``
    pending: str = ""  # decoded text not handed out yet (held back for stop strings), cut at a stop
    emitted: int = 0  # characters handed out so far
    stopped: bool = False  # a stop string matched

    def __post_init__(self) -> None:
        # Text that might still become a stop string is held back until it cannot.
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._decode = text_decoder(self.tokenizer)

    def add(self, token_id: int, final: bool = False) -> str:
        """Append a token; return the text that is now safe to show (possibly empty)."""
        self.token_ids.append(token_id)
        if self.stopped:
            return ""
        new_text = self._decode_new(final)
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
        self.emitted += len(out)
        return out

    def _decode_new(self, final: bool) -> str:
        """Text of the tokens from ``read_offset`` on, once complete (or ``final``), else ""."""
        decode, ids = self._decode, self.token_ids
        prefix_text = decode(ids[self.prefix_offset : self.read_offset])
        window_text = decode(ids[self.prefix_offset :])
        if len(window_text) <= len(prefix_text) or (window_text.endswith(_INCOMPLETE) and not final):
            return ""  # nothing new yet (a skipped special token), or a character cut short
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return window_text[len(prefix_text) :]


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """``ids -> text`` without special tokens, as ``tokenizer.decode(ids, skip_special_tokens=True)``.

    Where that call is exactly the Rust tokenizer's decode (a generic fast tokenizer with no space
    clean-up), the Rust decode is called directly: transformers' wrapper around it (argument
    conversion, kwargs, the clean-up check) costs a few times the decode of a short window, and a
    decode step runs it twice per row."""
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and type(tokenizer)._decode is PreTrainedTokenizerFast._decode
            and not getattr(tokenizer, "clean_up_tokenization_spaces", False)):
        return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True)
