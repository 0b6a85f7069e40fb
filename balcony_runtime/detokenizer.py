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

from dataclasses import dataclass, field

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
        decode, ids = self.tokenizer.decode, self.token_ids
        prefix_text = decode(ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        window_text = decode(ids[self.prefix_offset :], skip_special_tokens=True)
        if len(window_text) <= len(prefix_text) or (window_text.endswith(_INCOMPLETE) and not final):
            return ""  # nothing new yet (a skipped special token), or a character cut short
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return window_text[len(prefix_text) :]
