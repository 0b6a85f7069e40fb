"""One request's place in its grammar: an llguidance matcher, advanced by each sampled token."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass

import llguidance
import torch

log = logging.getLogger("balcony.structured")


@dataclass
class PendingMask:
    """A next-token mask being filled (or already filled) in a worker thread."""

    done: Future  # resolves when every row of ``bitmask`` is filled
    bitmask: torch.Tensor  # [R, ceil(V / 32)] int32 on the host: bit j of a row allows token j
    row: int  # this request's row in ``bitmask``
    position: int  # tokens the matcher had consumed when the fill was queued


@dataclass
class RequestGrammar:
    matcher: llguidance.LLMatcher  # this request's own copy, never shared
    num_consumed: int = 0  # tokens accepted so far (its output tokens)
    pending: PendingMask | None = None  # the mask for the next token, when prefetched

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; True when the output is complete (the grammar allows
        nothing more but the end of sequence, or that was this token)."""
        if self.pending is not None:  # a fill still reading the matcher must end before it moves
            self.pending.done.result()
            self.pending = None
        self.num_consumed += 1
        if not self.matcher.consume_token(token_id):
            # Masked sampling never draws a forbidden token, but an error state would only mask
            # everything from here on: end the request instead of sampling from nothing.
            log.warning("structured output refused token %d: %s", token_id, self.matcher.get_error())
            return True
        return self.matcher.is_stopped()

    def take_pending(self) -> tuple[torch.Tensor, int] | None:
        """The prefetched mask (bitmask, row) for the next token, if one is queued for the current
        state; waits for its fill."""
        pending, self.pending = self.pending, None
        if pending is None or pending.position != self.num_consumed:
            return None
        pending.done.result()  # re-raises a failed fill
        return pending.bitmask, pending.row
