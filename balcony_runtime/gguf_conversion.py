"""Dequantize a LLaMA GGUF checkpoint into a transformers directory (fp32 safetensors, config,
tokenizer).

Why not only ``AutoModelForCausalLM.from_pretrained(gguf_file=...)``: it parses the file's metadata
(tens of thousands of vocabulary strings, one numpy view each) three times and builds gguf's tensor
name table once per tensor, which makes a first start spend most of its minute here. Here the
header is read once (balcony_runtime/gguf_header.py, string arrays skipped), the config comes from
its llama.* keys, the weights are dequantized with gguf's own kernels, and only the tokenizer is
built by transformers, from the vocabulary. A file this pass does not know (another architecture, a
metadata key or tensor it cannot name) goes through transformers' loader whole, so every GGUF
transformers reads still converts; a test checks both give the same files for the default model.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from balcony_runtime.gguf_header import GGUFFormatError, GGUFHeader, read_gguf

log = logging.getLogger("balcony.model")

# GGUF tensor names (llama.cpp's) -> transformers' LlamaForCausalLM names.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


class UnsupportedGGUF(Exception):
    """This pass cannot convert the file; transformers' loader should."""


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise UnsupportedGGUF(f"tensor {gguf_name!r} has no LLaMA name here")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's converter, which reorders each q/k head's rows from transformers' rotate-half
    layout (first half, second half) to interleaved pairs: [heads * head_dim, in] -> same shape."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# llama.* metadata keys -> LlamaConfig fields (the names transformers' GGUF loader gives them). A key
# outside this table (rope scaling, experts, ...) sends the file to transformers' loader.
_LLAMA_CONFIG_KEYS = {
    "context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim", "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "vocab_size": "vocab_size",
}
_TOKEN_ID_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                  "unknown_token_id": "unk_token_id", "padding_token_id": "pad_token_id"}


def llama_config_fields(header: GGUFHeader) -> dict:
    """LlamaConfig keyword arguments from a llama GGUF's metadata."""
    metadata = header.metadata
    if metadata.get("general.architecture") != "llama":
        raise UnsupportedGGUF("not a llama GGUF")
    fields = {"_model_name_or_path": metadata["general.name"]} if "general.name" in metadata else {}
    for key, value in metadata.items():
        if key.startswith("llama."):
            name = _LLAMA_CONFIG_KEYS.get(key[len("llama."):])
            if name is None:
                raise UnsupportedGGUF(f"metadata {key!r} has no plain LLaMA meaning here")
            fields[name] = value
        elif key.startswith("tokenizer.ggml.") and key[len("tokenizer.ggml."):] in _TOKEN_ID_KEYS:
            fields[_TOKEN_ID_KEYS[key[len("tokenizer.ggml."):]]] = value
    missing = {"num_hidden_layers", "hidden_size", "num_attention_heads"} - fields.keys()
    if missing:
        raise UnsupportedGGUF(f"metadata lacks {sorted(missing)}")
    names = {t.name for t in header.tensors}
    fields["tie_word_embeddings"] = "output.weight" not in names
    if "vocab_size" not in fields:  # older files: the embedding's row count
        fields["vocab_size"] = next(t.dims[0] for t in header.tensors if t.name == "token_embd.weight")
    return fields


def read_llama_tensors(header: GGUFHeader, num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor]:
    """Every tensor of a LLaMA GGUF file, dequantized to float32 under transformers' names."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quant_shape_to_byte_shape

    tensors = {}
    for tensor in header.tensors:
        name = hf_name(tensor.name)
        qtype = GGMLQuantizationType(tensor.ggml_type)
        data = tensor.data.reshape(quant_shape_to_byte_shape(tensor.dims, qtype)) \
            if qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else tensor.data
        weight = dequantize(data, qtype).reshape(tensor.dims).astype(np.float32, copy=False)
        if ".self_attn.q_proj." in name:
            weight = unpermute_rotary(weight, num_heads)
        elif ".self_attn.k_proj." in name:
            weight = unpermute_rotary(weight, num_kv_heads)
        if not weight.flags.writeable or not weight.flags.c_contiguous:  # a view of the mapped file
            weight = np.array(weight, order="C")
        tensors[name] = torch.from_numpy(weight)
    return tensors


def gguf_tokenizer(gguf: Path, header: GGUFHeader):
    """The file's tokenizer. A byte-level BPE vocabulary ("gpt2") is the generic fast tokenizer, which
    AutoTokenizer would also pick, built from the vocabulary alone; AutoTokenizer would first parse
    the whole file's metadata with gguf's reader to learn the model type (seconds). Other vocabularies
    (sentencepiece "llama", ...) go through AutoTokenizer, which picks their classes."""
    if header.metadata.get("tokenizer.ggml.model") == "gpt2":
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def convert_llama_gguf(gguf: Path, target: Path) -> None:
    """Write config.json, generation_config.json, the tokenizer and model.safetensors for ``gguf``
    into ``target`` (an empty directory). Raises UnsupportedGGUF for files transformers must read."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    header = read_gguf(gguf)
    fields = llama_config_fields(header)
    config = LlamaConfig(**fields)
    if getattr(config, "rope_parameters", None) and config.rope_parameters.get("rope_type", "default") != "default":
        raise UnsupportedGGUF("its rotary embedding")
    tensors = read_llama_tensors(header, config.num_attention_heads, config.num_key_value_heads)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    tokenizer = gguf_tokenizer(gguf, header)
    config.save_pretrained(target)
    GenerationConfig.from_model_config(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})


def convert_with_transformers(gguf: Path, target: Path) -> None:
    """transformers' own GGUF loader, for the files convert_llama_gguf does not take."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        # The dequantized weights are plain tensors; drop the GGUF marker so save_pretrained writes.
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def convert_gguf(gguf: Path, target: Path) -> None:
    try:
        convert_llama_gguf(gguf, target)
    except (UnsupportedGGUF, GGUFFormatError) as reason:
        log.info("conversion: %s; using transformers' GGUF loader", reason)
        for leftover in target.iterdir():
            leftover.unlink()
        convert_with_transformers(gguf, target)
