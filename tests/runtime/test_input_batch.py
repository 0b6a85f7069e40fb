"""The persistent batch state against block tables built from scratch: requests join, leave, skip
steps, grow and get re-allocated, in random order; only changed rows move."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from balcony_runtime.block_manager import BlockManager
from balcony_runtime.input_batch import InputBatch

FULL, EXITS = 6, (2, 4)  # a 6-layer model with balconies after layers 2 and 4
NUM_CACHE_LAYERS = FULL + len(EXITS)


def cache_layers_of(exit_layer: int) -> list[int]:
    if exit_layer == FULL:
        return list(range(FULL))
    return list(range(exit_layer)) + [FULL + EXITS.index(exit_layer)]


def dense_tables(blocks: BlockManager, ids: list[str], exits: list[int], needed: list[int]) -> torch.Tensor:
    """[C, B, max_blocks] built from nothing: each row's first needed[b] blocks, zeros elsewhere
    (the old runner's way)."""
    out = torch.zeros(NUM_CACHE_LAYERS, len(ids), max(needed), dtype=torch.int32)
    for row, (rid, e, k) in enumerate(zip(ids, exits, needed)):
        tables = [t[:k] for t in blocks.block_tables(rid)]
        out[cache_layers_of(e), row, :k] = torch.tensor(tables, dtype=torch.int32)
    return out


def step(batch: InputBatch, blocks: BlockManager, ids: list[str], exits: list[int],
         needed: dict[str, int] | None = None) -> list[int]:
    """One step's arrangement and block writes; ``needed``: blocks each row reads (default: all it
    holds)."""
    tables = blocks.tables_of(ids)  # block-major, as the runner passes them
    order = batch.arrange(ids, exits, tables)
    each = [len(blocks.block_tables(ids[i])[0]) if needed is None else needed[ids[i]] for i in order]
    width = batch.update_blocks([tables[i] for i in order], np.asarray(each))
    got = batch.view(len(ids), width)
    expected = dense_tables(blocks, [ids[i] for i in order], [exits[i] for i in order], each)
    assert torch.equal(got, expected)
    last = batch.last_blocks(len(ids))
    if last is not None:  # each row's last block read, as the step's table holds it
        at = torch.tensor(each).sub(1).view(1, -1, 1).expand(NUM_CACHE_LAYERS, -1, 1)
        assert torch.equal(last, expected.gather(2, at).squeeze(2))
    else:  # only when a row read fewer blocks than were written for it (never as a context grows)
        assert (batch.written[: len(ids)] != np.asarray(each)).any()
    assert sorted(order) == list(range(len(ids)))
    assert all(exits[order[b]] == exits[b] for b in range(len(ids)))  # each row inside its exit group
    return order


@pytest.mark.parametrize("numpy_writes", [True, False], ids=["numpy-writes", "torch-writes"])
@pytest.mark.parametrize("seed", range(6))
def test_random_lives_match_tables_built_from_scratch(seed, numpy_writes):
    """Both ways of writing new block ids: numpy views (a CPU device) and torch's indexed writes
    (a GPU's, here on CPU tensors)."""
    rng = random.Random(seed)
    blocks = BlockManager(4000, 4)
    batch = InputBatch(cache_layers_of, NUM_CACHE_LAYERS, torch.device("cpu"), rows=2, blocks=2,
                       numpy_writes=numpy_writes)
    live: dict[str, tuple[int, int]] = {}  # id -> (exit, tokens)
    next_id = 0
    for _ in range(60):
        for _ in range(rng.randrange(0, 4)):  # arrivals
            rid, e = f"r{next_id}", rng.choice([FULL, *EXITS])
            next_id += 1
            n = rng.randrange(1, 30)
            blocks.allocate(rid, len(cache_layers_of(e)), n)
            live[rid] = (e, n)
        growth = []
        for rid in list(live):
            luck = rng.random()
            if luck < 0.1:  # finished
                blocks.free(rid)
                batch.remove(rid)
                del live[rid]
            elif luck < 0.15:  # preempted and re-admitted: new tables, fewer blocks
                e, _ = live[rid]
                blocks.free(rid)
                blocks.allocate(rid, len(cache_layers_of(e)), 1)
                live[rid] = (e, 1)
            else:  # decodes (or a prefill chunk)
                e, n = live[rid]
                n += rng.choice([1, 1, 1, 5])
                growth.append((rid, n + rng.choice([0, 0, 3, 9])))  # sometimes ahead of what the step reads
                live[rid] = (e, n)
        if rng.random() < 0.5:  # all together, as the scheduler grows them ...
            assert blocks.try_grow_all(growth)
        else:  # ... or one by one
            for rid, tokens in growth:
                blocks.grow(rid, tokens)
        if not live:
            continue
        running = [r for r in live if rng.random() < 0.8] or list(live)  # some rows skip a step
        running.sort(key=lambda r: -live[r][0])  # deepest first, as the scheduler orders rows
        step(batch, blocks, running, [live[r][0] for r in running], {r: -(-live[r][1] // 4) for r in running})


def test_a_steady_batch_moves_nothing_and_a_leaver_moves_one_row():
    blocks = BlockManager(1000, 4)
    batch = InputBatch(cache_layers_of, NUM_CACHE_LAYERS, torch.device("cpu"))
    ids = [f"r{i}" for i in range(8)]
    exits = [FULL] * 4 + [4] * 4
    for rid, e in zip(ids, exits):
        blocks.allocate(rid, len(cache_layers_of(e)), 10)
    assert step(batch, blocks, ids, exits) == list(range(8))  # new rows land in the scheduler's order
    before = {rid: batch.slot_of[rid] for rid in ids}
    assert step(batch, blocks, ids, exits) == list(range(8))
    blocks.free("r1")
    batch.remove("r1")
    ids, exits = ids[:1] + ids[2:], exits[:1] + exits[2:]
    order = step(batch, blocks, ids, exits)
    moved = [rid for rid in ids if batch.slot_of[rid] != before[rid]]
    # The last full-depth row fills the hole and the last exit-4 row takes the slot it left.
    assert moved == ["r3", "r7"]
    assert [ids[i] for i in order] == ["r0", "r3", "r2", "r7", "r4", "r5", "r6"]


@pytest.mark.parametrize("exit_layer", [FULL, 2], ids=["full", "exit-2"])
def test_decoding_rows_at_one_exit_cross_into_blocks_as_the_tables_say(exit_layer):
    """A decode of rows at one exit, their contexts a token apart, so a few reach a new block each
    step (the broadcast write of _write_crossed), while the tables outgrow their first shape."""
    blocks = BlockManager(4000, 4)
    batch = InputBatch(cache_layers_of, NUM_CACHE_LAYERS, torch.device("cpu"), rows=2, blocks=2)
    ids = [f"r{i}" for i in range(7)]
    tokens = {rid: 1 + i for i, rid in enumerate(ids)}
    for rid in ids:
        blocks.allocate(rid, len(cache_layers_of(exit_layer)), tokens[rid])
    for _ in range(30):
        step(batch, blocks, ids, [exit_layer] * len(ids), {r: -(-tokens[r] // 4) for r in ids})
        for rid in ids:
            tokens[rid] += 1
        assert blocks.try_grow_all([(rid, tokens[rid]) for rid in ids])


@pytest.mark.parametrize("numpy_writes", [True, False], ids=["numpy-writes", "torch-writes"])
@pytest.mark.parametrize("exit_layer", [FULL, 2, None], ids=["full", "exit-2", "mixed"])
def test_blocks_a_steady_plan_took_write_the_tables_update_blocks_finds(exit_layer, numpy_writes):
    """write_grown (the rows a steady plan grew and the blocks it took, written as given) against
    update_blocks on a twin batch (the rows found by comparing counts), step after step while the
    tables outgrow their first shape; rows at one exit, or (None) at every depth, deepest first."""
    blocks = BlockManager(4000, 4)
    twins = [InputBatch(cache_layers_of, NUM_CACHE_LAYERS, torch.device("cpu"), rows=2, blocks=2,
                        numpy_writes=numpy_writes) for _ in range(2)]
    ids = [f"r{i}" for i in range(7)]
    exits = [exit_layer] * len(ids) if exit_layer is not None else [FULL, FULL, 4, 4, 4, 2, 2]
    tokens = {rid: 1 + 3 * i for i, rid in enumerate(ids)}
    for rid, e in zip(ids, exits):
        blocks.allocate(rid, len(cache_layers_of(e)), tokens[rid])
    for batch in twins:  # the run's first step: found by comparing counts
        step(batch, blocks, ids, exits, {r: -(-tokens[r] // 4) for r in ids})
    grown_steps = 0
    for _ in range(30):
        for rid in ids:
            tokens[rid] += 1
        grow = [b for b, rid in enumerate(ids) if blocks.capacity(rid) < tokens[rid]]
        taken = blocks.try_take_for([(ids[b], tokens[ids[b]]) for b in grow])
        assert taken is not None
        grown_steps += bool(grow)
        tables = blocks.tables_of(ids)
        assert twins[0].arrange(ids, exits, tables) == list(range(len(ids)))
        needed = np.array([-(-tokens[r] // 4) for r in ids])
        if exit_layer is not None:
            width = twins[0].write_grown(np.array(grow, dtype=np.int64), taken.reshape(len(grow), -1), exit_layer,
                                         int(needed.max()))
        else:  # each row's ids at its exit's layers in turn
            width = twins[0].write_grown(np.array(grow, dtype=np.int64), taken, None, int(needed.max()),
                                         tuple(exits[b] for b in grow))
        assert width == int(needed.max())
        step(twins[1], blocks, ids, exits, {r: -(-tokens[r] // 4) for r in ids})
        assert torch.equal(twins[0].view(len(ids), width), twins[1].view(len(ids), width))
        assert torch.equal(twins[0].last_blocks(len(ids)), twins[1].last_blocks(len(ids)))
        assert np.array_equal(twins[0].written, twins[1].written)
    assert grown_steps >= 20


def test_blocks_a_plan_took_are_refused_where_a_row_read_fewer_blocks_than_it_has():
    blocks = BlockManager(1000, 4)
    batch = InputBatch(cache_layers_of, NUM_CACHE_LAYERS, torch.device("cpu"))
    blocks.allocate("r0", FULL, 12)
    step(batch, blocks, ["r0"], [FULL], {"r0": 3})
    step(batch, blocks, ["r0"], [FULL], {"r0": 2})  # reads fewer than were written: not exact
    taken = blocks.try_take_for([("r0", 13)])
    assert batch.write_grown(np.array([0]), taken.reshape(1, -1), FULL, 4) is None
    assert batch.written[0] == 3  # nothing written
