"""Training checkpoints without pickle: balconies and AdamW moments in safetensors, the rest in JSON.

    checkpoint/balconies.safetensors   fp32 balcony parameters, "<exit>.<parameter name>"
    checkpoint/optimizer.safetensors   AdamW exp_avg / exp_avg_sq under the same names
    checkpoint/state.json              step, data position, AdamW step count, schedule, timings

A checkpoint is written to a temporary folder and renamed over the previous one, so a crash while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from balcony_runtime.errors import BalconyError
from balcony_runtime.model.balcony_model import BalconyModel

CHECKPOINT_DIR = "checkpoint"


def named_balcony_parameters(model: BalconyModel) -> list[tuple[str, torch.nn.Parameter]]:
    """Balcony parameters in a fixed order: shallow exit first, module order within."""
    return [
        (f"{k}.{name}", p)
        for k in model.exits
        for name, p in model.balconies[str(k)].named_parameters()
    ]


def save_checkpoint(output_dir: Path, model: BalconyModel, optimizer: torch.optim.Optimizer, state: dict) -> Path:
    final = Path(output_dir) / CHECKPOINT_DIR
    tmp = final.with_name(CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    named = named_balcony_parameters(model)
    save_file({n: p.detach().float().cpu().contiguous() for n, p in named}, str(tmp / "balconies.safetensors"))
    moments, adam_steps = {}, set()
    for n, p in named:
        s = optimizer.state.get(p)
        if s:
            moments[f"{n}.exp_avg"] = s["exp_avg"].detach().cpu().contiguous()
            moments[f"{n}.exp_avg_sq"] = s["exp_avg_sq"].detach().cpu().contiguous()
            adam_steps.add(float(s["step"]))
    if moments:
        save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "adam_step": max(adam_steps, default=0.0)}, indent=2) + "\n")
    old = final.with_name(CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(output_dir: Path, model: BalconyModel, optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore balconies and optimizer from output_dir/checkpoint; returns its state, or None if absent."""
    path = Path(output_dir) / CHECKPOINT_DIR
    if not (path / "state.json").is_file():
        return None
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "balconies.safetensors"))
    named = named_balcony_parameters(model)
    if set(weights) != {n for n, _ in named}:
        raise BalconyError(f"checkpoint at {path} holds other balconies than exits {list(model.exits)}")
    moments = load_file(str(path / "optimizer.safetensors")) if (path / "optimizer.safetensors").is_file() else {}
    with torch.no_grad():
        for n, p in named:
            p.copy_(weights[n])
            if moments:
                optimizer.state[p] = {
                    "step": torch.tensor(state["adam_step"], dtype=torch.float32),
                    "exp_avg": moments[f"{n}.exp_avg"].to(p.device),
                    "exp_avg_sq": moments[f"{n}.exp_avg_sq"].to(p.device),
                }
    return state
