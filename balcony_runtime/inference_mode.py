"""Inference mode entered once per thread, not once per call.

``@torch.inference_mode()`` builds a context object and enters and leaves the mode on every call:
a few microseconds, twice a step (the runner's forward and sampling), on a path whose whole host
budget is a fraction of a millisecond. The engine's step loops (server/async_engine.py,
server/engine_core.py) run inside the mode for as long as they live, so the runner's methods find it
on and go straight in; any other caller (tests, the offline generate loop, benchmarks) still gets it
entered around the call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def in_inference_mode(fn: F) -> F:
    """``fn`` run under torch.inference_mode(), entered only if the calling thread is not in it."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]
