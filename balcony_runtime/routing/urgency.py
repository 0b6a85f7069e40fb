"""The deadline policy's two judgements, shared by the scheduler (which acts on them) and the latency
model (which predicts what the scheduler will do): how fast a row moves in limited steps, and whether
a request with a deadline is fine, urgent or hopeless. No torch.
"""

from __future__ import annotations

import enum


class Urgency(enum.Enum):
    FINE = "fine"  # meets its deadline riding steps of every row
    URGENT = "urgent"  # misses on steps of every row, meets in limited steps of its own
    HOPELESS = "hopeless"  # misses even in limited steps of its own


def interleaved_pace(limited_s: float, full_s: float, starvation_ratio: float) -> float:
    """Seconds between a row's tokens when it runs in limited steps of ``limited_s`` and the
    starvation bound forces one step of every row (``full_s``) per ``starvation_ratio * full_s``
    seconds of limited steps: ``full_s (1 + r) / (1 + r full_s / limited_s)``, never above ``full_s``."""
    if limited_s <= 0 or limited_s >= full_s:
        return full_s
    r = starvation_ratio
    return full_s * (1 + r) / (1 + r * full_s / limited_s)


def urgency(remaining_steps: int, left_s: float, full_step_s: float, alone_pace_s: float, margin: float) -> Urgency:
    """``alone_pace_s``: its pace in limited steps of its own row only (``interleaved_pace``).
    Fine keeps ``margin`` of the time left in hand; urgent needs none (it is the last resort)."""
    if remaining_steps * full_step_s <= left_s * (1 - margin):
        return Urgency.FINE
    if remaining_steps * alone_pace_s <= left_s:
        return Urgency.URGENT
    return Urgency.HOPELESS
