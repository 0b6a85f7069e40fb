"""CPU weight formats (fp16 for FBGEMM, bf16 for oneDNN, weight-only int8) against dense references,
alone and in the model: the paged forward with packed weights must equal a dense model holding the
same (rounded) weights (bf16 also rounds each product's input and output: close, not equal), and
stay close to the unpacked model."""

from __future__ import annotations

import pytest
import torch

from balcony_runtime.loader import load_model
from balcony_runtime.model.packed_weights import FORMATS, Bf16Weight, Fp16Weight, Int8Weight, SplitWeight, linear, packer
from tests.runtime.conftest import perturb_balconies


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_int8_matmul_matches_dequantized_dense(rows):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g)
    packed = Int8Weight.pack(w)
    x = torch.randn(rows, 40, generator=g)
    torch.testing.assert_close(packed.matmul(x), x @ packed.dequantize().T, rtol=1e-5, atol=1e-5)
    # symmetric per-row rounding: every weight within half a step of its row's scale
    assert ((packed.dequantize() - w).abs() <= packed.scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_fp16_matmul_matches_fp16_rounded_dense(rows):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 40, generator=g)
    packed = Fp16Weight.pack(w)
    torch.testing.assert_close(packed.dequantize(), w.half().float())
    x = torch.randn(2, rows, 40, generator=g)  # leading dims are kept
    ref = x @ w.half().float().T
    torch.testing.assert_close(packed.matmul(x), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(linear(x, w), x @ w.T)


needs_onednn_bf16 = pytest.mark.skipif(not Bf16Weight.supported(), reason="this CPU has no oneDNN bf16 path")


@needs_onednn_bf16
@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_matmul_is_a_bf16_product_of_bf16_rounded_weights(rows, dtype):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 40, generator=g)
    packed = Bf16Weight.pack(w)
    torch.testing.assert_close(packed.dequantize(), w.bfloat16().float(), rtol=0, atol=0)
    x = torch.randn(2, rows, 40, generator=g).to(dtype)  # leading dims are kept
    out = packed.matmul(x)
    assert out.dtype == dtype and out.shape == (2, rows, 48)
    # fp32 accumulation of bf16 inputs, then one bf16 rounding (at most one bf16 step apart from
    # the reference's rounding of a differently ordered sum)
    ref = x.bfloat16().float() @ w.bfloat16().float().T
    torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=1e-5)


@needs_onednn_bf16
def test_split_weight_takes_fp16_below_its_crossover_and_bf16_from_it():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 40, generator=g)
    split = packer("fp16+bf16", bf16_from_rows=4)(w)
    assert isinstance(split, SplitWeight) and split.bf16_from_rows == 4 and split.shape == (48, 40)
    fp16, bf16 = Fp16Weight.pack(w), Bf16Weight.pack(w)
    for rows in (1, 3, 4, 9):
        x = torch.randn(rows, 40, generator=g)
        expected = (bf16 if rows >= 4 else fp16).matmul(x)
        torch.testing.assert_close(split.matmul(x), expected, rtol=0, atol=0)
    assert SplitWeight.pack(w).bf16_from_rows == 16  # unmeasured default
    with pytest.raises(ValueError, match=">= 1"):
        SplitWeight.pack(w, bf16_from_rows=0)


@pytest.fixture(scope="module")
def fast_native(tmp_path_factory):
    """The native kernels where their fp16 product is fast here (AVX-512, OpenMP), else a skip."""
    from kernels import cpu_native

    try:
        native = cpu_native.open_built(tmp_path_factory.mktemp("native"))
    except cpu_native.NativeBuildError as exc:
        pytest.skip(f"native kernels unavailable: {exc}")
    if not native.fp16_linear_fast:
        pytest.skip("the native fp16 product is not vectorized and threaded on this machine")
    return native


def test_fp16_with_native_kernels_takes_the_blocked_copy_for_few_rows(fast_native):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(50, 40, generator=g)
    w[0, 0] = 1e6  # past fp16's range: saturates, as FBGEMM's packing does
    packed = packer("fp16", native=fast_native)(w)
    fbgemm = Fp16Weight.pack(w)
    assert packed.blocked is not None and packed.packed is not None
    torch.testing.assert_close(packed.dequantize(), fbgemm.dequantize(), rtol=0, atol=0)
    for rows in (1, Fp16Weight.NATIVE_ROWS, Fp16Weight.NATIVE_ROWS + 1, 17):
        x = torch.randn(rows, 40, generator=g)
        expected = (fast_native.fp16_linear(x, packed.blocked, 50) if rows <= Fp16Weight.NATIVE_ROWS
                    else fbgemm.matmul(x))
        torch.testing.assert_close(packed.matmul(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(packed.matmul(x), x @ fbgemm.dequantize().T, rtol=1e-5, atol=1e-2)


@needs_onednn_bf16
def test_split_weight_with_native_kernels_keeps_one_fp16_copy(fast_native):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 40, generator=g)
    split = packer("fp16+bf16", bf16_from_rows=8, native=fast_native)(w)
    assert split.few.packed is None and split.few.blocked is not None  # the bf16 copy serves many rows
    for rows in (1, 5, 8):
        x = torch.randn(rows, 40, generator=g)
        expected = (split.many if rows >= 8 else split.few).matmul(x)
        torch.testing.assert_close(split.matmul(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(split.few.matmul(x[:5]), x[:5] @ w.half().float().T, rtol=1e-5, atol=1e-5)


def test_zero_row_does_not_divide_by_zero():
    w = torch.zeros(4, 8)
    w[1] = 1.0
    packed = Int8Weight.pack(w)
    assert torch.isfinite(packed.scales).all()
    torch.testing.assert_close(packed.dequantize(), w)


def logits_of(loaded, harness, token_ids, exit_layer):
    request = harness.new_request(token_ids, exit_layer)
    (out,) = harness.feed([(request, len(token_ids))])
    return out


@pytest.fixture(scope="module")
def tiny_pair(tiny_model_dir):
    """The tiny model dense and a copy whose matrices are then packed, balconies perturbed alike
    (exit 2's MLP widened to an odd width, as issue 12's wide balconies are packed too)."""
    def build():
        loaded = load_model(str(tiny_model_dir), adapters=None, exits=(1, 2, 3), dtype="float32", device="cpu")
        loaded.model.balconies["2"].widen_mlp(157, torch.Generator().manual_seed(3))
        perturb_balconies(loaded.model, seed=1)
        return loaded
    return build


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_packed_model_equals_dense_model_with_rounded_weights(fmt, tiny_pair, harness):
    """Every exit's logits with packed matrices equal a dense model whose matrices were replaced by
    the packed ones' exact values: the packing changes the weights' rounding and nothing else
    (bf16 also rounds each product's input and output to bf16: there, close with the same argmax)."""
    if fmt in ("bf16", "fp16+bf16") and not Bf16Weight.supported():
        pytest.skip("this CPU has no oneDNN bf16 path")
    packed, rounded = tiny_pair(), tiny_pair()
    packed.model.pack_weights(fmt)
    assert packed.model.quantization == fmt
    with torch.no_grad():
        layers = [*rounded.model.layers, *(b.layer for b in rounded.model.balconies.values())]
        packed_layers = [*packed.model.layers, *(b.layer for b in packed.model.balconies.values())]
        for dense, pk in zip(layers, packed_layers):
            for name in dense.MATRICES:
                getattr(dense, name).copy_(getattr(pk, name).dequantize())
        rounded.model.lm_head.copy_(packed.model.lm_head.dequantize())
    ids = rounded.tokenizer.encode("Packed weights change rounding, nothing else.")
    for exit_layer in (1, 2, 3, 4):
        ours = logits_of(packed, harness(packed), ids, exit_layer)
        ref = logits_of(rounded, harness(rounded), ids, exit_layer)
        if fmt == "bf16":
            assert (ours - ref).abs().max() <= 0.03 * ref.abs().max()
            assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
        else:
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("fmt", ["fp16", pytest.param("bf16", marks=needs_onednn_bf16),
                                 pytest.param("fp16+bf16", marks=needs_onednn_bf16)])
def test_packed_weights_stay_close_to_fp32_on_the_default_model(fmt, harness):
    dense = load_model("smollm2-135m", adapters="default", dtype="float32", device="cpu")
    packed = load_model("smollm2-135m", adapters="default", dtype="float32", device="cpu", quantization=fmt)
    assert packed.model.quantization == fmt
    ids = dense.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    for exit_layer in (*dense.model.exits, dense.model.full_depth):
        ref = logits_of(dense, harness(dense), ids, exit_layer)
        ours = logits_of(packed, harness(packed), ids, exit_layer)
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
        assert (ours - ref).abs().max() <= 0.02 * ref.abs().max()


def test_packing_twice_and_exporting_packed_weights_are_refused(tiny_pair):
    loaded = tiny_pair()
    loaded.model.pack_weights("int8")
    with pytest.raises(RuntimeError, match="already packed"):
        loaded.model.pack_weights("fp16")
    with pytest.raises(RuntimeError, match="no float weights"):
        loaded.model.layers[0].hf_state_dict()
    # packed matrices are no longer parameters; the tied or separate embedding still is
    names = {name for name, _ in loaded.model.named_parameters()}
    assert "embed_tokens" in names and not any("qkv_proj" in n for n in names)
