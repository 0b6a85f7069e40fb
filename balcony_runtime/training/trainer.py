"""The self-distillation loop: frozen backbone once per batch, balconies trained on forward KL.

One process, or data-parallel under torchrun (same command): each process takes every world-th
sequence of the same packed stream, gradients are averaged with one all-reduce per optimizer step
(gloo on CPU, nccl on GPU). The balconies are small (one layer each), so every process holds all of
them and the frozen backbone; no sharding is needed at these sizes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from balcony_runtime.adapters import AdapterMeta, load_adapters, save_adapters
from balcony_runtime.loader import LoadedModel, balcony_state, load_model
from balcony_runtime.training.checkpoint import (
    CHECKPOINT_DIR, load_checkpoint, named_balcony_parameters, save_checkpoint,
)
from balcony_runtime.training.config import TrainConfig
from balcony_runtime.training.data import DataError, training_stream
from balcony_runtime.training.dense_forward import backbone_pass
from balcony_runtime.training.head_free import fisher_metric, head_free_loss, logits_metric
from balcony_runtime.training.lens import apply_lens, fit_lens
from balcony_runtime.training import repeat_marks
from balcony_runtime.training.loss import PositionTargets, TeacherPenalty, distillation_loss
from balcony_runtime.weight_format import DTYPES

LENS_REPORT = "lens_fit.json"  # the closed-form fit's report, beside the checkpoint
METRIC_FILE = "head_free_metric.pt"  # a head-free objective's [H, H] metric and its report, reused on resume


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up over warmup_fraction of the steps (at least one), then cosine decay to 0."""
    warmup = max(1, math.ceil(config.warmup_fraction * total_steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def precision(config: TrainConfig, model, device: torch.device):
    """(autocast context factory, bf16 copy of the LM head or None) for config.autocast.

    bf16 (or auto where the device has native bf16: CUDA with bf16, CPUs with AVX512-BF16 / AMX):
    autocast of the whole step, and the frozen LM head converted once instead of at every chunk.
    Measured on one core of this project's CPU, 4 x 512 tokens: backbone 3.6 s against 6.3 s in fp32.
    off: fp32 throughout.
    """
    if config.autocast == "bf16" or (config.autocast == "auto" and bf16_native(device)):
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), model.lm_head.detach().to(torch.bfloat16)
    return contextlib.nullcontext, None


def bf16_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Distributed:
    """torchrun's environment, or one process."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # torch.cuda.set_device takes only an indexed device ("cuda" alone raises): a plain
            # --device cuda means this process's own GPU.
            self.device = torch.device("cuda", local_rank if self.world > 1 else torch.cuda.current_device())
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def average(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors across processes, in place, with one flat all-reduce."""
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.flatten() for t in tensors]).to(self.device)
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class StopFlag:
    """First Ctrl-C / SIGTERM: finish the current step, checkpoint, exit. Second: stop at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self.previous:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nbalcony train: stopping after this step (Ctrl-C again to abort without saving)", file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def prepare_model(config: TrainConfig, device: torch.device) -> LoadedModel:
    # init_from: the adapters' own exits and weights (load_model refuses adapters of another backbone).
    loaded = load_model(config.model, adapters=config.init_from, exits=None if config.init_from else config.exits,
                        dtype="float32", device=str(device))
    if config.init_from and config.exits and tuple(config.exits) != tuple(loaded.model.exits):
        raise ValueError(f"--exits {list(config.exits)} differ from the exits {list(loaded.model.exits)} "
                         f"of the adapters in {config.init_from}")
    model = loaded.model
    if config.init == "random":
        torch.manual_seed(config.seed)
        for k in model.exits:
            model.balconies[str(k)].init_from_backbone(model.layers, random=True)
    if config.balcony_mlp_width is not None:
        generator = torch.Generator().manual_seed(config.seed)  # the same new units in every process
        for k in model.exits:
            model.balconies[str(k)].widen_mlp(config.balcony_mlp_width, generator)
    for _, p in named_balcony_parameters(model):
        p.requires_grad_(True)
    return loaded


def init_lens(config: TrainConfig, loaded: LoadedModel, stream, output: Path, env, log) -> None:
    """--init lens: fit the balconies' lens maps in closed form over config.lens_tokens of the training
    stream (from first_sequence), or, when resuming, give them empty maps for the checkpoint to fill."""
    model = loaded.model
    if config.resume and (output / CHECKPOINT_DIR / "state.json").is_file():
        for k in model.exits:
            b = model.balconies[str(k)]
            b.set_lens(torch.zeros(model.arch.hidden_size, model.arch.hidden_size), torch.zeros(model.arch.hidden_size))
    else:
        mb, seq_len = config.micro_batch_size, config.data.seq_len
        batches_needed = max(1, math.ceil(config.lens_tokens / (mb * seq_len)))
        batches = (stream.batch(config.first_sequence + i * mb, mb).to(env.device) for i in range(batches_needed))
        amp, _ = precision(config, model, env.device)
        fit = fit_lens(model, batches, model.exits, config.lens_heldout_every, amp=amp, log=log,
                       weighting=config.lens_weighting)
        apply_lens(model, fit, config.lens_norm)
        fit.report.update({"norm": config.lens_norm, "autocast_bf16": amp is not contextlib.nullcontext,
                           "first_sequence": config.first_sequence, "sequences": batches_needed * mb})
        if env.rank == 0:
            (output / LENS_REPORT).write_text(json.dumps(fit.report, indent=1) + "\n")
        lam = ", ".join(f"{k}: {v['lambda']:g}" for k, v in fit.report["exits"].items())
        log(f"lens fit: {fit.report['fit_tokens']:,} + {fit.report['heldout_tokens']:,} held-out tokens, "
            f"{fit.report['wall_s']} s; ridge lambda per exit {lam}")
    for _, p in named_balcony_parameters(model):
        p.requires_grad_(True)


def head_free_metric(config: TrainConfig, model, stream, output: Path, env, log) -> torch.Tensor | None:
    """The [H, H] metric of a head-free objective (None for the KL): estimated once, saved beside
    the checkpoint, and read back on resume so a resumed run optimises the same loss."""
    if config.objective == "kl":
        return None
    path = output / METRIC_FILE
    if config.resume and path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["objective"] == config.objective:
            return saved["metric"]
    t = time.perf_counter()
    if config.objective == "logits":
        metric, tokens = logits_metric(model), 0
    else:
        mb, seq_len = config.micro_batch_size, config.data.seq_len
        batches = (stream.batch(config.first_sequence + i * mb, mb).to(env.device)
                   for i in range(max(1, math.ceil(config.metric_tokens / (mb * seq_len)))))
        metric, tokens = fisher_metric(model, batches, config.kl_chunk)
    eig = torch.linalg.eigvalsh(metric)
    report = {"objective": config.objective, "tokens": tokens, "wall_s": round(time.perf_counter() - t, 1),
              "trace": float(eig.sum()), "top_eigenvalue": float(eig[-1]), "min_eigenvalue": float(eig[0])}
    log(f"{config.objective} metric: {tokens:,} teacher tokens, {report['wall_s']} s, trace {report['trace']:.3g}")
    if env.rank == 0:
        torch.save({"objective": config.objective, "metric": metric, "report": report}, path)
    return metric


def position_targets_of(stream, first: int, config: TrainConfig, env, ids: torch.Tensor) -> PositionTargets | None:
    """The KL mask and unlikelihood tokens of one micro-batch, when the data marks the exits' loops."""
    marks = stream.marks_batch(first, config.micro_batch_size, env.rank, env.world)
    if marks is None:
        return None
    marks = marks.to(env.device)
    kl_keep, unlikely = repeat_marks.position_targets(ids, marks, config.teacher_in_loops)
    penalty = None
    if config.teacher_frequency_penalty:
        penalty = TeacherPenalty(*repeat_marks.answer_counts(ids, marks), config.teacher_frequency_penalty)
    return PositionTargets(kl_keep, unlikely, config.unlikelihood_weight, config.unlikely_anchor, penalty)


def train(config: TrainConfig, loaded: LoadedModel | None = None, log=print) -> dict:
    """Run (or resume) training; returns the final trainer state. Exports adapters when the schedule ends."""
    env = Distributed(config.device)
    output = Path(config.output_dir)
    if env.rank == 0:
        output.mkdir(parents=True, exist_ok=True)
    loaded = loaded or prepare_model(config, env.device)
    model, exits = loaded.model, loaded.model.exits
    if config.data.seq_len > loaded.max_model_len:
        raise DataError(f"sequence length {config.data.seq_len} exceeds the model's {loaded.max_model_len} positions")
    stream = training_stream(config.data, loaded.tokenizer)
    if config.init == "lens" and not config.init_from:
        init_lens(config, loaded, stream, output, env, log)

    seq_len = config.data.seq_len
    sequences_per_step = config.micro_batch_size * config.grad_accum * env.world
    tokens_per_step = sequences_per_step * seq_len
    total_steps = config.max_steps if config.max_steps is not None else math.ceil(config.total_tokens / tokens_per_step)
    params = [p for _, p in named_balcony_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)

    state = {"step": 0, "tokens_seen": 0, "sequences_consumed": 0, "wall_s": 0.0,
             "total_steps": total_steps, "tokens_per_step": tokens_per_step, "exits": list(exits)}
    if config.resume:
        restored = load_checkpoint(output, model, optimizer)
        if restored is not None:
            if restored["tokens_per_step"] != tokens_per_step or restored["total_steps"] != total_steps:
                raise ValueError(
                    f"checkpoint in {output} is for {restored['total_steps']} steps of {restored['tokens_per_step']} "
                    f"tokens, not {total_steps} of {tokens_per_step}; use a new output directory"
                )
            state.update(restored)
            log(f"resumed from step {state['step']} ({state['tokens_seen']:,} tokens)")

    amp, head_weight = precision(config, model, env.device)
    metric = head_free_metric(config, model, stream, output, env, log)
    grad_scale = 1.0 / (config.micro_batch_size * seq_len * len(exits) * config.grad_accum)
    log_path = output / "log.jsonl"
    stop_at = min(total_steps, config.stop_after or total_steps)
    window = {"t0": time.perf_counter(), "tokens": 0, "backbone_s": 0.0, "loss": {k: 0.0 for k in exits}, "steps": 0}
    wall_at_start = state["wall_s"]
    run_start = time.perf_counter()

    def checkpoint() -> None:
        state["wall_s"] = wall_at_start + time.perf_counter() - run_start
        if env.rank == 0:
            save_checkpoint(output, model, optimizer, state)
        env.barrier()

    with StopFlag() as stop:
        while state["step"] < stop_at:
            step = state["step"]
            base = config.first_sequence + step * sequences_per_step
            sums = {k: torch.zeros(()) for k in exits}
            for a in range(config.grad_accum):
                first = base + a * config.micro_batch_size * env.world
                ids = stream.batch(first, config.micro_batch_size, env.rank, env.world).to(env.device)  # [b, S]
                targets = position_targets_of(stream, first, config, env, ids)
                t = time.perf_counter()
                with amp():
                    states = backbone_pass(model, ids, set(exits))
                window["backbone_s"] += time.perf_counter() - t
                with amp():
                    if metric is None:
                        micro = distillation_loss(model, states, exits, config.kl_chunk, grad_scale, head_weight,
                                                  config.reverse_kl_weight, targets)
                    else:
                        micro = head_free_loss(model, states, exits, metric, grad_scale)
                for k in exits:
                    sums[k] += micro[k]
            env.average([p.grad for p in params])
            losses = torch.stack([sums[k] for k in exits]) / (config.micro_batch_size * seq_len * config.grad_accum)
            env.average([losses])
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
            lr = lr_at(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            state["step"] = step + 1
            state["sequences_consumed"] = (step + 1) * sequences_per_step
            state["tokens_seen"] = (step + 1) * tokens_per_step
            window["tokens"] += tokens_per_step
            window["steps"] += 1
            for k, v in zip(exits, losses.tolist()):
                window["loss"][k] += v
            done = state["step"] == stop_at
            if state["step"] % config.log_every == 0 or done:
                elapsed = time.perf_counter() - window["t0"]
                tok_s = window["tokens"] / elapsed
                record = {
                    "step": state["step"], "total_steps": total_steps, "tokens_seen": state["tokens_seen"],
                    "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tok_s,
                    "backbone_fraction": window["backbone_s"] / elapsed,  # share of wall time in the frozen forward
                    "loss": {str(k): window["loss"][k] / window["steps"] for k in exits},
                    "eta_s": (total_steps - state["step"]) * tokens_per_step / tok_s,
                    "time": time.time(),
                }
                if env.rank == 0:
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    label = ("mixed-kl" if config.reverse_kl_weight else
                             "kl+unlikely" if config.unlikelihood_weight else config.objective)
                    loss_text = " ".join(f"{label}@{k} {v:.3f}" for k, v in record["loss"].items())
                    log(f"step {state['step']}/{total_steps} | {state['tokens_seen']:,} tok | {tok_s:,.0f} tok/s | "
                        f"{loss_text} | lr {lr:.2e} | backbone {record['backbone_fraction']:.0%} | "
                        f"ETA {format_seconds(record['eta_s'])}")
                window = {"t0": time.perf_counter(), "tokens": 0, "backbone_s": 0.0,
                          "loss": {k: 0.0 for k in exits}, "steps": 0}
            if config.snapshot_every and state["step"] % config.snapshot_every == 0 and env.rank == 0:
                state["wall_s"] = wall_at_start + time.perf_counter() - run_start
                export_adapters(loaded, config, state, output / "snapshots" / f"step-{state['step']}")
            stopping = env.any(stop.requested)
            if state["step"] % config.save_every == 0 or done or stopping:
                checkpoint()
            if stopping:
                log(f"stopped at step {state['step']}; checkpoint saved in {output / 'checkpoint'}")
                return state
        if state["step"] >= total_steps and env.rank == 0:
            export_adapters(loaded, config, state, output / "adapters")
            log(f"adapters written to {output / 'adapters'}")
        env.barrier()
    return state


def export_adapters(loaded: LoadedModel, config: TrainConfig, state: dict, directory: Path,
                    evaluation: dict | None = None) -> None:
    training = {
        "command": config.command,
        "recipe": {k: v for k, v in asdict(config).items() if k not in ("command", "extra_meta", "output_dir")},
        "tokens_seen": state["tokens_seen"],
        "steps": state["step"],
        "wall_s": round(state["wall_s"], 1),
        **prior_training(config, state),
        **lens_report(config),
        **metric_report(config),
        **config.extra_meta,
    }
    meta = AdapterMeta(
        backbone_identity=loaded.identity, backbone_fingerprint=loaded.fingerprint,
        num_layers=loaded.model.full_depth, exits=list(loaded.model.exits), dtype=config.adapter_dtype,
        training=training, evaluation=evaluation or {},
    )
    save_adapters(directory, meta, balcony_state(loaded.model), DTYPES[config.adapter_dtype])


def lens_report(config: TrainConfig) -> dict:
    path = Path(config.output_dir) / LENS_REPORT
    if config.init != "lens" or config.init_from or not path.is_file():
        return {}
    return {"lens_fit": json.loads(path.read_text())}


def metric_report(config: TrainConfig) -> dict:
    path = Path(config.output_dir) / METRIC_FILE
    if config.objective == "kl" or not path.is_file():
        return {}
    return {"head_free_metric": torch.load(path, weights_only=True)["report"]}


def prior_training(config: TrainConfig, state: dict) -> dict:
    """For a warm start: what the starting adapters had already seen, so totals stay honest."""
    if not config.init_from:
        return {}
    before, _ = load_adapters(Path(config.init_from))
    seen, wall = before.training.get("tokens_seen_total", before.training.get("tokens_seen", 0)), \
        before.training.get("wall_s_total", before.training.get("wall_s", 0.0))
    start = {"adapters": str(config.init_from), "command": before.training.get("command", ""),
             "tokens_seen": seen, "wall_s": wall}
    if "lens_fit" in before.training:  # a closed-form start: its fit report travels with the adapters
        start["lens_fit"] = before.training["lens_fit"]
    # a chain of warm starts (or adapters composed per exit, bench/compose_adapters.py): every
    # command stays on record
    for key in ("initialised_from", "base", "exits_taken"):
        if key in before.training:
            start[key] = before.training[key]
    return {"initialised_from": start,
            "tokens_seen_total": seen + state["tokens_seen"],
            "wall_s_total": round(wall + state["wall_s"], 1)}


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
