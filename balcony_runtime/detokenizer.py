"""Incremental text for a stream of tokens, with stop strings that never leak into the output."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IncrementalDetokenizer:
    tokenizer: object  # transformers tokenizer
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded text of token_ids, cut at a stop string once one matched
    emitted: int = 0  # characters of ``text`` already handed out
    stopped: bool = False  # a stop string matched

    def __post_init__(self) -> None:
        # Text that might still become a stop string is held back until it cannot.
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token_id: int, final: bool = False) -> str:
        """Append a token; return the text that is now safe to show (possibly empty)."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return ""  # an incomplete multi-byte character: wait for the next token
        search_from = max(0, self.emitted - self._hold)
        hits = [i for s in self.stop if (i := text.find(s, search_from)) >= 0]
        if hits:
            text, self.stopped = text[: min(hits)], True
        self.text = text
        safe = len(text) if (self.stopped or final) else max(self.emitted, len(text) - self._hold)
        return self.flush(safe)

    def flush(self, upto: int | None = None) -> str:
        """Hand out the text up to ``upto`` characters (all of it by default)."""
        upto = len(self.text) if upto is None else upto
        out = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return out
