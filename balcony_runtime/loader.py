"""Build a :class:`BalconyModel` from a model source and (optionally) adapters."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from balcony_runtime.adapters import AdapterMeta, check_backbone, load_adapters
from balcony_runtime.backbone_checkpoint import fingerprint, read_safetensors_dir
from balcony_runtime.backbone_files import load_tokenizer, read_backbone_config
from balcony_runtime.config import ModelArch
from balcony_runtime.errors import AdapterError, ModelSourceError
from balcony_runtime.model.balcony_model import BalconyModel
from balcony_runtime.model.packed_weights import FORMATS
from balcony_runtime.model_source import DEFAULT_MODEL, ResolvedModel, balcony_home, resolve_model
from balcony_runtime.weight_format import WeightChoice, resolve_weights
from kernels import select_ops

DEFAULT_EXITS = {DEFAULT_MODEL: (8, 15, 22)}
SHIPPED_ADAPTERS = Path(__file__).parent / "shipped_adapters"


@dataclass
class LoadedModel:
    model: BalconyModel
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    identity: str  # the backbone's name
    fingerprint: str  # checksum of the backbone's weights (backbone_checkpoint.fingerprint)
    adapters: AdapterMeta | None  # None when the balconies are freshly initialised
    path: Path  # local HF directory of the backbone
    max_model_len: int  # longest sequence (prompt + output) the model accepts
    weights: WeightChoice | None = None  # how dtype and weight format were chosen (None: built elsewhere)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_exits(source: str, num_layers: int) -> tuple[int, ...]:
    if source in DEFAULT_EXITS:
        return DEFAULT_EXITS[source]
    # Spread like the default model's 8/15/22 of 30: about 27%, 50% and 73% of the depth.
    return tuple(sorted({max(1, round(num_layers * f)) for f in (4 / 15, 1 / 2, 11 / 15)}))


def shipped_adapters(source: str) -> Path | None:
    path = SHIPPED_ADAPTERS / source
    return path if (path / "balcony.json").is_file() else None


def load_model(
    source: str = DEFAULT_MODEL,
    adapters: str | Path | None = "default",
    exits: Sequence[int] | None = None,
    dtype: str = "auto",
    device: str = "auto",
    kernel_backend: str = "auto",
    max_model_len: int | None = None,
    quantization: str = "none",
) -> LoadedModel:
    """Load the frozen backbone and its balconies.

    adapters: a directory, ``"default"`` (the adapters shipped for this source, if any), or None
    (fresh balconies initialised from the last backbone layer at ``exits``).
    dtype, quantization: "auto" measures on a CPU (weight_format.py); quantization "none" (the
    default here, exact; the CLI's default is "auto") keeps the matrices in ``dtype``, "fp16"/"int8"
    pack them in a CPU weight format (model/packed_weights.py).
    """
    resolved = resolve_model(source)
    # The tokenizer (importing transformers: about a second of Python) loads in a thread while this
    # one reads and packs the weights, whose torch ops release the GIL.
    with ThreadPoolExecutor(1, thread_name_prefix="balcony-tokenizer") as pool:
        tokenizer = pool.submit(load_tokenizer, resolved.path)
        return _load_weights(source, resolved, tokenizer, adapters=adapters, exits=exits, dtype=dtype, device=device,
                             kernel_backend=kernel_backend, max_model_len=max_model_len, quantization=quantization)


def _load_weights(source: str, resolved: ResolvedModel, tokenizer: Future, *, adapters, exits, dtype, device,
                  kernel_backend, max_model_len, quantization) -> LoadedModel:
    """load_model's body once the source is local; ``tokenizer`` is being loaded meanwhile."""
    backbone = read_backbone_config(resolved.path)
    arch = backbone.arch
    torch_device = resolve_device(device)
    ops = select_ops(torch_device, kernel_backend, native_dir=balcony_home() / "native")
    weights = resolve_weights(dtype, quantization, torch_device, arch, balcony_home() / "weight_formats", ops.native)
    torch_dtype = weights.dtype

    checkpoint = read_safetensors_dir(resolved.path)
    backbone_fingerprint = fingerprint(checkpoint)
    meta, balcony_tensors = None, {}
    adapter_dir = shipped_adapters(source) if adapters == "default" else adapters
    if adapter_dir is not None:
        meta, balcony_tensors = load_adapters(Path(adapter_dir))
        check_backbone(meta, resolved.identity, backbone_fingerprint, arch.num_layers, adapter_dir)
        if exits is not None and tuple(sorted(exits)) != tuple(meta.exits):
            raise AdapterError(f"adapters at {adapter_dir} have exits {meta.exits}, not {sorted(exits)}")
        exits = meta.exits
    exits = tuple(exits) if exits is not None else default_exits(source, arch.num_layers)

    limit = max_model_len or arch.max_position_embeddings
    if limit > arch.max_position_embeddings:
        raise ValueError(f"max_model_len {limit} exceeds the model's {arch.max_position_embeddings} positions")
    model = BalconyModel(
        arch, exits, backbone.inv_freq, backbone.attention_scaling, torch_dtype, torch_device,
        ops, max_positions=limit, balcony_widths=balcony_mlp_widths(balcony_tensors),
    )
    _load_backbone(model, checkpoint, arch)
    del checkpoint
    for k in model.exits:
        balcony = model.balconies[str(k)]
        if balcony_tensors:
            _load_balcony(balcony, balcony_tensors[k], k)
        else:
            balcony.init_from_backbone(model.layers)
    model.freeze_backbone()
    model.eval()
    if weights.quantization in FORMATS:
        model.pack_weights(weights.quantization, weights.bf16_from_rows)

    return LoadedModel(model, tokenizer.result(), resolved.identity, backbone_fingerprint, meta, resolved.path, limit,
                       weights)


def _load_backbone(model: BalconyModel, tensors: dict[str, torch.Tensor], arch: ModelArch) -> None:
    try:
        with torch.no_grad():
            model.embed_tokens.copy_(tensors["model.embed_tokens.weight"])
            model.norm.copy_(tensors["model.norm.weight"])
            if not arch.tie_word_embeddings:
                model.lm_head.copy_(tensors["lm_head.weight"])
            for i, layer in enumerate(model.layers):
                layer.load_hf(tensors, f"model.layers.{i}.")
    except KeyError as exc:
        raise ModelSourceError(f"checkpoint is missing tensor {exc.args[0]}") from exc


def balcony_mlp_widths(balcony_tensors: dict[int, dict[str, torch.Tensor]]) -> dict[int, int]:
    """Each balcony's MLP width, read off its down projection ([H, I]); a balcony whose tensor is
    missing is left to _load_balcony's error."""
    return {k: tensors["mlp.down_proj.weight"].shape[1]
            for k, tensors in balcony_tensors.items() if "mlp.down_proj.weight" in tensors}


def _load_balcony(balcony, tensors: dict[str, torch.Tensor], exit_layer: int) -> None:
    try:
        balcony.layer.load_hf(tensors, "")
        with torch.no_grad():
            balcony.norm.copy_(tensors["norm.weight"])
        # format 2: an optional lens map in front of the layer (absent: identity, as in format 1)
        if ("lens.weight" in tensors) != ("lens.bias" in tensors):
            raise KeyError("lens.bias" if "lens.weight" in tensors else "lens.weight")
        balcony.set_lens(tensors.get("lens.weight"), tensors.get("lens.bias"))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise AdapterError(f"balcony at exit {exit_layer} has missing or misshapen weights: {exc}") from exc


def balcony_state(model: BalconyModel) -> dict[int, dict[str, torch.Tensor]]:
    """Each balcony's tensors under transformers names, as :func:`save_adapters` takes them."""
    out = {}
    for k in model.exits:
        balcony = model.balconies[str(k)]
        out[k] = {**balcony.layer.hf_state_dict(), "norm.weight": balcony.norm.detach()}
        if balcony.lens is not None:
            out[k]["lens.weight"] = balcony.lens.weight.detach()  # [H, H]
            out[k]["lens.bias"] = balcony.lens.bias.detach()  # [H]
    return out
