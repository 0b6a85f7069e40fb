"""The block pool's work over a request's life, at long contexts: admitted with a cached prefix,
growing in a decode step, and let go of when it finishes, now and at an older revision.

    python bench/block_lifecycle.py --baseline HEAD             # 1,024 and 4,096 tokens, 31 cache layers
    python bench/block_lifecycle.py --context 8192 --baseline HEAD~3
    python bench/block_lifecycle.py --context 256 --rows 64 --layers 33     # the host-only step's 64 x 256

A request holds a block per cache layer per block_size tokens: at 4,096 tokens and 31 cache layers
(the default model's full depth plus its balcony... 30 + 1), 7,936 blocks. The host-only step
(bench/host_step.py) times decode steps of running rows, none finishing or arriving; this times
what happens around them, per request:

- **admit**: ``allocate`` with half the prompt read from the prefix cache (a shared system prompt),
  then ``cache_prefix`` of the whole prompt once computed;
- **grow**: ``try_grow_all`` of the rows a decode step of 256 rows at staggered contexts takes new
  blocks for (one in block_size), from a pool of cached prefixes nobody holds (a served pool:
  each block taken evicts a cached one);
- **free**: a finished request lets go of every block.

Both pools (this checkout's block manager and prefix cache, and ``--baseline``'s, loaded as
bench/host_step.py loads an old step) go through the same operations, one of each in turn. Prints
the median milliseconds of each operation.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balcony_runtime import block_manager as current_block_manager  # noqa: E402

BLOCK_SIZE = 16
ROWS = 256  # a decode step's rows for "grow" (default)


def old_block_manager(revision: str) -> types.ModuleType:
    """``revision``'s block manager, importing that revision's prefix cache (host_step's loader)."""
    from host_step import old_modules  # a sibling script, as when run from bench/

    return old_modules(revision)["block_manager"]


class Lifecycle:
    """One pool and the requests it serves; each method does one timed operation and returns its
    seconds. Two Lifecycles made with the same arguments go through identical states."""

    def __init__(self, module: types.ModuleType, context: int, layers: int, requests: int, seed: int = 0):
        rng = random.Random(seed)
        self.context, self.layers = context, tuple(range(layers))
        blocks_per_request = layers * (-(-(context + 64) // BLOCK_SIZE))
        self.pool = module.BlockManager(max(requests, ROWS) * blocks_per_request + ROWS * layers * 4,
                                        BLOCK_SIZE, prefix_caching=True)
        self.system = [rng.randrange(50_000) for _ in range(context // 2)]  # the shared half of each prompt
        self.prompts = [self.system + [rng.randrange(50_000) for _ in range(context - len(self.system))]
                        for _ in range(requests)]
        self._next = 0
        # A served pool: a wave of other prompts cached and let go of fills it (see host_step_benchmark).
        pool = self.pool
        wave = 0
        while pool.num_free_blocks >= blocks_per_request and wave < 10 * requests:
            tokens = [rng.randrange(50_000) for _ in range(context + 64)]
            pool.allocate(f"w{wave}", layers, len(tokens), self.layers)
            pool.cache_prefix(f"w{wave}", tokens, len(tokens))
            wave += 1
        for i in range(wave):
            pool.free(f"w{i}")
        # The system prompt computed once, cached and let go of: later prompts find it.
        pool.allocate("system", layers, len(self.system) + 1, self.layers)
        pool.cache_prefix("system", self.system + [0], len(self.system))
        pool.free("system")
        self.admitted: list[str] = []

    def admit(self) -> float:
        prompt, rid = self.prompts[self._next], f"r{self._next}"
        self._next += 1
        pool = self.pool
        start = time.perf_counter()
        match = pool.cached_prefix(self.layers, prompt, len(prompt))
        pool.allocate(rid, len(self.layers), len(prompt), self.layers, match)
        pool.cache_prefix(rid, prompt, len(prompt))
        seconds = time.perf_counter() - start
        self.admitted.append(rid)
        return seconds

    def free(self) -> float:
        rid = self.admitted.pop(0)
        start = time.perf_counter()
        self.pool.free(rid)
        return time.perf_counter() - start


class DecodeGrowth:
    """``rows`` rows at contexts spread over a block, in a served pool; grow() times one decode step's
    try_grow_all (one row in BLOCK_SIZE takes a block per layer)."""

    def __init__(self, module: types.ModuleType, context: int, layers: int, steps: int, rows: int = ROWS,
                 seed: int = 0):
        rng = random.Random(seed)
        layer_ids = tuple(range(layers))
        per_row = layers * (-(-(context + steps + BLOCK_SIZE) // BLOCK_SIZE))
        self.pool = pool = module.BlockManager(rows * per_row, BLOCK_SIZE, prefix_caching=True)
        for i in range(rows):  # a wave of cached prompts fills the pool first
            tokens = [rng.randrange(50_000) for _ in range(context + steps + BLOCK_SIZE - 1)]
            pool.allocate(f"w{i}", layers, len(tokens), layer_ids)
            pool.cache_prefix(f"w{i}", tokens, len(tokens))
        for i in range(rows):
            pool.free(f"w{i}")
        self.tokens = {f"r{i}": context - i % BLOCK_SIZE for i in range(rows)}
        for rid, n in self.tokens.items():
            pool.allocate(rid, layers, n, layer_ids)

    def grow(self) -> float:
        growth = []
        for rid in self.tokens:
            self.tokens[rid] += 1
            if self.tokens[rid] > self.pool.capacity(rid):
                growth.append((rid, self.tokens[rid]))
        start = time.perf_counter()
        if not self.pool.try_grow_all(growth):
            raise RuntimeError("the pool ran out of blocks")
        return time.perf_counter() - start


def measure(modules: dict[str, types.ModuleType], context: int, layers: int, requests: int,
            steps: int, rows: int = ROWS) -> dict[str, dict[str, float]]:
    """Median milliseconds of admit, grow and free for each module, operations in turn."""
    cycles = {name: Lifecycle(m, context, layers, requests) for name, m in modules.items()}
    growth = {name: DecodeGrowth(m, context, layers, steps, rows) for name, m in modules.items()}
    times = {name: {"admit": [], "grow": [], "free": []} for name in modules}
    for _ in range(requests):
        for name in modules:
            times[name]["admit"].append(cycles[name].admit())
    for _ in range(steps):
        for name in modules:
            times[name]["grow"].append(growth[name].grow())
    for _ in range(requests):
        for name in modules:
            times[name]["free"].append(cycles[name].free())
    return {name: {op: 1e3 * statistics.median(v) for op, v in ops.items()} for name, ops in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, action="append", help="tokens per request (repeatable; default 1024, 4096)")
    parser.add_argument("--layers", type=int, default=31, help="cache layers per request")
    parser.add_argument("--requests", type=int, default=24, help="requests admitted and freed per context")
    parser.add_argument("--steps", type=int, default=64, help="decode steps grown per context")
    parser.add_argument("--rows", type=int, default=ROWS, help="rows of the decode steps grown")
    parser.add_argument("--baseline", help="git revision whose block manager and prefix cache to time as well")
    args = parser.parse_args()
    modules = {"this checkout": current_block_manager}
    if args.baseline:
        modules = {args.baseline: old_block_manager(args.baseline), **modules}
    print(f"{args.layers} cache layers, block size {BLOCK_SIZE}, {args.requests} requests, "
          f"decode steps of {args.rows} rows; median ms per operation\n")
    print("| code | context | admit (half the prompt cached) | grow (a decode step) | free |")
    print("|---|---|---|---|---|")
    for context in args.context or (1024, 4096):
        for name, ops in measure(modules, context, args.layers, args.requests, args.steps, args.rows).items():
            print(f"| {name} | {context} | {ops['admit']:.3f} | {ops['grow']:.3f} | {ops['free']:.3f} |")


if __name__ == "__main__":
    main()
