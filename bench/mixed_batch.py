"""Cost of a mixed-depth decode step against homogeneous ones.

    python bench/mixed_batch.py [--dtype auto] [--batches 1 4 16 64] [--context 64] [--steps 9] [--rounds 3]
                                [--threads 1] [--out docs/benchmarks.md]

For each batch size, three compositions of decode rows, each row with ``--context`` tokens cached:
all at full depth, spread evenly over every exit (4-way mixed for the default model: 8/15/22/full),
and all at the shallowest exit. The figure is the median of ``--steps`` timed engine steps (schedule,
forward, sampling); "mixed / full" is the goal's ratio: a mixed step should cost no more than the
same rows at its deepest exit.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from balcony_runtime.decode_benchmark import machine_line
from balcony_runtime.engine import EngineConfig, LLMEngine
from balcony_runtime.loader import load_model
from balcony_runtime.sampling_params import SamplingParams


def median_decode_step(engine: LLMEngine, exits: list[int], context: int, steps: int) -> float:
    """Median seconds of a decode step whose rows sit at ``exits``, ``context`` tokens cached each."""
    params = SamplingParams(max_tokens=steps + 3, temperature=0, ignore_eos=True)
    ids = [engine.add_request([1000 + (r * 7 + i) % 4000 for i in range(context)], params, e)
           for r, e in enumerate(exits)]
    while any(engine.request_needs_prefill(rid) for rid in ids):
        engine.step()
    engine.step()  # with overlapped steps (on a GPU) this one waits for the prefill: not timed
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():  # an overlapped step still in flight
        engine.step()
    return statistics.median(times)


def compositions(exits: tuple[int, ...], batch: int) -> dict[str, list[int]]:
    return {
        "all full": [exits[-1]] * batch,
        f"{len(exits)}-way mixed": [exits[r % len(exits)] for r in range(batch)],
        f"all exit {exits[0]}": [exits[0]] * batch,
    }


def run(dtype: str, batches: list[int], context: int, steps: int, rounds: int) -> str:
    loaded = load_model(adapters=None, dtype=dtype, device="cpu")
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=max(batches), max_num_batched_tokens=max(512, context * 8)))
    median_decode_step(engine, [engine.exits[-1]] * 4, context, 3)  # warm-up
    dtype = str(loaded.model.dtype).removeprefix("torch.")
    lines = [f"Mixed-depth decode step, {dtype}, context {context}, median of {rounds} rounds of {steps} steps; "
             f"{machine_line(loaded, context)}", "",
             "| batch | composition | step ms | / all full |", "|---|---|---|---|"]
    for batch in batches:
        # Compositions measured in turn, ``rounds`` times over: a burst of other load on the machine
        # then hits every composition alike instead of one.
        runs: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name, exits in compositions(engine.exits, batch).items():
                runs.setdefault(name, []).append(median_decode_step(engine, exits, context, steps))
        rows = {name: statistics.median(times) for name, times in runs.items()}
        full = rows["all full"]
        lines += [f"| {batch} | {name} | {1e3 * s:.1f} | {s / full:.2f} |" for name, s in rows.items()]
    return "\n".join(lines)


def main() -> None:
    from decode_throughput import write_section  # bench/ is on sys.path when run as a script

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto", help="as `balcony serve --dtype` (default %(default)s)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=3, help="times each composition is measured, in turn")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = run(args.dtype, args.batches, args.context, args.steps, args.rounds)
    print(table)
    command = (f"python bench/mixed_batch.py --dtype {args.dtype} --batches {' '.join(map(str, args.batches))} "
               f"--context {args.context} --steps {args.steps} --rounds {args.rounds}" + (f" --threads {args.threads}" if args.threads else ""))
    write_section(args.out, "mixed-batch", table, command)


if __name__ == "__main__":
    main()
