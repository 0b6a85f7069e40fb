"""Training throughput of `balcony train` and where a step's time goes.

    python bench/training_throughput.py [--threads 1] [--steps 2] [--batch 4] [--seq-len 512]

Times one optimizer step's parts on random tokens with the default model: the frozen backbone's
forward, the balconies' forward, the LM head + KL (teacher and students, forward and gradient), and
the balconies' backward, in fp32 and in bf16 autocast; then a whole fp32 step under each training
objective (the KL and the head-free Fisher metric, `balcony train --objective`). Prints Markdown
tables and writes them to docs/training_throughput.md.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch


def time_step(model, ids, exits, amp, head_weight, chunk):
    from balcony_runtime.training.dense_forward import backbone_pass, balcony_normed, final_normed
    from balcony_runtime.training.loss import student_chunk, teacher_chunk

    times = {}
    t = time.perf_counter()
    with amp():
        states = backbone_pass(model, ids, set(exits))
    times["backbone"] = time.perf_counter() - t
    t = time.perf_counter()
    with amp():
        students = {k: balcony_normed(model, k, states) for k in exits}
    times["balconies fwd"] = time.perf_counter() - t
    t = time.perf_counter()
    grads = {k: torch.empty(s.shape) for k, s in students.items()}
    with amp(), torch.no_grad():
        teacher = final_normed(model, *states.final)
        for start in range(0, teacher.shape[0], chunk):
            rows = slice(start, start + chunk)
            teacher_part = teacher_chunk(model, teacher[rows], head_weight)
            for k in exits:
                _, grads[k][rows] = student_chunk(model, students[k][rows], teacher_part, head_weight, 1e-6)
    times["head + KL"] = time.perf_counter() - t
    t = time.perf_counter()
    torch.autograd.backward([students[k] for k in exits], [grads[k].to(students[k].dtype) for k in exits])
    times["balconies bwd"] = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    return times


def time_objective(model, ids, exits, objective: str, chunk: int) -> tuple[float, float]:
    """(backbone s, loss + balconies forward and backward s) of one fp32 step under ``objective``."""
    from balcony_runtime.training.dense_forward import backbone_pass
    from balcony_runtime.training.head_free import fisher_metric, head_free_loss
    from balcony_runtime.training.loss import distillation_loss

    metric = None if objective == "kl" else fisher_metric(model, [ids[:1, :64]], chunk)[0]
    t = time.perf_counter()
    states = backbone_pass(model, ids, set(exits))
    backbone = time.perf_counter() - t
    t = time.perf_counter()
    if metric is None:
        distillation_loss(model, states, exits, chunk, 1e-6)
    else:
        head_free_loss(model, states, exits, metric, 1e-6)
    rest = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    return backbone, rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per precision (after one warm-up)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--kl-chunk", type=int, default=512)
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="which of fp32 and bf16 autocast to time part by part (bf16 is slow where the CPU lacks it)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "training_throughput.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from balcony_runtime.loader import load_model

    loaded = load_model("smollm2-135m", adapters=None, dtype="float32", device="cpu")
    model, exits = loaded.model, loaded.model.exits
    for p in model.balconies.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, model.arch.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    tokens = ids.numel()
    rows = []
    precisions = {
        "fp32": ("fp32", contextlib.nullcontext, None),
        "bf16": ("bf16 autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16), model.lm_head.detach().bfloat16()),
    }
    for name, amp, head in (precisions[p] for p in args.precisions.split(",")):
        time_step(model, ids, exits, amp, head, args.kl_chunk)  # warm-up
        runs = [time_step(model, ids, exits, amp, head, args.kl_chunk) for _ in range(args.steps)]
        parts = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        total = sum(parts.values())
        rows.append([name, f"{tokens / total:,.0f}"] + [f"{v:.2f} ({v / total:.0%})" for v in parts.values()])
        print(name, {k: round(v, 2) for k, v in parts.items()}, flush=True)
    header = ["precision", "tokens/s", *(f"{k} s" for k in runs[0])]
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    objective_rows = []
    for objective in ("kl", "fisher"):
        time_objective(model, ids, exits, objective, args.kl_chunk)  # warm-up
        runs = [time_objective(model, ids, exits, objective, args.kl_chunk) for _ in range(args.steps)]
        backbone, rest = (sum(r[i] for r in runs) / len(runs) for i in range(2))
        objective_rows.append(f"| {objective} | {tokens / (backbone + rest):,.0f} | {backbone:.2f} | {rest:.2f} |")
        print(objective, round(backbone, 2), round(rest, 2), flush=True)
    table += ("\n\nA whole fp32 step per objective (the loss includes the balconies' forward and backward):\n\n"
              "| objective | tokens/s | backbone s | loss s |\n|---|---|---|---|\n" + "\n".join(objective_rows))
    text = (f"# Training throughput\n\nDefault model, exits {', '.join(map(str, exits))}, {args.batch} x {args.seq_len} "
            f"tokens a step, {args.threads} CPU thread(s), one optimizer step's parts (mean of {args.steps}).\n"
            f"Produced by `python bench/training_throughput.py --threads {args.threads}`.\n\n{table}\n")
    print(table)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
