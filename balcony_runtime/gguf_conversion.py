"""Dequantize a LLaMA GGUF checkpoint into a transformers directory (fp32 safetensors, config,
tokenizer).

Why not only ``AutoModelForCausalLM.from_pretrained(gguf_file=...)``: it parses the file's metadata
(tens of thousands of vocabulary strings, one numpy view each) three times and builds gguf's tensor
name table once per tensor, which makes a first start spend most of its minute here. The weights
are read here in one pass of gguf's reader and dequantized with gguf's own kernels; only the config
and the tokenizer, whose GGUF mappings transformers maintains, still come from transformers. A file
this pass does not know (another architecture, a tensor it cannot name) goes through transformers'
loader whole, so every GGUF transformers reads still converts.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

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


def read_llama_tensors(gguf: Path, num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor]:
    """Every tensor of a LLaMA GGUF file, dequantized to float32 under transformers' names."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(gguf)
    architecture = reader.fields.get("general.architecture")
    if architecture is None or architecture.contents() != "llama":
        raise UnsupportedGGUF("not a llama GGUF")
    tensors = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        # gguf lists dimensions fastest-first; numpy's (and torch's) order is the reverse.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        weight = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32, copy=False)
        if ".self_attn.q_proj." in name:
            weight = unpermute_rotary(weight, num_heads)
        elif ".self_attn.k_proj." in name:
            weight = unpermute_rotary(weight, num_kv_heads)
        if not weight.flags.writeable or not weight.flags.c_contiguous:  # a view of the mapped file
            weight = np.array(weight, order="C")
        tensors[name] = torch.from_numpy(weight)
    return tensors


def convert_llama_gguf(gguf: Path, target: Path) -> None:
    """Write config.json, generation_config.json, the tokenizer and model.safetensors for ``gguf``
    into ``target`` (an empty directory). Raises UnsupportedGGUF for files transformers must read."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if config.model_type != "llama" or getattr(config, "rope_parameters", {}).get("rope_type", "default") != "default":
        raise UnsupportedGGUF(f"model type {config.model_type!r} or its rotary embedding")
    tensors = read_llama_tensors(gguf, config.num_attention_heads, config.num_key_value_heads)
    if "lm_head.weight" not in tensors:
        config.tie_word_embeddings = True
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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
    except UnsupportedGGUF as reason:
        log.info("conversion: %s; using transformers' GGUF loader", reason)
        for leftover in target.iterdir():
            leftover.unlink()
        convert_with_transformers(gguf, target)
