"""The eviction queue against an OrderedDict doing the same: the same blocks, in the same order,
under random pushes, removals out of turn and pops (its buffer of entries, as long as the pool, is
refilled from the front many times over)."""

from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import pytest

from balcony_runtime.eviction_queue import EvictionQueue


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_blocks_in_the_same_order_as_an_ordered_dict(seed):
    rng = random.Random(seed)
    num_blocks = 64
    queue, reference = EvictionQueue(num_blocks), OrderedDict()
    for _ in range(3000):
        op = rng.random()
        outside = [b for b in range(num_blocks) if b not in reference]
        if op < 0.4 and outside:
            blocks = rng.sample(outside, rng.randint(1, min(8, len(outside))))
            queue.push(np.array(blocks, dtype=np.int64))
            reference.update(dict.fromkeys(blocks))
        elif op < 0.6 and reference:
            blocks = rng.sample(list(reference), rng.randint(1, min(4, len(reference))))
            queue.remove(np.array(blocks, dtype=np.int64))
            for b in blocks:
                del reference[b]
        elif reference:
            count = rng.randint(1, len(reference))
            expected = list(reference)[:count]
            assert queue.pop_oldest(count).tolist() == expected
            for b in expected:
                del reference[b]
        assert len(queue) == len(reference)
        assert list(queue) == list(reference)
    with pytest.raises(ValueError, match="asked of a queue"):
        queue.pop_oldest(len(reference) + 1)
