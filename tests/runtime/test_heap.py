"""The serving process's heap settings (balcony_runtime/heap.py)."""

from __future__ import annotations

import gc

from balcony_runtime.heap import YOUNG_THRESHOLD, serving_heap


def _young_collections_while(allocate) -> int:
    seen = []
    callback = lambda phase, info: seen.append(info["generation"]) if phase == "start" else None  # noqa: E731
    gc.callbacks.append(callback)
    try:
        allocate()
    finally:
        gc.callbacks.remove(callback)
    return seen.count(0)


def _a_step_of_containers() -> None:
    """About what a decode step of 256 rows allocates and drops: a few thousand small containers
    alive at once, freed by reference counting."""
    for _ in range(5):
        rows = [[i] for i in range(1000)]
        del rows


def test_serving_collects_the_young_generation_rarely_and_restores_the_collector():
    before = gc.get_threshold()  # (a server test in this process may have settled it already)
    gc.set_threshold(700, *before[1:])  # CPython's default
    try:
        assert _young_collections_while(_a_step_of_containers) >= 3
        with serving_heap():
            assert gc.get_threshold()[0] == YOUNG_THRESHOLD
            assert gc.get_freeze_count() > 0  # what existed is out of the generations
            assert _young_collections_while(_a_step_of_containers) == 0
        assert gc.get_threshold() == (700, *before[1:]) and gc.get_freeze_count() == 0
    finally:
        gc.set_threshold(*before)
