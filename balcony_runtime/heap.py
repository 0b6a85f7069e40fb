"""The Python heap of a serving process: what start-up built is frozen, the rest collected rarely.

A decode step allocates a few container objects per row (its plan's rows, each output and its token
list), about a thousand at 256 rows, and nearly all of them die by reference counting within the
step. CPython's default threshold (700 allocations) then runs a young-generation collection about
once a step, each walking every container still alive at that moment (the step's own working set)
to find the cycles that are almost never there (its share of the host-only step: docs/benchmarks.md,
"Steady decodes planned from arrays"). With the threshold at
20,000 a collection comes every few dozen steps and walks about the same live set, so the cost per
step falls by that factor; cycles, rare here, wait a little longer to be freed.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

YOUNG_THRESHOLD = 20_000  # allocations between young-generation collections (CPython's default: 700)


def settle_for_serving() -> None:
    """Call once start-up is done: what exists now (weights, tokenizer, CUDA graphs, imported
    modules: millions of objects) lives as long as the process, so it leaves the collector's
    generations (a full collection then walks only what requests allocate, as vLLM's engine core
    does after start-up), and the young generation is collected every YOUNG_THRESHOLD allocations."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])


@contextlib.contextmanager
def serving_heap() -> Iterator[None]:
    """settle_for_serving() for a while (benchmarks that stand in for a server), then the collector
    as it was: the frozen objects back in its generations, the old threshold."""
    threshold = gc.get_threshold()
    settle_for_serving()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
