"""The one-pass GGUF header reader against gguf's own writer and reader."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from balcony_runtime.gguf_conversion import UnsupportedGGUF, llama_config_fields
from balcony_runtime.gguf_header import GGUFFormatError, GGUFHeader, GGUFTensor, read_gguf


@pytest.fixture
def written(tmp_path):
    """A small file written by gguf's GGUFWriter: every value kind and three tensor types."""
    path = tmp_path / "small.gguf"
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "b.weight": rng.standard_normal((4, 64)).astype(np.float16),
        "c.weight": rng.standard_normal((2, 64)).astype(np.float32),  # stored as Q8_0
    }
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("x.u8", 7)
    writer.add_int32("x.i32", -12)
    writer.add_uint64("x.u64", 2**40 + 3)
    writer.add_float32("x.f32", 0.1)
    writer.add_bool("x.bool", True)
    writer.add_string("x.str", "héllo")
    writer.add_array("x.ints", [1, 2, 3])
    writer.add_array("x.words", ["one", "two", "three"])
    writer.add_array("x.floats", [0.5, 1.5])
    writer.add_tensor("a.weight", tensors["a.weight"])
    writer.add_tensor("b.weight", tensors["b.weight"])
    q8 = quantize(tensors["c.weight"], gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("c.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, tensors


def test_values_and_tensors_equal_what_was_written(written):
    path, tensors = written
    header = read_gguf(path, keep_string_arrays=frozenset({"x.words"}))
    m = header.metadata
    assert m["general.architecture"] == "llama"
    assert (m["x.u8"], m["x.i32"], m["x.u64"], m["x.bool"], m["x.str"]) == (7, -12, 2**40 + 3, True, "héllo")
    assert m["x.f32"] == pytest.approx(0.1, rel=1e-7)
    assert m["x.ints"] == [1, 2, 3] and m["x.floats"] == [0.5, 1.5] and m["x.words"] == ["one", "two", "three"]
    assert read_gguf(path).metadata["x.words"] == 3  # skipped: its length

    by_name = {t.name: t for t in header.tensors}
    assert [t.name for t in header.tensors] == ["a.weight", "b.weight", "c.weight"]
    a, b, c = by_name["a.weight"], by_name["b.weight"], by_name["c.weight"]
    assert a.dims == (3, 5) and np.array_equal(a.data.view(np.float32).reshape(a.dims), tensors["a.weight"])
    assert b.dims == (4, 64) and np.array_equal(b.data.view(np.float16).reshape(b.dims), tensors["b.weight"])
    assert c.dims == (2, 64) and c.ggml_type == gguf.GGMLQuantizationType.Q8_0
    expected = dequantize(quantize(tensors["c.weight"], gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(dequantize(c.data.reshape(2, -1), gguf.GGMLQuantizationType.Q8_0), expected)


def test_default_model_header_equals_gguf_reader(default_model):
    from balcony_runtime.model_source import balcony_home

    path = balcony_home() / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ours = read_gguf(path, keep_string_arrays=frozenset({"tokenizer.ggml.merges"}))
    reference = gguf.GGUFReader(path)
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if key in ("tokenizer.ggml.tokens", "general.languages"):  # string arrays not kept: their length
            assert ours.metadata[key] == len(value)
        elif isinstance(value, float):
            assert ours.metadata[key] == pytest.approx(value, rel=1e-7), key
        else:
            assert ours.metadata[key] == value, key
    assert len(ours.tensors) == len(reference.tensors)
    for mine, theirs in zip(ours.tensors, reference.tensors):
        assert mine.name == theirs.name and mine.ggml_type == theirs.tensor_type
        assert mine.dims == tuple(int(d) for d in reversed(theirs.shape))
        assert np.array_equal(mine.data, theirs.data.reshape(-1).view(np.uint8))


def test_bad_magic_and_truncation_are_format_errors(written, tmp_path):
    path, _ = written
    data = path.read_bytes()
    (tmp_path / "magic.gguf").write_bytes(b"GGUX" + data[4:])
    with pytest.raises(GGUFFormatError, match="not a GGUF"):
        read_gguf(tmp_path / "magic.gguf")
    for cut in (0, 20, 100, len(data) // 3, len(data) - 64):  # the end may be alignment padding
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(GGUFFormatError):
            read_gguf(tmp_path / "cut.gguf")


def _header(**metadata) -> GGUFHeader:
    embedding = GGUFTensor("token_embd.weight", (100, 8), 0, np.zeros(0, np.uint8))
    base = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 8,
            "llama.attention.head_count": 2, "tokenizer.ggml.eos_token_id": 5}
    return GGUFHeader({**base, **metadata}, (embedding,))


def test_llama_config_fields_and_what_goes_to_transformers():
    fields = llama_config_fields(_header())
    assert fields == {"num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "eos_token_id": 5,
                      "tie_word_embeddings": True, "vocab_size": 100}
    with pytest.raises(UnsupportedGGUF, match="rope.scaling.type"):
        llama_config_fields(_header(**{"llama.rope.scaling.type": "linear"}))
    with pytest.raises(UnsupportedGGUF, match="not a llama"):
        llama_config_fields(_header(**{"general.architecture": "qwen2"}))
