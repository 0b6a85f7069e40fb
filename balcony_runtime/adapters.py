"""Balcony adapters on disk: ``balcony.json`` (what they are) plus ``balcony.safetensors`` (weights).

Only safetensors is ever read (no pickle). Adapters record the backbone they were trained on (its
identity and weight fingerprint) and are refused on any other backbone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from balcony_runtime.errors import AdapterError

META_FILE = "balcony.json"
WEIGHTS_FILE = "balcony.safetensors"
FORMAT_VERSION = 2  # 2: a balcony may hold a lens map (lens.weight [H, H], lens.bias [H])
READABLE_VERSIONS = (1, 2)  # version 1 (no lens maps) reads unchanged


@dataclass
class AdapterMeta:
    backbone_identity: str  # the backbone's name (hub id, alias or path)
    backbone_fingerprint: str  # backbone_checkpoint.fingerprint of its weights
    num_layers: int  # the backbone's depth
    exits: list[int]  # balcony exit layers, ascending
    dtype: str  # dtype the weights are stored in, e.g. "float16"
    training: dict = field(default_factory=dict)  # free-form: command, tokens seen, wall time, recipe
    evaluation: dict = field(default_factory=dict)  # free-form: per-exit quality table
    format_version: int = FORMAT_VERSION


def balcony_tensor_name(exit_layer: int, hf_name: str) -> str:
    return f"balcony.{exit_layer}.{hf_name}"


def save_adapters(
    directory: Path, meta: AdapterMeta, balconies: dict[int, dict[str, torch.Tensor]], dtype: torch.dtype
) -> None:
    """Write adapters: ``balconies`` maps an exit layer to its tensors under transformers names
    (``input_layernorm.weight``, ``self_attn.q_proj.weight``, ..., ``norm.weight``, and for a balcony
    with a lens map ``lens.weight`` / ``lens.bias``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        balcony_tensor_name(k, name): t.detach().to("cpu", dtype).contiguous()
        for k, named in balconies.items()
        for name, t in named.items()
    }
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "balcony", "version": str(FORMAT_VERSION)})
    (directory / META_FILE).write_text(json.dumps(asdict(meta), indent=2) + "\n")


def load_adapters(directory: Path) -> tuple[AdapterMeta, dict[int, dict[str, torch.Tensor]]]:
    """Read adapters, with a clear AdapterError for anything missing or corrupt."""
    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise AdapterError(f"adapters at {directory} are incomplete: {p.name} is missing")
    try:
        raw = json.loads(meta_path.read_text())
        meta = AdapterMeta(**raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise AdapterError(f"{meta_path} is not a valid balcony.json: {exc}") from exc
    if meta.format_version not in READABLE_VERSIONS:
        raise AdapterError(
            f"{meta_path} has format version {meta.format_version}; this build reads {list(READABLE_VERSIONS)}"
        )
    try:
        flat = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights_path} is corrupt or not a safetensors file: {exc}") from exc
    balconies: dict[int, dict[str, torch.Tensor]] = {k: {} for k in meta.exits}
    for key, tensor in flat.items():
        prefix, exit_text, name = key.split(".", 2)
        if prefix != "balcony" or not exit_text.isdigit() or int(exit_text) not in balconies:
            raise AdapterError(f"{weights_path} holds unexpected tensor {key!r}")
        balconies[int(exit_text)][name] = tensor
    return meta, balconies


def check_backbone(meta: AdapterMeta, identity: str, fingerprint: str, num_layers: int, directory) -> None:
    """Refuse adapters trained on another backbone."""
    if meta.backbone_fingerprint != fingerprint or meta.num_layers != num_layers:
        raise AdapterError(
            f"adapters at {directory} were made for backbone {meta.backbone_identity!r} "
            f"({meta.num_layers} layers, weights {meta.backbone_fingerprint[:12]}), not for the loaded "
            f"{identity!r} ({num_layers} layers, weights {fingerprint[:12]})"
        )
