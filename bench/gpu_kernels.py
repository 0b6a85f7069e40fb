"""Check every Triton kernel against its torch reference at real sizes on a GPU, and time both.

One call does it all (issue 5): each kernel at the default model's shapes (SmolLM2-135M: H=576,
I=1536, 9/3 heads, D=64) and LLaMA-3-8B's (H=4096, I=14336, 32/8 heads, D=128), batches 1 to 256,
contexts to 8k; correctness as ||out - ref|| / ||ref|| (bf16 < 1e-2, plus an fp32 pass < 1e-5);
times as the median of ``triton.testing.do_bench`` (L2 flushed before each run); achieved GB/s or
TFLOP/s against ceilings measured on the same device (a 1 GiB device-to-device copy, a bf16
8192^3 cuBLAS matmul). Prints a markdown table and the issue's goals, and writes both to --out.
decode_attention is also timed at 1-16 sequence splits (batches 1, 64, 256 at 2,048 tokens), and
for the default model at batch 64 at 27 tiles and launches (32-128 tokens a tile, 1-4 warps, 1-3
pipeline stages), and rms_norm at 1-8 rows per program and 1-8 warps (64 and 4,096 rows), each with the
launcher's own choice against the fastest, so those settings are chosen from measurements.
Needs torch, triton and numpy only: no network, no transformers.

    python bench/gpu_kernels.py --out docs/gpu_kernels_h200.md     # about 2-3 minutes on an H200
    python bench/gpu_kernels.py --quick --only decode_attention,swiglu
    TRITON_INTERPRET=1 python bench/gpu_kernels.py --smoke          # tiny shapes on CPU: tests this script

Exit status: 0 when every correctness check passed (goals are reported, not enforced), 1 when one
failed, 0 with a message on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
KERNELS = ("rms_norm", "rotary_and_cache", "decode_attention", "prefill_attention", "swiglu")
BLOCK_SIZE = 16  # KV cache block size, as the runtime's default
REFERENCE_TOKEN_LIMIT = 1 << 19  # time the torch decode path only below this many cached tokens


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int  # H
    inter: int  # I, the MLP width
    q_heads: int
    kv_heads: int
    head_dim: int


DEFAULT_MODEL = ModelShape("SmolLM2-135M", 576, 1536, 9, 3, 64)
LLAMA3_8B = ModelShape("LLaMA-3-8B", 4096, 14336, 32, 8, 128)
TINY = ModelShape("tiny (smoke)", 96, 200, 6, 2, 64)


@dataclass
class Row:
    kernel: str
    model: str
    shape: str
    dtype: torch.dtype
    rel_err: float | None  # ||out - ref|| / ||ref||; None when not checked
    triton_ms: float | None = None
    torch_ms: float | None = None  # the torch path (the reference) on the same inputs
    unit: str = ""  # "GB/s" or "TFLOP/s"
    achieved: float | None = None
    ceiling: float | None = None  # measured ceiling in the same unit
    cublas_ms: float | None = None  # swiglu only: cuBLAS for the same two GEMMs, no epilogue
    # A device-to-device copy moving the same bytes (read + write): what any kernel of this size
    # can at best approach, launch included. Beside the 1 GiB copy's bandwidth, which a kernel
    # moving a fraction of a megabyte cannot reach (its launch alone outlasts the transfer).
    copy_ms: float | None = None
    note: str = ""
    key: tuple = ()  # what the goals select rows by: (kernel, model, batch, ...)
    # A whole step: the torch path's error in the same dtype against the same fp32 reference (a
    # step compounds every kernel's rounding, so the Triton path is judged against it).
    baseline_err: float | None = None

    @property
    def ok(self) -> bool:
        if self.rel_err is None:
            return False
        if self.baseline_err is not None and self.rel_err <= 1.25 * self.baseline_err:
            return True  # no worse than the torch path in the same dtype
        return self.rel_err < TOLERANCE[self.dtype]


class Bench:
    """Times callables and holds the device's measured ceilings."""

    def __init__(self, device: torch.device, smoke: bool, warmup_ms: int, rep_ms: int):
        self.device, self.smoke, self.warmup_ms, self.rep_ms = device, smoke, warmup_ms, rep_ms
        self._copy_ms: dict[int, float] = {}  # bytes copied -> ms (same_size_copy_ms)
        self.copy_gbs = self._copy_bandwidth()
        self.matmul_tflops = self._matmul_tflops()

    def time_ms(self, fn: Callable[[], object]) -> float:
        if self.smoke:  # the interpreter has no driver for do_bench; one run proves the path works
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        from triton.testing import do_bench

        try:
            return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        except TypeError:  # older triton: no return_mode
            return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.5])[0])

    def bandwidth(self, row: Row, moved: int) -> None:
        """A memory-bound row: achieved GB/s for ``moved`` bytes against the 1 GiB copy's, and the
        time of a copy moving the same bytes."""
        row.unit, row.achieved, row.ceiling = "GB/s", moved / row.triton_ms / 1e6, self.copy_gbs
        row.copy_ms = self.same_size_copy_ms(moved)

    def same_size_copy_ms(self, moved: int) -> float:
        """Milliseconds of a device-to-device copy that reads and writes ``moved`` bytes in all."""
        half = max(1, moved // 2)
        if half not in self._copy_ms:
            src = torch.empty(half, dtype=torch.uint8, device=self.device).random_(0, 255)
            dst = torch.empty_like(src)
            self._copy_ms[half] = self.time_ms(lambda: dst.copy_(src))
        return self._copy_ms[half]

    def _copy_bandwidth(self) -> float:
        """GB/s of a device-to-device copy of 1 GiB (read + write counted), far above L2's size."""
        n = (1 << 20) if self.smoke else (1 << 30)
        src = torch.empty(n, dtype=torch.uint8, device=self.device).random_(0, 255)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src))
        return 2 * n / ms / 1e6

    def _matmul_tflops(self) -> float:
        """TFLOP/s of cuBLAS on a bf16 8192^3 matmul, the tensor cores' practical ceiling."""
        n = 64 if self.smoke else 8192
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        ms = self.time_ms(lambda: a @ b)
        return 2 * n**3 / ms / 1e9


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _randn(*shape, dtype, device, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * scale).to(dtype)


# ---- kernels --------------------------------------------------------------------------------


def _rms_norm_inputs(m: ModelShape, tokens: int, dtype, device):
    """x [T, H], residual [T, H], weight [H], and the bytes a fused call moves (x, r in; out, r out; w)."""
    x = _randn(tokens, m.hidden, dtype=dtype, device=device)
    residual = _randn(tokens, m.hidden, dtype=dtype, device=device)
    weight = _randn(m.hidden, dtype=dtype, device=device)
    return x, residual, weight, (4 * tokens * m.hidden + m.hidden) * x.element_size()


def rms_norm_rows(bench: Bench, models, token_counts, dtype) -> list[Row]:
    from kernels import reference
    from kernels.rms_norm import rms_norm

    rows = []
    for m in models:
        for tokens in token_counts:
            x, residual, weight, moved = _rms_norm_inputs(m, tokens, dtype, bench.device)
            out, new_residual = rms_norm(x, weight, 1e-5, residual)
            ref_out, ref_residual = reference.rms_norm(x, weight, 1e-5, residual)
            err = max(rel_err(out, ref_out), rel_err(new_residual, ref_residual))
            row = Row("rms_norm", m.name, f"T={tokens} H={m.hidden} +residual", dtype, err,
                      key=("rms_norm", m.name, tokens))
            row.triton_ms = bench.time_ms(lambda: rms_norm(x, weight, 1e-5, residual))
            row.torch_ms = bench.time_ms(lambda: reference.rms_norm(x, weight, 1e-5, residual))
            bench.bandwidth(row, moved)
            rows.append(row)
    return rows


def rms_norm_tile_rows(bench: Bench, models, token_counts, dtype, per_program=(1, 2, 4, 8),
                       warps=(1, 2, 4, 8)) -> list[Row]:
    """rms_norm with 1 to 8 rows normalised per program, at the launcher's warps and, for the first
    model (the default one, whose short rows H=576 are below the goal), at 1-8 warps too; the
    launcher's default (one row, its warps) marked: what short rows want is read off these rows."""
    import triton

    from kernels import reference
    from kernels.rms_norm import default_num_warps, rms_norm

    rows = []
    for i, m in enumerate(models):
        default = {n: default_num_warps(n, triton.next_power_of_2(m.hidden)) for n in per_program}
        for tokens in token_counts:
            x, residual, weight, moved = _rms_norm_inputs(m, tokens, dtype, bench.device)
            ref_out, ref_residual = reference.rms_norm(x, weight, 1e-5, residual)
            for n in per_program:
                for w in sorted({default[n], *(warps if i == 0 else ())}):
                    out, new_residual = rms_norm(x, weight, 1e-5, residual, rows_per_program=n, num_warps=w)
                    err = max(rel_err(out, ref_out), rel_err(new_residual, ref_residual))
                    row = Row("rms_norm", m.name, f"T={tokens} H={m.hidden} rows/program={n} warps={w}", dtype, err,
                              key=("rms_norm rows", m.name, tokens, f"{n}/{w}"),
                              note="the launcher's default" if n == 1 and w == default[1] else "")
                    row.triton_ms = bench.time_ms(
                        lambda: rms_norm(x, weight, 1e-5, residual, rows_per_program=n, num_warps=w))
                    bench.bandwidth(row, moved)
                    rows.append(row)
    return rows


def _rope_tables(max_positions: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 500000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)  # [D/2]
    angles = torch.arange(max_positions, device=device).float()[:, None] * inv_freq  # [P, D/2]
    return angles.cos(), angles.sin()


def rotary_rows(bench: Bench, models, token_counts, dtype) -> list[Row]:
    from kernels import reference
    from kernels.rotary_cache import rotary_and_cache

    rows = []
    for m in models:
        for tokens in token_counts:
            dev = bench.device
            width = (m.q_heads + 2 * m.kv_heads) * m.head_dim
            qkv = _randn(tokens, width, dtype=dtype, device=dev)  # [T, (Hq + 2Hk) D], the model's layout
            q, k, v = qkv.split([m.q_heads * m.head_dim, m.kv_heads * m.head_dim, m.kv_heads * m.head_dim], -1)
            q, k, v = (t.view(tokens, -1, m.head_dim) for t in (q, k, v))
            cos, sin = _rope_tables(8192, m.head_dim, dev)
            positions = torch.randint(0, 8192, (tokens,), device=dev)
            num_blocks = -(-tokens // BLOCK_SIZE) + 1
            slots = torch.randperm(num_blocks * BLOCK_SIZE, device=dev)[:tokens]  # [T]
            caches = [torch.zeros(num_blocks, BLOCK_SIZE, m.kv_heads, m.head_dim, dtype=dtype, device=dev)
                      for _ in range(4)]
            args = (q, k, v, cos, sin, positions)
            q_rot, k_rot = rotary_and_cache(*args, caches[0], caches[1], slots)
            ref_q, ref_k = reference.rotary_and_cache(*args, caches[2], caches[3], slots)
            err = max(rel_err(q_rot, ref_q), rel_err(k_rot, ref_k), rel_err(caches[0], caches[2]),
                      rel_err(caches[1], caches[3]))
            row = Row("rotary_and_cache", m.name, f"T={tokens}", dtype, err, key=("rotary", m.name, tokens))
            row.triton_ms = bench.time_ms(lambda: rotary_and_cache(*args, caches[0], caches[1], slots))
            row.torch_ms = bench.time_ms(lambda: reference.rotary_and_cache(*args, caches[2], caches[3], slots))
            # in: q, k, v; out: q, k, cached k and v; plus a cos/sin row, position and slot per token
            moved = tokens * m.head_dim * x_size(dtype) * (2 * m.q_heads + 5 * m.kv_heads)
            moved += tokens * (4 * m.head_dim + 16)
            bench.bandwidth(row, moved)
            rows.append(row)
    return rows


def x_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _paged_cache(m: ModelShape, context_lens: list[int], dtype, device):
    """K and V pools holding each row's context in blocks scattered through the pool."""
    blocks_per_row = [-(-n // BLOCK_SIZE) for n in context_lens]
    width = max(blocks_per_row)
    num_blocks = sum(blocks_per_row) + 1
    k_cache = _randn(num_blocks, BLOCK_SIZE, m.kv_heads, m.head_dim, dtype=dtype, device=device)
    v_cache = _randn(num_blocks, BLOCK_SIZE, m.kv_heads, m.head_dim, dtype=dtype, device=device)
    order = torch.randperm(num_blocks, device=device)
    block_tables = torch.zeros(len(context_lens), width, dtype=torch.int32, device=device)
    start = 0
    for b, n in enumerate(blocks_per_row):
        block_tables[b, :n] = order[start : start + n]
        start += n
    return k_cache, v_cache, block_tables


def _decode_inputs(m: ModelShape, lens: list[int], dtype, device):
    """decode_attention's arguments for rows at contexts ``lens`` (q, the paged K/V pools, block
    tables, context lengths, scale), the reference's output for the first rows (at most 16: rows
    are independent, and the reference's gather stays small), and the bytes a call moves."""
    from kernels import reference

    k_cache, v_cache, block_tables = _paged_cache(m, lens, dtype, device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    q = _randn(len(lens), m.q_heads, m.head_dim, dtype=dtype, device=device)
    args = (q, k_cache, v_cache, block_tables, ctx, m.head_dim**-0.5)
    n = min(len(lens), 16)
    ref = reference.decode_attention(q[:n], k_cache, v_cache, block_tables[:n], ctx[:n], args[-1])
    moved = (2 * sum(lens) * m.kv_heads + 2 * len(lens) * m.q_heads) * m.head_dim * x_size(dtype)
    return args, ref, moved


def decode_rows(bench: Bench, models, batches, contexts, dtype, ragged: bool = True) -> list[Row]:
    from kernels import reference
    from kernels.decode_attention import decode_attention

    rows = []
    for m in models:
        cases = [(b, [c] * b, f"B={b} ctx={c}") for b in batches for c in contexts]
        if ragged:
            b, top = max(batches), max(contexts)
            lens = torch.randint(1, top + 1, (b,)).tolist()
            cases.append((b, lens, f"B={b} ctx=ragged 1..{top}"))
        for batch, lens, label in cases:
            args, ref, moved = _decode_inputs(m, lens, dtype, bench.device)
            out = decode_attention(*args)
            uniform = len(set(lens)) == 1
            row = Row("decode_attention", m.name, label, dtype, rel_err(out[:len(ref)], ref),
                      key=("decode", m.name, batch, lens[0] if uniform else "ragged"))
            row.triton_ms = bench.time_ms(lambda: decode_attention(*args))
            if sum(lens) <= REFERENCE_TOKEN_LIMIT:
                row.torch_ms = bench.time_ms(lambda: reference.decode_attention(*args))
            else:
                row.note = "torch path not timed (its gather would copy the whole cache)"
            bench.bandwidth(row, moved)
            rows.append(row)
            del args, out
            _free(bench)
    return rows


def decode_split_rows(bench: Bench, models, batches, context: int, dtype, splits=(1, 2, 4, 8, 16)) -> list[Row]:
    """decode_attention at each number of sequence splits, the launcher's own choice marked: what
    its policy (kernels/decode_attention._choose_num_splits) should be is read off these rows, not
    guessed."""
    rows = []
    for m in models:
        for batch in batches:
            inputs = _decode_inputs(m, [context] * batch, dtype, bench.device)
            chosen = _launcher_splits(bench, m, inputs[0])
            for num_splits in sorted({*splits, chosen}):
                rows.append(_decode_setting_row(bench, m, batch, context, dtype, inputs, "decode splits", num_splits,
                                                f"splits={num_splits}", {"num_splits": num_splits},
                                                num_splits == chosen))
            del inputs
            _free(bench)
    return rows


DECODE_TILES = [(n, w, s) for n in (32, 64, 128) for w in (1, 2, 4) for s in (1, 2, 3)]
DEFAULT_DECODE_TILE = (64, 4, 2)  # decode_attention's defaults: block_n, num_warps, num_stages


def decode_tile_rows(bench: Bench, models, batch: int, context: int, dtype, tiles=DECODE_TILES) -> list[Row]:
    """decode_attention at the launcher's split with each tile size and launch (tokens a tile, warps,
    pipeline stages), its defaults marked: the kernel below 70% of copy bandwidth at the default
    model's batch 64 gets its settings from these rows."""
    rows = []
    for m in models:
        inputs = _decode_inputs(m, [context] * batch, dtype, bench.device)
        splits = _launcher_splits(bench, m, inputs[0])
        for block_n, warps, stages in sorted({*tiles, DEFAULT_DECODE_TILE}):
            tile = f"n{block_n}/w{warps}/s{stages}"
            knobs = {"num_splits": splits, "block_n": block_n, "num_warps": warps, "num_stages": stages}
            rows.append(_decode_setting_row(bench, m, batch, context, dtype, inputs, "decode tile", tile,
                                            f"splits={splits} {tile}", knobs,
                                            (block_n, warps, stages) == DEFAULT_DECODE_TILE))
        del inputs
        _free(bench)
    return rows


def _launcher_splits(bench: Bench, m, args) -> int:
    """The sequence splits decode_attention chooses by itself for these inputs."""
    from kernels import launch
    from kernels.decode_attention import _choose_num_splits

    return _choose_num_splits(len(args[0]) * m.kv_heads, args[3].shape[1] * BLOCK_SIZE, launch.sm_count(bench.device))


def _decode_setting_row(bench: Bench, m, batch: int, context: int, dtype, inputs, tag: str, setting, label: str,
                        knobs: dict, launchers: bool) -> Row:
    """decode_attention at one setting (``knobs``), checked against the reference and timed; keyed
    (tag, model, batch, setting) for setting_summary, the launcher's own setting marked."""
    from kernels.decode_attention import decode_attention

    args, ref, moved = inputs
    out = decode_attention(*args, **knobs)
    row = Row("decode_attention", m.name, f"B={batch} ctx={context} {label}", dtype, rel_err(out[:len(ref)], ref),
              key=(tag, m.name, batch, setting), note="the launcher's choice" if launchers else "")
    row.triton_ms = bench.time_ms(lambda: decode_attention(*args, **knobs))
    bench.bandwidth(row, moved)
    return row


def setting_summary(rows: list[Row], tag: str, setting: str) -> str:
    """Per model and size: the launcher's choice of a setting (its row's note says so) against the
    fastest measured, from rows keyed (tag, model, size, setting)."""
    lines = [f"| model | size | launcher's {setting} | its ms | fastest {setting} | its ms | launcher / fastest |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.key[:1] == (tag,) and r.triton_ms:
            groups.setdefault(r.key[1:3], []).append(r)
    for (model, size), group in groups.items():
        best = min(group, key=lambda r: r.triton_ms)
        chosen = next((r for r in group if r.note.startswith("the launcher's")), None)
        if chosen is None:
            continue
        lines.append(f"| {model} | {size} | {chosen.key[3]} | {_fmt(chosen.triton_ms)} | {best.key[3]} | "
                     f"{_fmt(best.triton_ms)} | {chosen.triton_ms / best.triton_ms:.2f}x |")
    return "\n".join(lines)


def prefill_rows(bench: Bench, models, cases, dtype) -> list[Row]:
    from kernels import reference
    from kernels.prefill_attention import prefill_attention

    rows = []
    for m in models:
        for label, query_lens, context_lens in cases:
            dev = bench.device
            k_cache, v_cache, block_tables = _paged_cache(m, context_lens, dtype, dev)
            cu = torch.tensor([0, *query_lens], device=dev).cumsum(0).to(torch.int32)  # [B + 1]
            ctx = torch.tensor(context_lens, dtype=torch.int32, device=dev)
            q = _randn(sum(query_lens), m.q_heads, m.head_dim, dtype=dtype, device=dev)
            args = (q, k_cache, v_cache, block_tables, cu, ctx, m.head_dim**-0.5, max(query_lens))
            out = prefill_attention(*args)
            row = Row("prefill_attention", m.name, label, dtype, rel_err(out, reference.prefill_attention(*args)),
                      key=("prefill", m.name, label))
            row.triton_ms = bench.time_ms(lambda: prefill_attention(*args))
            row.torch_ms = bench.time_ms(lambda: reference.prefill_attention(*args))
            # Keys each query sees (causal): sum over rows of its position + 1; QK^T and PV, 2 FLOP/MAC.
            visible = sum(q_len * (c - q_len) + q_len * (q_len + 1) // 2 for q_len, c in zip(query_lens, context_lens))
            flops = 4 * visible * m.q_heads * m.head_dim
            row.unit, row.achieved, row.ceiling = "TFLOP/s", flops / row.triton_ms / 1e9, bench.matmul_tflops
            rows.append(row)
            del k_cache, v_cache
            _free(bench)
    return rows


def swiglu_rows(bench: Bench, models, token_counts, dtype) -> list[Row]:
    import torch.nn.functional as F

    from kernels import reference
    from kernels.swiglu import swiglu

    rows = []
    for m in models:
        w = _randn(2 * m.inter, m.hidden, dtype=dtype, device=bench.device, scale=m.hidden**-0.5)  # [2I, H]
        for tokens in token_counts:
            x = _randn(tokens, m.hidden, dtype=dtype, device=bench.device)  # [T, H]
            row = Row("swiglu", m.name, f"T={tokens} H={m.hidden} I={m.inter}", dtype,
                      rel_err(swiglu(x, w), reference.swiglu(x, w)), key=("swiglu", m.name, tokens))
            row.triton_ms = bench.time_ms(lambda: swiglu(x, w))
            row.torch_ms = bench.time_ms(lambda: reference.swiglu(x, w))
            row.cublas_ms = bench.time_ms(lambda: F.linear(x, w))  # the same two GEMMs, stacked, no epilogue
            row.note = f"fused / cuBLAS GEMM = {row.triton_ms / row.cublas_ms:.2f}"
            if tokens <= 64:  # weight-bandwidth bound: GB/s of weights and activations
                moved = (2 * m.inter * m.hidden + tokens * (m.hidden + m.inter)) * x_size(dtype)
                bench.bandwidth(row, moved)
            else:
                flops = 2 * tokens * m.hidden * 2 * m.inter
                row.unit, row.achieved, row.ceiling = "TFLOP/s", flops / row.triton_ms / 1e9, bench.matmul_tflops
            rows.append(row)
        del w
        _free(bench)
    return rows


def fp32_rows(bench: Bench, m: ModelShape) -> list[Row]:
    """Correctness in fp32 (exact dots, no TF32) at the default model's sizes; not timed."""
    from kernels import reference
    from kernels.decode_attention import decode_attention
    from kernels.prefill_attention import prefill_attention
    from kernels.rms_norm import rms_norm
    from kernels.rotary_cache import rotary_and_cache
    from kernels.swiglu import swiglu

    dev, f32 = bench.device, torch.float32
    rows = []
    x, r, w = (_randn(*s, dtype=f32, device=dev) for s in ((37, m.hidden), (37, m.hidden), (m.hidden,)))
    rows.append(Row("rms_norm", m.name, "T=37 +residual", f32,
                    rel_err(rms_norm(x, w, 1e-5, r)[0], reference.rms_norm(x, w, 1e-5, r)[0])))
    q = _randn(37, m.q_heads, m.head_dim, dtype=f32, device=dev)
    k, v = (_randn(37, m.kv_heads, m.head_dim, dtype=f32, device=dev) for _ in range(2))
    cos, sin = _rope_tables(4096, m.head_dim, dev)
    pos = torch.randint(0, 4096, (37,), device=dev)
    caches = [torch.zeros(4, BLOCK_SIZE, m.kv_heads, m.head_dim, device=dev) for _ in range(4)]
    slots = torch.randperm(4 * BLOCK_SIZE, device=dev)[:37]
    got = rotary_and_cache(q, k, v, cos, sin, pos, caches[0], caches[1], slots)
    want = reference.rotary_and_cache(q, k, v, cos, sin, pos, caches[2], caches[3], slots)
    rows.append(Row("rotary_and_cache", m.name, "T=37", f32,
                    max(rel_err(got[0], want[0]), rel_err(got[1], want[1]), rel_err(caches[0], caches[2]))))
    lens = [1, 17, 300, 1000, 63]
    k_cache, v_cache, tables = _paged_cache(m, lens, f32, dev)
    ctx = torch.tensor(lens, dtype=torch.int32, device=dev)
    q = _randn(len(lens), m.q_heads, m.head_dim, dtype=f32, device=dev)
    rows.append(Row("decode_attention", m.name, "B=5 ctx=1..1000", f32,
                    rel_err(decode_attention(q, k_cache, v_cache, tables, ctx, 0.125),
                            reference.decode_attention(q, k_cache, v_cache, tables, ctx, 0.125))))
    query_lens, context_lens = [17, 1, 300, 63], [40, 17, 300, 1000]  # chunks at the end of contexts
    k_cache, v_cache, tables = _paged_cache(m, context_lens, f32, dev)
    cu = torch.tensor([0, *query_lens], device=dev).cumsum(0).to(torch.int32)  # [B + 1]
    q = _randn(sum(query_lens), m.q_heads, m.head_dim, dtype=f32, device=dev)
    args = (q, k_cache, v_cache, tables, cu, torch.tensor(context_lens, dtype=torch.int32, device=dev),
            0.125, max(query_lens))
    rows.append(Row("prefill_attention", m.name, "B=4 chunks", f32,
                    rel_err(prefill_attention(*args), reference.prefill_attention(*args))))
    x = _randn(37, m.hidden, dtype=f32, device=dev)
    w = _randn(2 * m.inter, m.hidden, dtype=f32, device=dev, scale=m.hidden**-0.5)
    rows.append(Row("swiglu", m.name, f"T=37 H={m.hidden} I={m.inter}", f32,
                    rel_err(swiglu(x, w), reference.swiglu(x, w))))
    return rows


def whole_model_decode_rows(bench: Bench, batch_sizes: list[int]) -> list[Row]:
    """A whole decode step of the default model's shape (random weights, bf16, every row at full
    depth, 512 cached tokens each), through the Triton kernels and through the torch references.

    Builds the model with balcony_runtime's own classes (no transformers needed) and times
    ``BalconyModel.forward`` on one prepared batch; the step's cache write is idempotent, so the
    same batch can run again and again.
    """
    from balcony_runtime.block_manager import BlockManager
    from balcony_runtime.config import ModelArch
    from balcony_runtime.kv_cache import KVCache
    from balcony_runtime.model.balcony_model import BalconyModel
    from balcony_runtime.model_runner import ModelRunner
    from balcony_runtime.request import Request
    from balcony_runtime.sampling_params import SamplingParams
    from balcony_runtime.scheduler import ScheduledRequest
    from kernels.dispatch import TORCH_OPS
    from kernels.triton_ops import TRITON_OPS

    m = TINY if bench.smoke else DEFAULT_MODEL
    layers, exits, vocab, context = (4, (1, 2, 3), 1000, 20) if bench.smoke else (30, (8, 15, 22), 49152, 512)
    arch = ModelArch(vocab_size=vocab, hidden_size=m.hidden, intermediate_size=m.inter, num_layers=layers,
                     num_heads=m.q_heads, num_kv_heads=m.kv_heads, head_dim=m.head_dim, rms_norm_eps=1e-5,
                     max_position_embeddings=2 * context, tie_word_embeddings=True)
    dtype = torch.float32 if bench.smoke else torch.bfloat16
    inv_freq = 1.0 / (1e5 ** (torch.arange(0, m.head_dim, 2, dtype=torch.float32) / m.head_dim))
    model = BalconyModel(arch, exits, inv_freq, 1.0, dtype, bench.device, TORCH_OPS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.eval()
    rows = []
    for batch in batch_sizes:
        blocks_per_row = len(model.cache_layers_of(layers)) * -(-(context + 1) // BLOCK_SIZE)
        block_manager = BlockManager(batch * blocks_per_row, BLOCK_SIZE)
        kv = KVCache.allocate(arch, batch * blocks_per_row, BLOCK_SIZE, dtype, bench.device)
        kv.keys.normal_()
        kv.values.normal_()
        runner = ModelRunner(model, kv, block_manager)
        scheduled = []
        for i in range(batch):
            request = Request(f"r{i}", [(7 * i + j) % vocab for j in range(context + 1)], SamplingParams(),
                              layers, len(model.cache_layers_of(layers)), 0.0)
            block_manager.allocate(request.request_id, request.num_cache_layers, context + 1)
            scheduled.append(ScheduledRequest(request, context, 1))
        forward_batch, _ = runner.prepare(scheduled)
        forward_batch.logits_indices = list(range(batch))
        caches = kv.as_tuple()

        def step(ops, on=model, kv_caches=caches):
            on.ops = ops
            with torch.inference_mode():
                return on(forward_batch, kv_caches)

        # The reference: the same weights and cache in fp32 through the torch ops. Both paths in
        # ``dtype`` are compared with it (comparing them with each other would charge the Triton
        # path with the torch path's rounding too).
        reference_model = copy.deepcopy(model).float()
        reference_model.dtype = torch.float32
        expected = step(TORCH_OPS, reference_model, (caches[0].float(), caches[1].float()))
        del reference_model
        err, torch_err = rel_err(step(TRITON_OPS), expected), rel_err(step(TORCH_OPS), expected)
        triton_ms = bench.time_ms(lambda: step(TRITON_OPS))
        torch_ms = bench.time_ms(lambda: step(TORCH_OPS))
        model.ops = TORCH_OPS
        rows.append(Row("decode step", m.name, f"B={batch} ctx={context} full depth", dtype, err,
                        triton_ms=triton_ms, torch_ms=torch_ms, key=("decode step", batch), baseline_err=torch_err,
                        note=f"both paths against fp32; the torch path's error: {torch_err:.1e}"))
        del kv, runner
        _free(bench)
    return rows


def _free(bench: Bench) -> None:
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()


# ---- report ---------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def table(rows: list[Row]) -> str:
    lines = [
        "| kernel | model | shape | dtype | Triton ms | torch ms | speedup | achieved | of ceiling "
        "| of a same-size copy | rel err | check | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = r.torch_ms / r.triton_ms if r.torch_ms and r.triton_ms else None
        achieved = f"{r.achieved:.4g} {r.unit}" if r.achieved is not None else "-"
        share = f"{100 * r.achieved / r.ceiling:.0f}%" if r.achieved is not None and r.ceiling else "-"
        dtype = str(r.dtype).removeprefix("torch.")
        check = "ok" if r.ok else "**FAIL**"
        lines.append(f"| {r.kernel} | {r.model} | {r.shape} | {dtype} | {_fmt(r.triton_ms)} | {_fmt(r.torch_ms)} | "
                     f"{_fmt(speedup)} | {achieved} | {share} | {_copy_share(r)} | {_fmt(r.rel_err, 2)} | {check} "
                     f"| {r.note} |")
    return "\n".join(lines)


def _copy_share(r: Row) -> str:
    """The time of a copy moving the same bytes as a share of the kernel's (100%: as fast as that copy)."""
    return f"{100 * r.copy_ms / r.triton_ms:.0f}%" if r.copy_ms and r.triton_ms else "-"


def goals(rows: list[Row], goal_batch: int) -> str:
    """The issue's goals, one line per row they apply to."""
    lines = ["| goal | row | measured | met |", "|---|---|---|---|"]
    for r in rows:
        if r.key[:1] in (("rms_norm",), ("decode",)) and r.key[2] == goal_batch and r.achieved is not None:
            share = r.achieved / r.ceiling
            lines.append(f"| {r.kernel} >= 70% of copy bandwidth at batch {goal_batch} | {r.model} {r.shape} | "
                         f"{100 * share:.0f}% (a same-size copy's time: {_copy_share(r)} of its) | "
                         f"{'yes' if share >= 0.7 else 'no'} |")
        elif r.key[:1] == ("swiglu",) and r.cublas_ms:
            ratio = r.triton_ms / r.cublas_ms
            lines.append(f"| fused MLP within 10% of cuBLAS | {r.model} {r.shape} | {ratio:.2f}x | "
                         f"{'yes' if ratio <= 1.10 else 'no'} |")
        elif r.key[:1] == ("decode step",) and r.torch_ms:
            lines.append(f"| decode step faster with Triton | {r.model} {r.shape} | "
                         f"{r.torch_ms / r.triton_ms:.2f}x | {'yes' if r.triton_ms < r.torch_ms else 'no'} |")
    if not any(r.key[:1] == ("decode step",) for r in rows):
        lines.append("| decode step faster with Triton | - | not measured: whole_model_decode_rows() is a hook | - |")
    return "\n".join(lines)


def header(bench: Bench) -> str:
    import triton

    name = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "CPU (Triton interpreter)"
    return (
        f"Device: {name}; torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}.\n\n"
        f"Measured ceilings: copy bandwidth {bench.copy_gbs:.0f} GB/s (1 GiB device-to-device copy); "
        f"cuBLAS bf16 matmul {bench.matmul_tflops:.0f} TFLOP/s (8192^3). Times: median of "
        f"triton.testing.do_bench (L2 flushed before each run). torch ms is the torch path "
        f"(kernels/reference.py) on the same inputs. rel err: ||out - ref|| / ||ref||."
    )


# ---- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--only", default=",".join(KERNELS), help=f"comma-separated subset of {KERNELS}")
    parser.add_argument("--quick", action="store_true", help="fewer sizes (about a third of the cases)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks this script")
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument("--goal-batch", type=int, default=64, help="batch the bandwidth goals are read at")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - set(KERNELS)
    if unknown:
        parser.error(f"unknown kernels {sorted(unknown)}; choose from {KERNELS}")

    if args.smoke:
        from kernels import launch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and not launch.interpreting():
            print("--smoke on a machine without CUDA needs TRITON_INTERPRET=1 in the environment.")
            return 0
    elif not torch.cuda.is_available():
        print("No CUDA device: this script measures the Triton kernels on a GPU. Nothing was run. "
              "(TRITON_INTERPRET=1 python bench/gpu_kernels.py --smoke runs tiny shapes on the CPU.)")
        return 0
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # keep the fp32 references exact
    torch.manual_seed(0)

    bf16 = torch.bfloat16
    if args.smoke:
        models, tokens, batches, contexts = [TINY], [3, 20], [1, 3], [40]
        split_batches, split_context = [3], 40
        tile_tokens, decode_tiles = [7], [(16, 1, 1), (32, 2, 2)]
        mlp_tokens, prefill_cases = [1, 70], [("1x40", [40], [40]), ("2 chunks", [9, 1], [30, 17])]
    else:
        models = [DEFAULT_MODEL, LLAMA3_8B]
        tokens = [1, 64, 4096] if args.quick else [1, 64, 256, 4096]
        batches = [1, 64, 256] if args.quick else [1, 16, 64, 256]
        contexts = [2048] if args.quick else [512, 2048, 8192]
        split_batches, split_context = [1, 64, 256], 2048
        tile_tokens, decode_tiles = [64, 4096], DECODE_TILES
        mlp_tokens = [1, 64, 2048] if args.quick else [1, 16, 64, 256, 2048, 8192]
        prefill_cases = [("1x2048", [2048], [2048]), ("8 chunks of 512 at ctx 4096", [512] * 8, [4096] * 8)]
        if not args.quick:
            prefill_cases += [("1x512", [512], [512]), ("1x8192", [8192], [8192]),
                              ("mixed chunks", [1000, 37, 300, 1], [3000, 37, 300, 2000])]

    started = time.perf_counter()
    bench = Bench(device, args.smoke, args.warmup_ms, args.rep_ms)
    print(header(bench), flush=True)
    sections: list[tuple[str, str, Callable[[], list[Row]]]] = [  # (kernel, section, its rows)
        ("rms_norm", "rms_norm", lambda: rms_norm_rows(bench, models, tokens, bf16)),
        ("rms_norm", "rms_norm rows per program", lambda: rms_norm_tile_rows(bench, models, tile_tokens, bf16)),
        ("rotary_and_cache", "rotary_and_cache", lambda: rotary_rows(bench, models, tokens, bf16)),
        ("decode_attention", "decode_attention", lambda: decode_rows(bench, models, batches, contexts, bf16)),
        ("decode_attention", "decode_attention splits",
         lambda: decode_split_rows(bench, models, split_batches, split_context, bf16)),
        ("decode_attention", "decode_attention tiles",  # the default model only: the one below the goal
         lambda: decode_tile_rows(bench, models[:1], args.goal_batch if not args.smoke else 3, split_context, bf16,
                                  decode_tiles)),
        ("prefill_attention", "prefill_attention", lambda: prefill_rows(bench, models, prefill_cases, bf16)),
        ("swiglu", "swiglu", lambda: swiglu_rows(bench, models, mlp_tokens, bf16)),
    ]
    rows: list[Row] = []
    for name, section, run in sections:
        if name not in only:
            continue
        section_start = time.perf_counter()
        try:
            rows += run()
        except Exception as exc:  # one kernel's failure must not hide the others' numbers
            traceback.print_exc()
            rows.append(Row(name, "-", f"{section} crashed", bf16, None, note=f"{type(exc).__name__}: {exc}"[:200]))
        print(f"{section}: {time.perf_counter() - section_start:.1f}s", flush=True)
    try:
        fp32 = [r for r in fp32_rows(bench, models[0]) if r.kernel in only]
    except Exception as exc:
        traceback.print_exc()
        fp32 = [Row("fp32 checks", "-", "crashed", torch.float32, None, note=f"{type(exc).__name__}: {exc}"[:200])]
    try:
        rows += whole_model_decode_rows(bench, batches)
    except Exception as exc:
        traceback.print_exc()
        rows.append(Row("decode step", "-", "crashed", bf16, None, note=f"{type(exc).__name__}: {exc}"[:200]))

    report = "\n\n".join([
        "# Triton kernels on GPU: correctness and speed",
        header(bench),
        "## bf16, real sizes\n\n" + table(rows),
        "## fp32 correctness (exact dots), default model sizes\n\n" + table(fp32),
        "## decode_attention: the launcher's sequence splits against the fastest (rows 'splits=' above)\n\n"
        + setting_summary(rows, "decode splits", "splits"),
        "## decode_attention: tokens a tile / warps / pipeline stages at the launcher's split, its defaults "
        "against the fastest (rows 'n../w../s..' above)\n\n" + setting_summary(rows, "decode tile", "tile"),
        "## rms_norm: rows per program / warps, the launcher's against the fastest (rows 'rows/program=' above)\n\n"
        + setting_summary(rows, "rms_norm rows", "rows/program / warps"),
        "## Goals (issue 5)\n\n" + goals(rows, args.goal_batch),
        f"Total time of this run: {time.perf_counter() - started:.0f}s.",
    ]) + "\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        print(f"wrote {args.out}")
    failed = [r for r in rows + fp32 if not r.ok]
    if failed:
        print(f"{len(failed)} correctness check(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
