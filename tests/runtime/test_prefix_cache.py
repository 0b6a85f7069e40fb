"""The prefix cache: block reference counts under random use, exact prefix matches, and engine
outputs that do not change when prompts are read from the cache instead of computed."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest

from balcony_runtime.block_manager import BlockManager
from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
SYSTEM = ("You are a careful assistant. Answer briefly, cite nothing, and keep every answer under "
          "forty words. The user asks about geography, history and programming. ") * 3


def check_invariants(bm: BlockManager, live: dict[str, list[int]]) -> None:
    held = Counter(b for rid in live for table in bm.block_tables(rid) for b in table)
    assert all(bm._refs[b] == n for b, n in held.items()), "a reference count is off"
    assert sum(bm._refs) == sum(held.values())
    free = set(bm._free[: bm._num_free].tolist()) | set(bm._evictable)
    assert not free & set(held), "a held block is also free"
    assert len(held) + bm.num_free_blocks == bm.num_blocks, "a block leaked"
    assert all(bm.prefix_cache.is_cached(b) for b in bm._evictable)
    for rid in live:
        tables = bm.block_tables(rid)
        assert all(len(set(t)) == len(t) for t in tables)
        # A block shared between requests holds the same tokens for both: a cached prefix.
        for table in tables:
            for b in table:
                if held[b] > 1:
                    assert bm.prefix_cache.is_cached(b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_requests_with_shared_prefixes(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=400, block_size=4, prefix_caching=True)
    heads = [[rng.randrange(5) for _ in range(rng.randint(4, 24))] for _ in range(4)]
    layer_sets = [(0, 1, 2), (0, 1, 2, 7), (0, 1, 2, 3, 4)]
    live: dict[str, list[int]] = {}
    reused = 0
    for step in range(3000):
        op = rng.random()
        if op < 0.4:
            prompt = rng.choice(heads) + [rng.randrange(5) for _ in range(rng.randint(1, 10))]
            layers = rng.choice(layer_sets)
            match = bm.cached_prefix(layers, prompt, len(prompt))
            assert match.num_blocks * 4 < len(prompt)  # the last token is always computed
            for node_blocks in zip(*match.blocks):  # one block per layer
                assert len(set(node_blocks)) == len(layers)
            if bm.can_allocate(len(layers), len(prompt), match):
                rid = f"r{step}"
                bm.allocate(rid, len(layers), len(prompt), layers, match)
                bm.cache_prefix(rid, prompt, len(prompt))  # as if its prefill ran
                live[rid] = prompt
                reused += match.num_blocks
        elif op < 0.55 and live:
            rid = rng.choice(list(live))
            grown = len(live[rid]) + rng.randint(1, 9)
            if bm.try_grow(rid, grown):
                live[rid] = live[rid] + [0] * (grown - len(live[rid]))
        elif live:
            rid = rng.choice(list(live))
            bm.free(rid)
            del live[rid]
        check_invariants(bm, live)
    assert reused > 100  # the workload did share prefixes
    for rid in list(live):
        bm.free(rid)
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0


def test_match_needs_every_layer_and_stops_short_of_the_last_token():
    bm = BlockManager(num_blocks=64, block_size=4, prefix_caching=True)
    prompt = list(range(12))  # three whole blocks
    bm.allocate("a", 2, 12, (0, 1))
    bm.cache_prefix("a", prompt, 12)
    assert bm.cached_prefix((0, 1), prompt, 12).num_blocks == 2  # the third holds the last token
    assert bm.cached_prefix((0, 1), prompt, 13).num_blocks == 3  # a preempted request with an output
    assert bm.cached_prefix((0, 1, 5), prompt, 13).num_blocks == 0  # layer 5 was never computed
    assert bm.cached_prefix((0, 1), [0, 1, 2, 9] + prompt[4:], 13).num_blocks == 0  # differs in block 0
    assert bm.cached_prefix((0, 1), prompt[:4] + [9] + prompt[5:], 13).num_blocks == 1


def test_freed_prefixes_stay_until_their_blocks_are_needed():
    bm = BlockManager(num_blocks=8, block_size=2, prefix_caching=True)
    bm.allocate("a", 1, 8, (0,))  # 4 blocks
    bm.cache_prefix("a", list(range(8)), 8)
    bm.free("a")
    assert bm.num_free_blocks == 8 and len(bm.prefix_cache) == 4
    bm.allocate("b", 1, 8, (0,))  # the 4 plain free blocks first: the cache survives
    assert len(bm.prefix_cache) == 4
    bm.allocate("c", 1, 4, (0,))  # then cached ones, a prefix's tail first (its head is likelier shared)
    assert len(bm.prefix_cache) == 2
    match = bm.cached_prefix((0,), list(range(8)), 9)
    assert match.num_blocks == 2 and match.blocks == [[0, 1]]


def test_eviction_takes_a_prefix_tail_in_every_layer_and_keeps_its_head_matchable():
    bm = BlockManager(num_blocks=12, block_size=2, prefix_caching=True)
    prompt = list(range(8))  # four whole blocks in each of three layers: the whole pool
    bm.allocate("a", 3, 8, (0, 1, 2))
    bm.cache_prefix("a", prompt, 8)
    tail = [table[3] for table in bm.block_tables("a")]
    bm.free("a")
    assert bm.cached_prefix((0, 1, 2), prompt, 9).num_blocks == 4
    bm.allocate("b", 3, 2, (0, 1, 2))  # one block per layer: the last block's three copies go
    assert sorted(b for table in bm.block_tables("b") for b in table) == sorted(tail)
    assert bm.cached_prefix((0, 1, 2), prompt, 9).num_blocks == 3
    bm.allocate("c", 1, 4, (0,))  # two more: the third block's copies of layers 0 and 1
    assert bm.cached_prefix((0, 1, 2), prompt, 9).num_blocks == 2


def test_layers_of_one_node_are_told_apart_and_out_of_range_layers_refused():
    from balcony_runtime.prefix_cache import PrefixCache

    cache = PrefixCache(block_size=2, num_blocks=100)
    node = cache.node(cache.root(), (1, 2))
    assert cache.register([node], (0, 1), [[10, 11]]) == 2
    assert cache.register([node], (1, 4095), [[99, 12]]) == 1  # layer 1's copy is known: only 4095's is new
    assert not cache.is_cached(99) and len(cache) == 3
    assert cache.match((0, 1, 4095), [1, 2, 3], 1).blocks == [[10], [11], [12]]
    cache.forget([11])
    assert cache.match((0, 1), [1, 2, 3], 1).num_blocks == 0 and cache.match((0,), [1, 2, 3], 1).blocks == [[10]]
    with pytest.raises(ValueError, match="out of range"):
        cache.register([node], (3, 4096), [[13, 14]])
    assert not cache.is_cached(13)


def test_forgetting_runs_of_several_nodes_in_any_order():
    """forget() settles a node's count once per run of its blocks: runs of two nodes interleaved,
    a node emptied in two calls, and a node emptied leaving the trie while its sibling stays."""
    from balcony_runtime.prefix_cache import PrefixCache

    cache = PrefixCache(block_size=2, num_blocks=20)
    first = cache.node(cache.root(), (1, 2))
    second = cache.node(first, (3, 4))
    other = cache.node(cache.root(), (5, 6))
    for node, blocks in ((first, (0, 1, 2)), (second, (3, 4, 5)), (other, (6, 7, 8))):
        assert cache.register([node], tuple(range(len(blocks))), [list(blocks)]) == len(blocks)
    assert len(cache) == 9
    cache.forget([5, 8, 4, 7])  # second's layers 2, 1 and other's 2, 1, interleaved
    assert len(cache) == 5 and not any(cache.is_cached(b) for b in (4, 5, 7, 8))
    assert cache.match((0,), [1, 2, 3, 4, 9], 2).blocks == [[0, 3]]
    assert cache.match((0, 1), [1, 2, 3, 4, 9], 2).blocks == [[0], [1]]
    cache.forget([3])  # second's last block: it leaves the trie
    assert cache.node(first, (3, 4)) != second
    assert cache.match((0,), [5, 6, 9], 1).blocks == [[6]]
    cache.forget([6, 2, 1, 0])
    assert len(cache) == 0 and cache.match((0,), [1, 2, 9], 1).num_blocks == 0
    assert cache.node(cache.root(), (1, 2)) not in (first, second, other)


def _run(engine: LLMEngine, prompts: list[str], stagger: int) -> list:
    """Add the first prompt, step ``stagger`` times, then add the rest; run to the end."""
    ids = [engine.add_request(prompts[0], GREEDY)]
    for _ in range(stagger):
        engine.step()
    ids += [engine.add_request(p, GREEDY) for p in prompts[1:]]
    out = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].append(o)
    return [out[rid] for rid in ids]


def _tokens_and_logprobs(outputs):
    tokens = [t for o in outputs for t in o.new_token_ids]
    logprobs = [lp.logprob for o in outputs for lp in o.new_logprobs]
    return tokens, logprobs


@pytest.mark.parametrize("token_budget, stagger", [(512, 3), (40, 2)], ids=["whole-prompts", "chunked"])
def test_shared_system_prompt_reads_the_cache_and_changes_nothing(tiny_model, token_budget, stagger):
    """Chunked: the first prompt is still being prefilled when the others arrive, so they may read
    only the blocks its finished chunks computed."""
    prompts = [SYSTEM + q for q in ("Where is Lima?", "Who built Rome?", "What is a list?", "Where is Lima?")]
    config = EngineConfig(num_kv_blocks=2048, max_num_batched_tokens=token_budget)
    plain = _run(LLMEngine(tiny_model, dataclasses.replace(config, prefix_caching=False)), prompts, stagger)
    engine = LLMEngine(tiny_model, config)
    cached = _run(engine, prompts, stagger)
    assert [o[-1].num_cached_tokens > 0 for o in cached] == [False, True, True, True]
    assert all(o[-1].num_cached_tokens == 0 for o in plain)
    for a, b in zip(plain, cached):
        ta, la = _tokens_and_logprobs(a)
        tb, lb = _tokens_and_logprobs(b)
        assert ta == tb
        assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4
    assert engine.blocks.num_used_blocks == 0


def test_later_requests_skip_the_cached_prompt(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=2048))
    first = engine.add_request(SYSTEM + "Where is Lima?", GREEDY)
    engine.step()  # its whole prompt fits one step
    second = engine.add_request(SYSTEM + "Who built Rome?", GREEDY)
    request = engine._tracked[second].request
    plan = engine.scheduler.schedule(0.0)
    item = next(s for s in plan.scheduled if s.request is request)
    a, b = engine._tracked[first].request.prompt_token_ids, request.prompt_token_ids
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert item.start == common // 16 * 16 >= 64 and request.num_cached_tokens == item.start
    tables = engine.blocks.block_tables(second)
    assert tables[0][: item.start // 16] == engine.blocks.block_tables(first)[0][: item.start // 16]


def test_choices_of_one_prompt_wait_for_the_first_and_share_its_blocks(tiny_model):
    prompt = SYSTEM + "Name three rivers."
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=2048))
    leader = engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=0))
    siblings = [engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=s),
                                   prefix_leader=leader) for s in (1, 2)]
    first = engine.scheduler.schedule(0.0)
    assert [s.request.request_id for s in first.scheduled] == [leader]  # the others wait for its prompt
    engine.scheduler.on_step_done(first)
    engine._tracked[leader].request.output_token_ids.append(7)  # the token its prompt step sampled
    second = engine.scheduler.schedule(0.0)
    assert {s.request.request_id for s in second.scheduled} == {leader, *siblings}
    prompt_len = engine._tracked[leader].request.num_prompt_tokens
    for s in second.scheduled:
        if s.request.request_id in siblings:
            assert s.num_tokens <= 16 and s.start == (prompt_len - 1) // 16 * 16
    engine.scheduler.on_step_done(second)


def test_seeded_choices_equal_separate_requests(tiny_model):
    prompt = SYSTEM + "Name three rivers."
    plain = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=2048, prefix_caching=False))
    expected = [plain.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, seed=s))[0].token_ids
                for s in range(3)]
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=2048))
    leader = engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=0))
    ids = [leader] + [engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=s),
                                         prefix_leader=leader) for s in (1, 2)]
    tokens = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
    assert [tokens[rid] for rid in ids] == expected
    assert engine.blocks.num_used_blocks == 0


def test_prompt_logprobs_requests_compute_their_whole_prompt(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=2048))
    engine.generate([SYSTEM + "Where is Lima?"], GREEDY)
    rid = engine.add_request(SYSTEM + "Where is Lima?", SamplingParams(max_tokens=1, prompt_logprobs=1))
    plan = engine.scheduler.schedule(0.0)
    assert plan.scheduled[0].start == 0 and engine._tracked[rid].request.num_cached_tokens == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_growing_rows_together_takes_what_growing_each_in_turn_takes(seed):
    """try_grow_all against try_grow on each row in turn, on twin pools that have served cached
    prefixes (so growth evicts): the same tables, the same cache left, the same refusals."""
    rng = random.Random(seed)
    # Evicting exactly what each take needs: with a batch evicted ahead, the takes of rows in turn
    # and of all together end their batches at other blocks (test_block_pool_reference checks that
    # rule against its one-take-per-growth reference).
    twins = [BlockManager(num_blocks=240, block_size=4, prefix_caching=True, evict_ahead=0) for _ in range(2)]
    layer_sets = [(0, 1, 2), (0, 1, 2, 7), (0, 1, 2, 3, 4)]
    live: dict[str, int] = {}  # request id -> tokens
    evicted = refused = 0
    for step in range(1500):
        op = rng.random()
        if op < 0.3:
            prompt = [rng.randrange(3) for _ in range(rng.randint(4, 30))]
            layers = rng.choice(layer_sets)
            matches = [bm.cached_prefix(layers, prompt, len(prompt)) for bm in twins]
            if twins[0].can_allocate(len(layers), len(prompt), matches[0]):
                for bm, match in zip(twins, matches):
                    bm.allocate(f"r{step}", len(layers), len(prompt), layers, match)
                    bm.cache_prefix(f"r{step}", prompt, len(prompt))
                live[f"r{step}"] = len(prompt)
        elif op < 0.7 and live:
            growth = [(rid, live[rid] + rng.randint(0, 9)) for rid in rng.sample(sorted(live), min(len(live), 6))]
            cached_before = len(twins[0].prefix_cache)
            one_by_one = [twins[0].try_grow(rid, tokens) for rid, tokens in growth]
            if all(one_by_one):
                assert twins[1].try_grow_all(growth)
                live.update(growth)
                evicted += cached_before - len(twins[0].prefix_cache)
            else:  # refused untouched; then row by row, as the scheduler falls back to
                free_before = twins[1].num_free_blocks
                assert not twins[1].try_grow_all(growth)
                assert twins[1].num_free_blocks == free_before
                assert [twins[1].try_grow(rid, tokens) for rid, tokens in growth] == one_by_one
                refused += 1
                for rid, _ in growth:  # and the rows let go (as preempted)
                    for bm in twins:
                        bm.free(rid)
                    del live[rid]
        elif live:
            rid = rng.choice(sorted(live))
            for bm in twins:
                bm.free(rid)
            del live[rid]
        for rid in live:
            assert twins[0].block_tables(rid) == twins[1].block_tables(rid)
            assert twins[0].capacity(rid) == twins[1].capacity(rid)
        assert twins[0].num_free_blocks == twins[1].num_free_blocks
        assert len(twins[0].prefix_cache) == len(twins[1].prefix_cache)
    assert evicted > 50 and refused > 5  # growth did evict cached prefixes, and did run out
