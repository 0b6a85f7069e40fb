"""The C kernels of kernels/native against the torch references, built here with the system compiler."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from kernels import cpu_decode, cpu_native, reference
from kernels.dispatch import TORCH_OPS, select_ops


# Without a C compiler the server serves with the torch ops (tested below); the kernels cannot be built.
needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
                                    reason="no C compiler on PATH to build kernels/native")


@pytest.fixture(scope="module", params=["default", "portable"])
def native(request, tmp_path_factory) -> cpu_native.NativeKernels:
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on PATH to build kernels/native")
    """The library as served (AVX-512 where the CPU has it) and with the plain loops only."""
    defines = ("BALCONY_PORTABLE",) if request.param == "portable" else ()
    return cpu_native.NativeKernels.open(cpu_native.build(tmp_path_factory.mktemp("native"), defines))


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_reference(native, rows, with_residual):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=g) * 3
    residual = torch.randn(rows, 576, generator=g) if with_residual else None
    weight = torch.randn(576, generator=g)
    out, total = native.rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_total = reference.rms_norm(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, ref_total, rtol=0, atol=0)  # an exact fp32 add
    if residual is None:
        assert total is x  # as the reference: no copy of the input


def test_silu_mul_matches_the_reference_over_the_whole_range(native):
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(5, 2 * 1536, generator=g) * 8
    gate_up[0, :6] = torch.tensor([-200.0, -90.0, -30.0, 0.0, 30.0, 200.0])  # past exp's range both ways
    torch.testing.assert_close(native.silu_mul(gate_up), reference.silu_mul(gate_up), rtol=2e-6, atol=1e-6)


def _decode_case(rows: int, context: list[int], seed: int, block_size: int = 16, hq: int = 9, hk: int = 3, d: int = 64):
    """A paged cache holding ``context[b] - 1`` tokens of row b, and the step's new q, k, v as
    column ranges of one qkv product (as the model hands them over)."""
    g = torch.Generator().manual_seed(seed)
    per_row = max(-(-c // block_size) for c in context) + 1
    num_blocks = rows * per_row + 3
    k_cache = torch.randn(num_blocks, block_size, hk, d, generator=g)
    v_cache = torch.randn(num_blocks, block_size, hk, d, generator=g)
    # Shuffled blocks, inside a wider table of several layers (row stride past the row's blocks).
    order = torch.randperm(num_blocks, generator=g)[: rows * per_row].view(rows, per_row).int()
    layered = torch.zeros(2, rows, per_row + 5, dtype=torch.int32)
    layered[1, :, :per_row] = order
    block_tables = layered[1]
    context_lens = torch.tensor(context, dtype=torch.int32)
    positions = (context_lens - 1).long()
    slots = block_tables.long().gather(1, (positions // block_size)[:, None]).squeeze(1) * block_size + positions % block_size
    qkv = torch.randn(rows, (hq + 2 * hk) * d, generator=g)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    cos, sin = torch.randn(4096, d // 2, generator=g), torch.randn(4096, d // 2, generator=g)
    return (q.view(rows, hq, d), k.view(rows, hk, d), v.view(rows, hk, d), k_cache, v_cache, cos, sin, positions,
            context_lens, slots, block_tables)


@pytest.mark.parametrize("context", [[1], [37], [900], [5, 17, 33, 64], [1, 300, 16, 17, 2, 129]])
def test_decode_attention_matches_the_reference_and_writes_the_same_cache(native, context):
    q, k, v, k_cache, v_cache, cos, sin, positions, lens, slots, block_tables = _decode_case(len(context), context, 7)
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    outs = []
    for attend, (kc, vc) in zip((native.attend, cpu_decode.attend), caches):
        tables = cpu_decode.decode_tables(cos, sin, positions, lens, max(context), kc, vc)
        outs.append(attend(q, k, v, tables, slots, block_tables, 0.125))
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(caches[0][0], caches[1][0], rtol=1e-6, atol=1e-6)  # rotated keys
    torch.testing.assert_close(caches[0][1], caches[1][1], rtol=0, atol=0)  # values, copied
    # And against the plain reference path (rotary_and_cache, then decode_attention).
    kc, vc = k_cache.clone(), v_cache.clone()
    rotated, _ = reference.rotary_and_cache(q, k, v, cos, sin, positions, kc, vc, slots)
    expected = reference.decode_attention(rotated, kc, vc, block_tables, lens, 0.125)
    torch.testing.assert_close(outs[0], expected, rtol=2e-5, atol=2e-5)


def test_inputs_the_loops_do_not_take_go_to_the_reference(native):
    x, weight = torch.randn(2, 64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    out, _ = native.rms_norm(x, weight, 1e-5)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.rms_norm(x, weight, 1e-5)[0])
    strided = torch.randn(64, 4).t()  # [4, 64], not contiguous
    torch.testing.assert_close(native.rms_norm(strided, torch.ones(64), 1e-5)[0],
                               reference.rms_norm(strided, torch.ones(64), 1e-5)[0])
    # Under autograd the reference runs, so gradients flow.
    leaf = torch.randn(2, 64, requires_grad=True)
    native.rms_norm(leaf, torch.ones(64), 1e-5)[0].sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("n, k", [(48, 40), (50, 33), (7, 1), (3072, 576)])
def test_fp16_linear_is_the_product_of_fp16_rounded_weights(native, rows, n, k):
    g = torch.Generator().manual_seed(rows * 1000 + n)
    w = torch.randn(n, k, generator=g) * 0.1
    x = torch.randn(rows, k, generator=g)
    blocked = cpu_native.block_fp16(w)
    assert blocked.shape == (-(-n // 16), k, 16) and blocked.dtype == torch.float16
    torch.testing.assert_close(cpu_native.unblock_fp16(blocked, n), w.half(), rtol=0, atol=0)
    out = native.fp16_linear(x, blocked, n)
    assert out.shape == (rows, n)
    # fp32 sums of the same products as the reference, in another order
    torch.testing.assert_close(out, x @ w.half().float().T, rtol=1e-5, atol=1e-5 * k ** 0.5)
    with pytest.raises(ValueError, match="contiguous fp32"):
        native.fp16_linear(x.double(), blocked, n)


@needs_compiler
def test_the_fast_fp16_linear_runs_on_torchs_openmp_runtime_only(tmp_path, monkeypatch, caplog):
    torch.ones(64, 64) @ torch.ones(64, 64)  # torch's OpenMP runtime loaded and used
    served = cpu_native.open_built(tmp_path)
    if served.fp16_linear_fast:
        assert len(cpu_native.openmp_runtimes()) == 1  # the library took torch's, not a second one
    assert not cpu_native.NativeKernels.open(cpu_native.build(tmp_path, ("BALCONY_PORTABLE",))).fp16_linear_fast
    # Two runtimes would be two thread teams taking turns on the cores: FBGEMM keeps the products.
    monkeypatch.setattr(cpu_native, "openmp_runtimes", lambda: {"/a/libgomp.so.1", "/b/libiomp5.so"})
    assert not cpu_native.NativeKernels.open(served.path).fp16_linear_fast
    if served.fp16_linear_fast:
        assert "two OpenMP runtimes" in caplog.text


@needs_compiler
def test_build_is_cached_and_a_missing_compiler_falls_back_to_torch(tmp_path, monkeypatch, caplog):
    first = cpu_native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to run: no cc, gcc or clang
    assert cpu_native.load(tmp_path / "elsewhere") is None
    assert "native CPU kernels unavailable" in caplog.text
    assert select_ops("cpu", "auto", native_dir=tmp_path / "elsewhere") is TORCH_OPS
    with pytest.raises(RuntimeError, match="native CPU kernels requested but unavailable"):
        select_ops("cpu", "native", native_dir=tmp_path / "elsewhere")


def test_a_failing_compile_reports_the_compiler_error(tmp_path, monkeypatch):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: fatal error: nothing works' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(cpu_native.NativeBuildError, match="nothing works"):
        cpu_native.build(tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())


@needs_compiler
def test_auto_on_a_cpu_selects_the_native_ops_when_they_build(tmp_path):
    ops = select_ops("cpu", "auto", native_dir=tmp_path)
    assert ops.name == "native"
    assert select_ops("cpu", "auto").name == "torch"  # no cache folder named: torch ops
    assert os.listdir(tmp_path)


def test_an_unwritable_cache_folder_falls_back_to_torch(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    assert cpu_native.load(blocker / "native") is None
    assert select_ops("cpu", "auto", native_dir=blocker / "native") is TORCH_OPS
