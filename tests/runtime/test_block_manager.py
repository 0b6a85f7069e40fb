"""The block manager under thousands of random operations: nothing leaked, nothing shared."""

from __future__ import annotations

import random

import pytest

from balcony_runtime.block_manager import BlockManager, OutOfBlocks


def check_invariants(bm: BlockManager, live: dict[str, tuple[int, int]]) -> None:
    owned = [b for rid in live for table in bm.block_tables(rid) for b in table]
    assert len(owned) == len(set(owned)), "a block is held twice"
    assert len(owned) + bm.num_free_blocks == bm.num_blocks, "a block leaked"
    assert all(0 <= b < bm.num_blocks for b in owned)
    for rid, (layers, tokens) in live.items():
        tables = bm.block_tables(rid)
        assert len(tables) == layers  # blocks only for the layers it runs
        assert all(len(t) == bm.blocks_per_layer(tokens) for t in tables)
        assert bm.capacity(rid) >= tokens


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_allocate_grow_free_abort(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=300, block_size=4)
    live: dict[str, tuple[int, int]] = {}
    refused = 0
    for step in range(5000):
        op = rng.random()
        if op < 0.35:
            rid, layers, tokens = f"r{step}", rng.choice([3, 5, 8, 9]), rng.randint(1, 40)
            if bm.can_allocate(layers, tokens):
                bm.allocate(rid, layers, tokens)
                live[rid] = (layers, tokens)
            else:
                refused += 1
                free_before = bm.num_free_blocks
                with pytest.raises(OutOfBlocks):
                    bm.allocate(rid, layers, tokens)
                assert bm.num_free_blocks == free_before and not bm.has(rid)
        elif op < 0.75 and live:
            rid = rng.choice(sorted(live))
            layers, tokens = live[rid]
            target = tokens + rng.randint(1, 6)
            before = [list(t) for t in bm.block_tables(rid)]
            needed = layers * max(0, -(-target // 4) - len(before[0]))  # new blocks, counted here
            free_before = bm.num_free_blocks
            if needed <= free_before:
                if rng.random() < 0.5:
                    bm.grow(rid, target)
                else:
                    assert bm.try_grow(rid, target)
                assert bm.num_free_blocks == free_before - needed
                live[rid] = (layers, target)
            else:
                with pytest.raises(OutOfBlocks):
                    bm.grow(rid, target)
                assert not bm.try_grow(rid, target)
                assert bm.block_tables(rid) == before and bm.num_free_blocks == free_before
            # Growing never moves blocks a request already holds: its cached tokens stay put.
            assert all(t[: len(b)] == b for t, b in zip(bm.block_tables(rid), before))
        elif live:
            rid = rng.choice(sorted(live))
            bm.free(rid)  # finish or abort: same effect
            del live[rid]
        check_invariants(bm, live)
    assert refused > 0, "the test never exercised running out of blocks"
    for rid in list(live):
        bm.free(rid)
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0


def test_grow_takes_the_lowest_free_blocks_layer_by_layer_and_frees_them_all():
    bm = BlockManager(num_blocks=40, block_size=4)
    bm.allocate("a", 3, 16)  # 4 blocks per layer: 0-3, 4-7, 8-11
    bm.grow("a", 17)  # one more block per layer
    assert bm.block_tables("a") == [[0, 1, 2, 3, 12], [4, 5, 6, 7, 13], [8, 9, 10, 11, 14]]
    bm.grow("a", 28)  # two more per layer
    assert [t[5:] for t in bm.block_tables("a")] == [[15, 16], [17, 18], [19, 20]]
    bm.free("a")
    assert bm.num_free_blocks == 40 and bm.usage == 0.0

def test_double_allocate_and_unknown_free():
    bm = BlockManager(num_blocks=10, block_size=2)
    bm.allocate("a", 2, 3)
    with pytest.raises(ValueError):
        bm.allocate("a", 2, 3)
    bm.free("unknown")  # ignored
    assert bm.num_used_blocks == 4 and bm.usage == pytest.approx(0.4)


def test_shallow_requests_hold_proportionally_fewer_blocks():
    bm = BlockManager(num_blocks=1000, block_size=16)
    bm.allocate("full", 30, 100)
    full = bm.num_used_blocks
    bm.allocate("exit8", 9, 100)  # 8 backbone layers + its balcony
    assert bm.num_used_blocks - full == full * 9 // 30
