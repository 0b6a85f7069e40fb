"""The CPU decode path (kernels/cpu_decode.py) against the references it replaces:
reference.rotary_and_cache then reference.decode_attention, on the same paged caches."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_decode, reference

HQ, HK, D, BLOCK, NUM_BLOCKS, MAX_POS = 6, 2, 16, 4, 64, 256


def _setup(context_lens: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    rows = len(context_lens)
    k_cache = torch.randn(NUM_BLOCKS, BLOCK, HK, D, generator=g)
    v_cache = torch.randn(NUM_BLOCKS, BLOCK, HK, D, generator=g)
    width = -(-max(context_lens) // BLOCK) + 2  # wider than needed, as the runner's tables are
    # each row its own distinct blocks, in a shuffled order
    blocks = torch.randperm(NUM_BLOCKS, generator=g)[: rows * width].view(rows, width).to(torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    positions = (lens - 1).long()  # the new token is the last of each context
    slots = blocks.long().gather(1, (positions // BLOCK)[:, None]).squeeze(1) * BLOCK + positions % BLOCK
    angles = torch.outer(torch.arange(MAX_POS, dtype=torch.float32), torch.rand(D // 2, generator=g))
    q = torch.randn(rows, HQ, D, generator=g)
    k = torch.randn(rows, HK, D, generator=g)
    v = torch.randn(rows, HK, D, generator=g)
    return dict(q=q, k=k, v=v, cos=angles.cos(), sin=angles.sin(), positions=positions, lens=lens,
                slots=slots, blocks=blocks, k_cache=k_cache, v_cache=v_cache)


def _reference(s):
    k_cache, v_cache = s["k_cache"].clone(), s["v_cache"].clone()
    q, _ = reference.rotary_and_cache(s["q"], s["k"], s["v"], s["cos"], s["sin"], s["positions"],
                                      k_cache, v_cache, s["slots"])
    out = reference.decode_attention(q, k_cache, v_cache, s["blocks"], s["lens"], 0.25)
    return out, k_cache, v_cache


@pytest.mark.parametrize("context_lens", [[1], [13], [16], [5, 9, 33, 16, 1], [40, 40]])
def test_attend_matches_rotary_then_reference_attention(context_lens):
    s = _setup(context_lens, seed=len(context_lens) + context_lens[0])
    ref_out, ref_k, ref_v = _reference(s)
    k_cache, v_cache = s["k_cache"].clone(), s["v_cache"].clone()
    tables = cpu_decode.decode_tables(s["cos"], s["sin"], s["positions"], s["lens"], max(context_lens),
                                      k_cache, v_cache)
    out = cpu_decode.attend(s["q"], s["k"], s["v"], tables, s["slots"], s["blocks"], 0.25)
    torch.testing.assert_close(k_cache, ref_k)  # rotated keys and values land where the reference puts them
    torch.testing.assert_close(v_cache, ref_v)
    torch.testing.assert_close(out, ref_out)


def test_a_subset_of_rows_reads_its_own_tables():
    """A balcony's rows are the batch's last ones: their slice of the step's tables must give what
    the reference gives for those rows alone."""
    context_lens = [30, 7, 12, 3]
    s = _setup(context_lens, seed=7)
    k_cache, v_cache = s["k_cache"].clone(), s["v_cache"].clone()
    tables = cpu_decode.decode_tables(s["cos"], s["sin"], s["positions"], s["lens"], 30, k_cache, v_cache)
    part = {key: (value[2:] if key in ("q", "k", "v", "positions", "lens", "slots", "blocks") else value)
            for key, value in s.items()}
    ref_out, _, _ = _reference(part)
    out = cpu_decode.attend(part["q"], part["k"], part["v"], tables.rows(2, 4), part["slots"], part["blocks"], 0.25)
    torch.testing.assert_close(out, ref_out)
    assert tables.rows(0, 4) is tables


def test_tables_have_no_mask_for_one_row_and_hide_padding_otherwise():
    s = _setup([9], seed=3)
    one = cpu_decode.decode_tables(s["cos"], s["sin"], s["positions"], s["lens"], 9, s["k_cache"], s["v_cache"])
    assert one.valid is None and one.max_len == 9 and one.num_blocks == 3
    s = _setup([9, 2], seed=4)
    two = cpu_decode.decode_tables(s["cos"], s["sin"], s["positions"], s["lens"], 9, s["k_cache"], s["v_cache"])
    assert two.max_len == 12 and two.valid.shape == (2, 1, 1, 12)
    assert two.valid[0].sum() == 9 and two.valid[1].sum() == 2
