"""The ``balcony`` command: serve, generate, train, eval, bench.

Every option of every command can also come from an environment variable: ``--max-num-seqs`` reads
``BALCONY_MAX_NUM_SEQS`` when not given (the flag wins), so containers configure it all by env.
Every option's help ends with its default (as set by that variable, if it is) and its variable.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from balcony_runtime.model_source import DEFAULT_MODEL
from server.routing_headers import BUDGET_HEADER, EXIT_HEADER
from server.serve_options import SWITCH_ON, add_serve_options


def env_name(flag: str) -> str:
    return "BALCONY_" + flag.lstrip("-").replace("-", "_").upper()


class EnvDefaults(argparse.ArgumentParser):
    """An ArgumentParser whose options default to their BALCONY_* environment variables, and whose
    help gives every option's default."""

    def add_argument(self, *names, **kwargs):
        flags = [n for n in names if n.startswith("--")]
        if flags and kwargs.get("action") not in ("help", "version"):
            variable = env_name(flags[0])
            if variable in os.environ:
                raw = os.environ[variable]
                if kwargs.get("action") in ("store_true", "store_false"):  # the variable set true = the flag given
                    given = raw.lower() in SWITCH_ON
                    kwargs["default"] = given if kwargs["action"] == "store_true" else not given
                else:
                    convert = kwargs.get("type", str)
                    try:
                        kwargs["default"] = convert(raw)
                    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                        raise SystemExit(f"balcony: invalid {variable}={raw!r}: {exc}") from exc
            help_text = kwargs.get("help", "")
            kwargs["help"] = f"{help_text}{default_note(help_text, kwargs)} [env {variable}]".strip()
        return super().add_argument(*names, **kwargs)


def default_note(help_text: str, kwargs: dict) -> str:
    """" (default: X)" for an option's help, unless the help states its default already or the
    option is an on/off switch (off unless given)."""
    stated = "(default" in help_text.replace("%(default)", "")  # "(default 512)", "(default: all)"
    if stated or kwargs.get("action") in ("store_true", "store_false"):
        return ""
    if kwargs.get("default") in (None, ""):
        return " (default: none)"
    return " (default: %(default)s)"


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model source: alias, local HF directory, .gguf file or hub id; the first use of the "
                        "alias downloads and converts it once into $BALCONY_HOME, ~/.cache/balcony if unset")
    p.add_argument("--adapters", default="default",
                   help="balcony adapters directory; 'default' takes the shipped ones, 'none' fresh balconies")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="activations dtype, and the weights' unless --quantization packs them (auto: bfloat16 on GPUs; "
                        "on CPUs the faster of float32 and bfloat16 as measured at the first start, then cached)")
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "fp16", "bf16", "fp16+bf16", "int8"],
                   help="matrix format, CPU only: fp16 (fp16 weights, fp32 activations: FBGEMM, and the native "
                        "C product for steps of few rows where it builds), bf16 (bf16 "
                        "weights packed for oneDNN; each product rounds its input to bf16), fp16+bf16 (both: fp16 for "
                        "products of few rows, bf16 for many; twice the weight memory), int8 (weight-only int8 "
                        "per output channel: lossy), none (the dtype's); quality per exit in docs/benchmarks.md; "
                        "auto: with --dtype auto, the fastest of these as measured on this machine, the fp16+bf16 "
                        "crossover too (never int8); with an explicit --dtype, none")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (auto: cuda if present)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's maximum)")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV-cache blocks of 16 tokens x one layer (default: sized from memory)")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton", "native"],
                   help="kernel implementation (auto: Triton on CUDA; on a CPU the fused C loops of "
                        "kernels/native when a C compiler builds them, else torch ops)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on CUDA, run decode steps eagerly instead of replaying CUDA graphs (recorded at start-up "
                        "for up to 256 rows, one per depth segment, balcony and the head)")


def load_from_args(args):
    from balcony_runtime.loader import load_model

    adapters = None if args.adapters in ("none", "") else args.adapters
    return load_model(args.model, adapters=adapters, dtype=args.dtype, device=args.device,
                      kernel_backend=args.kernels, max_model_len=args.max_model_len,
                      quantization=args.quantization)


def cmd_generate(args) -> int:
    from balcony_runtime.engine import EngineConfig, LLMEngine
    from balcony_runtime.errors import BalconyError
    from balcony_runtime.model_source import balcony_home
    from balcony_runtime.routing.calibration_cache import CalibrationCache
    from balcony_runtime.sampling_params import SamplingParams
    from server.routing_headers import exit_name

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty)
        loaded = load_from_args(args)
        engine = LLMEngine(loaded, EngineConfig(num_kv_blocks=args.num_kv_blocks, enforce_eager=args.enforce_eager))
        # An instruct model answers a bare prompt with a continuation of it, not an answer: chat
        # unless asked otherwise, when the model has a template.
        has_template = bool(getattr(loaded.tokenizer, "chat_template", None))
        if args.chat and args.raw:
            raise ValueError("give --raw or --chat, not both")
        if args.chat and not has_template:
            raise ValueError("this model has no chat template: drop --chat (raw completion is what it does)")
        chat = has_template and not args.raw
        prompt = args.prompt
        if chat:
            prompt = loaded.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        prompt_ids = engine.tokenize(prompt)
        if args.budget_ms is not None:
            if args.exit is not None:
                raise ValueError("give --exit or --budget-ms, not both")
            print("balcony generate: step costs for the budget (a cached calibration if one fits, "
                  "else measured: a minute or two)...", file=sys.stderr)
            engine.calibrate(cache=CalibrationCache(balcony_home() / "calibration", reuse=not args.recalibrate))
        request_id = engine.add_request(prompt_ids, params, exit_layer=args.exit, budget_ms=args.budget_ms)
    except (BalconyError, ValueError) as exc:
        print(f"balcony generate: {exc}", file=sys.stderr)
        return 2
    route = engine.route_of(request_id)
    exit_layer = route.exit_layer if route is not None else engine.parse_exit(args.exit)
    if chat:
        mode = "chat: the prompt goes in the model's chat template (--raw for plain completion)"
    else:
        mode = "raw completion" + ("" if has_template else " (the model has no chat template)")
    print(f"balcony generate: exit {exit_name(exit_layer, engine.model.full_depth)} of "
          f"{engine.model.full_depth} layers, {mode}, prompt {len(prompt_ids)} tokens", file=sys.stderr)
    last = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request_id:
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
                last = out
    sys.stdout.write("\n")
    if last is not None:
        print(generation_summary(last, engine), file=sys.stderr)
    return 0


def generation_summary(out, engine) -> str:
    """One line for stderr: which exit ran, how long it took, and the budget's verdict."""
    from server.routing_headers import exit_name

    line = f"[exit {exit_name(out.exit_layer, engine.model.full_depth)}, {out.num_output_tokens} tokens, {1000 * (out.latency_s or 0):.0f} ms"
    route = out.route
    if route is not None and route.budget_ms is not None:
        verdict = "met" if out.budget_met else "missed"
        line += f", budget {route.budget_ms:.0f} ms {verdict} (predicted {route.predicted_ms:.0f} ms)"
    return line + "]"


def cmd_bench(args) -> int:
    from balcony_runtime.decode_benchmark import (
        hf_decode_rate, machine_line, markdown_header, markdown_rows, measure_exits,
    )
    from balcony_runtime.errors import BalconyError

    if args.host_only:
        return bench_host_only(args)
    try:
        loaded = load_from_args(args)
        rates = measure_exits(loaded, args.tokens, args.batch, enforce_eager=args.enforce_eager)
        hf_rate = hf_decode_rate(loaded, args.tokens) if args.against_transformers else None
    except (BalconyError, ValueError) as exc:
        print(f"balcony bench: {exc}", file=sys.stderr)
        return 2
    from balcony_runtime.weight_format import candidate_label

    dtype = candidate_label(loaded.model.dtype, loaded.model.quantization)  # e.g. "float32 + fp16 weights"
    print("\n".join([f"Decode, {machine_line(loaded, args.tokens)}", "", *markdown_header(args.batch),
                     *markdown_rows(dtype, rates, hf_rate, loaded.model.full_depth)]))
    return 0


def bench_host_only(args) -> int:
    """The host side of a decode step alone: the model's forward is a stub returning the right
    shapes; scheduling, input preparation, sampling and detokenization are real."""
    from balcony_runtime.errors import BalconyError
    from balcony_runtime.host_step_benchmark import every_depth, measure_host_step

    try:
        loaded = load_from_args(args)
        if args.device_ms < 0:
            raise ValueError(f"--device-ms must be >= 0, got {args.device_ms}")
        depths = every_depth(loaded) if args.mixed else None
        result = measure_host_step(loaded, args.rows, args.context, device_ms=args.device_ms,
                                   overlap=args.overlap, exit_layer=depths, graphs=args.graphs)
    except (BalconyError, ValueError) as exc:
        print(f"balcony bench: {exc}", file=sys.stderr)
        return 2
    phases = ", ".join(f"{phase} {ms:.2f}" for phase, ms in result.phase_ms.items())
    rows_at = f"; rows at depths {', '.join(map(str, depths))} in turn" if depths else ""
    path = "; decode graphs, replays stubbed" if args.graphs else ""
    print(f"host ms per decode step, {args.rows} rows x {args.context} tokens of context (row i: i mod 16 fewer; "
          f"forward stubbed{rows_at}{path}): "
          f"{result.step_cpu_ms:.2f} CPU, {result.step_ms:.2f} wall; per phase (CPU): {phases}")
    if args.device_ms:
        mode = "overlapped" if args.overlap else "synchronous"
        print(f"simulated device of {args.device_ms:g} ms per step, {mode} steps: "
              f"{result.step_ms:.2f} ms per step, the device idle {result.device_idle_ms:.2f} ms of it")
    return 0


def cmd_serve(args) -> int:
    from server.serve import serve

    return serve(args)


SERVE_EPILOG = f"""\
request headers the server reads (POST /v1/completions and /v1/chat/completions):
  {BUDGET_HEADER}   end-to-end budget of the request in milliseconds, from its arrival: the
                        deepest exit predicted to meet it serves it (none fits: --budget-policy)
  {EXIT_HEADER}        force an exit: a balcony's layer count (e.g. 8, 15, 22) or 'full',
                        among --exits; it wins over a budget
  Authorization         'Bearer KEY' on /v1 when --api-key is set
  Content-Type          application/json
response header: {EXIT_HEADER} names the exit used; the body's 'balcony' object has the details.

endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
  GET /ready (503 with the start-up phase until the model is ready, and while draining), GET /metrics

start-up logs one line per phase (download, conversion, load, warm-up, calibration); the step-cost
calibration is cached under $BALCONY_HOME/calibration, so later starts skip it (--recalibrate).
SIGTERM: stop admitting, finish requests in flight (--shutdown-timeout), exit 0; a second SIGTERM,
or one during start-up, exits at once.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = EnvDefaults(prog="balcony", description="Serve one LLM at several depths (Balcony exits).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=EnvDefaults)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with latency-budget routing",
                           description="OpenAI-compatible HTTP server for one model at several depths, routing\n"
                                       "each request to an exit by its latency budget.",
                           epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(serve)
    add_serve_options(serve)
    serve.set_defaults(run=cmd_serve)

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout")
    add_model_options(gen)
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--exit", default=None,
                     help="exit layer count (e.g. 8, 15, 22) or 'full' (default: full, or the budget's choice)")
    gen.add_argument("--budget-ms", type=float, default=None,
                     help="end-to-end latency budget: the deepest exit predicted to meet it (needs step costs: "
                          "cached ones if they fit, else measured first) (default: none)")
    gen.add_argument("--recalibrate", action="store_true",
                     help="with --budget-ms: measure step costs even when cached ones fit")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    gen.add_argument("--seed", type=int, default=None, help="makes sampling reproducible (default: none)")
    gen.add_argument("--frequency-penalty", type=float, default=0.0,
                     help="lowers a token's logit by this much for each time it was generated already, in "
                          "[-2, 2] (0.5 stops most of the exits' greedy loops: docs/training.md)")
    gen.add_argument("--presence-penalty", type=float, default=0.0,
                     help="lowers a token's logit by this much once it was generated, in [-2, 2]")
    gen.add_argument("--raw", action="store_true",
                     help="complete the prompt as plain text; without it, a model with a chat template gets "
                          "the prompt as a user turn")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt in the chat template: the default when the model has one (kept for "
                          "old scripts)")
    gen.set_defaults(run=cmd_generate)

    from balcony_runtime.evaluation.command import add_eval_options, cmd_eval
    from balcony_runtime.training.command import add_train_options, cmd_train

    train = sub.add_parser("train", help="train balconies by self-distillation")
    add_train_options(train)
    train.set_defaults(run=cmd_train)

    evaluate = sub.add_parser("eval", help="per-exit quality against the full model and baselines")
    add_eval_options(evaluate)
    evaluate.set_defaults(run=cmd_eval)

    bench = sub.add_parser("bench", help="decode throughput of every exit on this machine (optionally against transformers)")
    add_model_options(bench)
    bench.add_argument("--tokens", type=int, default=48, help="tokens generated per request (default %(default)s)")
    bench.add_argument("--batch", type=int, default=16, help="concurrent requests of the batched run (default %(default)s)")
    bench.add_argument("--against-transformers", action="store_true",
                       help="also time transformers' generate at batch 1 on the same weights")
    bench.add_argument("--host-only", action="store_true",
                       help="time only the host side of a decode step (the forward replaced by a stub)")
    bench.add_argument("--rows", type=int, default=64, help="rows of the --host-only step (default %(default)s)")
    bench.add_argument("--context", type=int, default=256,
                       help="tokens of context per row in the --host-only step (default %(default)s)")
    bench.add_argument("--device-ms", type=float, default=0.0,
                       help="with --host-only: a simulated device taking this long per step, so the step's wall "
                            "time shows the host work the device waits for (default: none)")
    bench.add_argument("--overlap", action="store_true",
                       help="with --host-only: overlapped steps (step N+1 launched before step N's tokens are "
                            "read), as `balcony serve` runs them on CUDA")
    bench.add_argument("--mixed", action="store_true",
                       help="with --host-only: row i at full depth and each exit in turn, a mixed-depth batch as "
                            "budgets route it (default: every row at full depth)")
    bench.add_argument("--graphs", action="store_true",
                       help="with --host-only: the GPU's code path, decode steps through the decode graphs with "
                            "each replay a no-op and the batch written with torch ops")
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
