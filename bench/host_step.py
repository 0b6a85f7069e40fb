"""Host milliseconds per decode step (the model's forward stubbed), now and at an older revision.

    python bench/host_step.py                       # the default shapes, this checkout
    python bench/host_step.py --baseline HEAD       # and the step's host side of HEAD, a step of each in turn
    python bench/host_step.py --shape 64x256 --steps 50
    python bench/host_step.py --device-ms 1 --device-ms 4    # and on a simulated device, overlapped or not
    python bench/host_step.py --fresh-pool          # blocks from a never-used pool (default: a served one)
    python bench/host_step.py --aligned             # every row at the same context (the median step takes no new block)
    python bench/host_step.py --default-gc          # and with CPython's default collector threshold, a step of each in turn
    python bench/host_step.py --queued 1000         # with 1,000 requests waiting behind the full batch
    python bench/host_step.py --mixed               # rows at full depth and every exit in turn
    python bench/host_step.py --graphs              # and through decode graphs (a GPU's path), replays no-ops

Prints a markdown table: median milliseconds per engine.step(), as CPU time of the stepping thread
(the host work, robust to a busy machine) and as wall time, and the CPU time of each phase
(schedule, prepare, forward stub, sample, postprocess with detokenization), the phases timed in
steps of their own between the steps timed whole, so their timers are not counted in the step. See balcony_runtime/host_step_benchmark.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from balcony_runtime.host_step_benchmark import (HostStepRun, every_depth, measure_host_step,  # noqa: E402
                                                  measure_interleaved)
from balcony_runtime.loader import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ((64, 256), (256, 1024), (256, 4096))
# The step's host side, loaded in this order (each file's imports of the ones before it rewritten).
OLD_FILES = ("request", "sampler", "detokenizer", "input_batch", "prefix_cache", "block_manager", "model.decode_graphs",
             "model_runner", "scheduler", "request_output", "plain_outputs", "engine")


def _old_name(name: str) -> str:
    return "_old_" + name.replace(".", "_")


def old_modules(revision: str) -> dict[str, types.ModuleType]:
    """The engine of ``revision`` with its requests, scheduler, block manager and prefix cache,
    runner, batch state, sampler and detokenizer, as standalone modules, each importing the others'
    old versions (the rest of the package is this checkout's)."""
    modules: dict[str, types.ModuleType] = {}
    for name in OLD_FILES:
        path = f"balcony_runtime/{name.replace('.', '/')}.py"
        shown = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode and name in ("input_batch", "request_output", "plain_outputs", "model.decode_graphs"):
            continue  # a revision from before the persistent batch state, or with its outputs in engine.py
        shown.check_returncode()
        source = shown.stdout
        for dep in modules:
            source = source.replace(f"from balcony_runtime.{dep} import", f"from {_old_name(dep)} import")
        spec = importlib.util.spec_from_loader(_old_name(name), loader=None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_old_name(name)] = module
        exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
        modules[name] = module
    return modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="ROWSxCONTEXT (repeatable; default the three goal shapes)")
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed per shape (median reported)")
    parser.add_argument("--vocab", type=int, default=512, help="width of the stub's logits")
    parser.add_argument("--baseline", help="git revision whose step code (OLD_FILES: engine, scheduler, block pool, "
                                           "runner, batch state, sampler, ...) to time as well, a step of each in turn")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--default-gc", action="store_true",
                        help="also time this checkout with CPython's default young-generation threshold (700) "
                             "instead of the serving process's (balcony_runtime/heap.py), a step of each in turn")
    parser.add_argument("--queued", type=int, default=0,
                        help="requests waiting behind the full batch during the timed steps (a burst's queue)")
    parser.add_argument("--fresh-pool", action="store_true",
                        help="time on a never-used block pool (default: one that has served a wave of other "
                             "prompts, its blocks cached prefixes nobody holds, as a running server's)")
    parser.add_argument("--aligned", action="store_true",
                        help="every row at the same context, so all reach a new block in one step every 16 "
                             "(default: contexts spread over a block, about one row in 16 reaching a new "
                             "block each step, as in serving)")
    parser.add_argument("--device-ms", type=float, action="append",
                        help="also time each shape on a simulated device taking this long per step, steps "
                             "synchronous and overlapped (repeatable); prints a second table")
    parser.add_argument("--graphs", action="store_true",
                        help="also time decode steps through decode graphs, as on a GPU (the baseline's too), each "
                             "replay a no-op: the forward column is then the host work around the replays "
                             "(on a CPU the static buffers' fills are memory copies a GPU would do itself)")
    parser.add_argument("--mixed", action="store_true",
                        help="row i at full depth and each exit in turn (i mod 1 + exits), a mixed-depth batch "
                             "as budgets route it (default: every row at full depth)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shape] if args.shape else SHAPES
    loaded = load_model("smollm2-135m", adapters=None, dtype="float32", device="cpu")
    # (label, old modules, young-generation threshold, decode graphs)
    versions = [("this checkout", None, None, False)]
    baseline = old_modules(args.baseline) if args.baseline else None
    if baseline is not None:
        versions.insert(0, (args.baseline, baseline, None, False))
    if args.default_gc:
        versions.insert(0, ("this checkout, gc threshold 700", None, 700, False))
    if args.graphs:
        versions.append(("this checkout, decode graphs", None, None, True))
        if baseline is not None:
            versions.insert(versions.index((args.baseline, baseline, None, False)) + 1,
                            (f"{args.baseline}, decode graphs", baseline, None, True))
    depths = every_depth(loaded) if args.mixed else None
    pool = "a fresh block pool" if args.fresh_pool else "a block pool that served a wave of other prompts first"
    pool += ", every row at the same context" if args.aligned else ", contexts spread over a block (context - i mod 16)"
    print(f"{loaded.identity}, {loaded.model.num_cache_layers} cache layers, block size 16, greedy, "
          f"stub vocab {args.vocab}, {args.steps} decode steps, torch {torch.__version__}, {args.threads} thread(s), "
          f"{pool}{f', {args.queued} requests queued behind the batch' if args.queued else ''}"
          f"{f', rows at depths {depths} in turn' if depths else ''}\n")
    print("| code | rows x context | step CPU ms | step wall ms | schedule | prepare | forward stub | sample | postprocess |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rows, context in shapes:
        runs = [HostStepRun(loaded, rows, context, steps=args.steps, vocab=args.vocab,
                            engine_module=None if modules is None else modules["engine"],
                            recycled=not args.fresh_pool, queued=args.queued, aligned=args.aligned,
                            young_threshold=threshold, graphs=graphs, exit_layer=depths)
                for _, modules, threshold, graphs in versions]
        # One step of each version in turn: the machine's drift slows both alike.
        for (label, *_), r in zip(versions, measure_interleaved(runs, args.steps)):
            p = r.phase_ms
            print(f"| {label} | {rows} x {context} | {r.step_cpu_ms:.3f} | {r.step_ms:.3f} | {p['schedule']:.3f} | {p['prepare']:.3f} | "
                  f"{p['forward']:.3f} | {p['sample']:.3f} | {p['postprocess']:.3f} |", flush=True)
    if not args.device_ms:
        return
    print("\nOn a simulated device (each step occupies it for the given time, one after another; reading a "
          "step's tokens waits for it), this checkout:\n")
    print("| rows x context | device ms/step | steps | host CPU ms/step | wall ms/step | device idle ms/step |")
    print("|---|---|---|---|---|---|")
    for rows, context in shapes:
        for device_ms in args.device_ms:
            for overlap in (False, True):
                r = measure_host_step(loaded, rows, context, steps=args.steps, vocab=args.vocab,
                                      device_ms=device_ms, overlap=overlap, recycled=not args.fresh_pool,
                                      aligned=args.aligned, exit_layer=depths)
                print(f"| {rows} x {context} | {device_ms:g} | {'overlapped' if overlap else 'synchronous'} | "
                      f"{r.step_cpu_ms:.3f} | {r.step_ms:.3f} | {r.device_idle_ms:.3f} |", flush=True)


if __name__ == "__main__":
    main()
