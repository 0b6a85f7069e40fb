"""The budget and exit request headers."""

from __future__ import annotations

import math

from server.errors import APIError

BUDGET_HEADER = "X-Latency-Budget-Ms"
EXIT_HEADER = "X-Balcony-Exit"


def parse_budget(value: str | None) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        budget = float(value)
    except ValueError:
        budget = float("nan")
    if not math.isfinite(budget) or budget <= 0:
        raise APIError(400, f"{BUDGET_HEADER} must be a positive number of milliseconds, got {value!r}",
                       param=BUDGET_HEADER)
    return budget


def parse_exit(value: str | None, exits: tuple[int, ...], full_depth: int) -> int | None:
    """A forced exit: a served balcony's layer count, or 'full' where the full model is served."""
    if value is None or value.strip() == "":
        return None
    text = value.strip().lower()
    if text == "full" and full_depth in exits:
        return full_depth
    if text.isdigit() and int(text) in exits:
        return int(text)
    names = ", ".join(exit_name(e, full_depth) for e in exits)
    raise APIError(400, f"{EXIT_HEADER} must be one of {names}, got {value!r}", param=EXIT_HEADER)


def exit_name(exit_layer: int, full_depth: int) -> str:
    return "full" if exit_layer == full_depth else str(exit_layer)
