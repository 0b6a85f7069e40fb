"""bench/block_lifecycle.py: this checkout's pool and an older revision's go through the same
operations and end in the same state."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0,
                    reason="needs the repository's git history")
def test_both_pools_admit_grow_and_free_alike(bench_script):
    with bench_script("block_lifecycle") as lifecycle:
        modules = {"HEAD": lifecycle.old_block_manager("HEAD"), "now": lifecycle.current_block_manager}
        cycles = {name: lifecycle.Lifecycle(m, context=96, layers=3, requests=4) for name, m in modules.items()}
        growth = {name: lifecycle.DecodeGrowth(m, context=40, layers=3, steps=20, rows=8) for name, m in modules.items()}
        for _ in range(4):
            for name in modules:
                assert cycles[name].admit() > 0
        # Same blocks in the same tables, from pools that evict cached prefixes to give them.
        assert [cycles["HEAD"].pool.block_tables(r) for r in cycles["HEAD"].admitted] == \
               [cycles["now"].pool.block_tables(r) for r in cycles["now"].admitted]
        for _ in range(20):
            for name in modules:
                growth[name].grow()
        assert all(growth["HEAD"].pool.block_tables(r) == growth["now"].pool.block_tables(r) for r in growth["now"].tokens)
        for _ in range(4):
            for name in modules:
                cycles[name].free()
        assert cycles["HEAD"].pool.num_free_blocks == cycles["now"].pool.num_free_blocks
        assert list(cycles["HEAD"].pool._evictable) == list(cycles["now"].pool._evictable)
        result = lifecycle.measure({"now": lifecycle.current_block_manager}, context=64, layers=2, requests=2,
                                   steps=4, rows=4)
        assert set(result["now"]) == {"admit", "grow", "free"} and all(ms > 0 for ms in result["now"].values())
