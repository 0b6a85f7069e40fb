"""Read a LLaMA checkpoint's tensors from safetensors and fingerprint them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from balcony_runtime.errors import ModelSourceError


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, on CPU, in its stored dtype."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"{path} holds no .safetensors weights (pickle checkpoints are not loaded)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A checksum of a backbone's weights that is cheap even for billions of parameters.

    Hashes every tensor's name, shape and dtype, and the bytes of a fixed strided sample of up to
    4096 of its elements: two different checkpoints of one architecture differ in nearly every
    element, so the sample tells them apart while reading a few MB instead of the whole model.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.reshape(-1)
        step = max(1, flat.numel() // 4096)
        digest.update(flat[::step].float().numpy().tobytes())
    return digest.hexdigest()
