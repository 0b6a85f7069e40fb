"""`balcony train` options (mapped one to one onto TrainConfig and DataConfig) and the command."""

from __future__ import annotations

import argparse
import shlex
import sys

from balcony_runtime.model_source import DEFAULT_MODEL


def parse_exits(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"exits must be comma-separated layer counts, got {text!r}") from None


def add_data_options(p: argparse.ArgumentParser, heldout_help: str) -> None:
    p.add_argument("data", nargs="+",
                   help="text files (.txt .md .rst), folders of them, JSONL files, or hf:NAME[:CONFIG]:SPLIT")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed sequence (default %(default)s)")
    p.add_argument("--text-field", default="text", help="JSONL / dataset field with the text")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap each document as the assistant turn of the model's chat template (as the paper did)")
    p.add_argument("--chat-prompt", default="Write a document.",
                   help="user turn for --chat-template when a document has no prompt field")
    p.add_argument("--raw-share", type=float, default=0.0,
                   help="with --chat-template, the share of documents (drawn by document) kept as plain text, "
                        "as completions and log-likelihood scoring see it (default %(default)s)")
    p.add_argument("--heldout-fraction", type=float, default=0.05, help=heldout_help)
    p.add_argument("--seed", type=int, default=0, help="fixes the held-out split and the data order")


def add_unlikely_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unlikely-repeats", type=float, default=None, metavar="WEIGHT",
                   help="in answers an exit wrote itself (JSONL rows with an `exit` field, bench/own_answers.py), "
                        "train every exit against the tokens that repeat a run of 4 already written "
                        "(unlikelihood, this weight beside the KL) and take no KL from the first repeat on; "
                        "0 only drops that KL (default: off, plain KL everywhere)")
    p.add_argument("--unlikely-anchor", action="store_true",
                   help="with --unlikely-repeats: at each repeated token also take the KL toward the full "
                        "model's distribution without that token, so the probability moves to what the full "
                        "model would write instead of the loop (not to ending the answer)")
    p.add_argument("--teacher-frequency-penalty", type=float, default=0.0, metavar="A",
                   help="with --unlikely-repeats: inside the exits' own answers, distil from the full model "
                        "with OpenAI's frequency penalty A on what the answer has written so far, so the exit "
                        "learns the penalty's effect on repeats (default 0: the plain full model)")
    p.add_argument("--teacher-in-loops", action="store_true",
                   help="with --teacher-frequency-penalty: also distil from that penalised teacher inside the "
                        "exits' loops, where otherwise no KL is taken")


def data_config(args):
    from balcony_runtime.training.data import DataConfig

    return DataConfig(sources=tuple(args.data), seq_len=args.seq_len, text_field=args.text_field,
                      chat_template=args.chat_template, chat_prompt=args.chat_prompt, raw_share=args.raw_share,
                      heldout_fraction=args.heldout_fraction, seed=args.seed,
                      unlikely_repeats=getattr(args, "unlikely_repeats", None) is not None)


def add_train_options(p: argparse.ArgumentParser) -> None:
    add_data_options(p, "share of documents (by document) kept out of training (default %(default)s)")
    add_unlikely_option(p)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model source (default %(default)s)")
    p.add_argument("--exits", type=parse_exits, default=None, help="balcony exits, e.g. 8,15,22 (default: the model's)")
    p.add_argument("--init", default="last", choices=["last", "random", "lens"],
                   help="balcony initialisation: copy of the last backbone layer (the paper's), random, or lens: "
                        "the copy behind an affine map fitted in closed form (ridge least squares from the "
                        "state after k layers to the last layer's input, over --lens-tokens of the data)")
    p.add_argument("--lens-tokens", type=int, default=131072,
                   help="--init lens: training-stream tokens the fit reads, from --first-sequence (default %(default)s)")
    p.add_argument("--lens-norm", default="final", choices=["final", "exit"],
                   help="--init lens: balcony final norm copied from the backbone's final norm or from layers[k]'s input norm")
    p.add_argument("--lens-weighting", default="none", choices=["none", "relative"],
                   help="--init lens: plain least squares, or each token's error relative to its target's size "
                        "(so attention-sink tokens with huge residuals do not dominate)")
    p.add_argument("--lens-heldout-every", type=int, default=10,
                   help="--init lens: every n-th fit batch is held out to choose the ridge strength (default %(default)s)")
    p.add_argument("--init-from", default=None, metavar="ADAPTERS",
                   help="start from trained adapters (e.g. balcony_runtime/shipped_adapters/smollm2-135m) "
                        "with a fresh schedule: continued training")
    p.add_argument("--balcony-mlp-width", type=int, default=None, metavar="UNITS",
                   help="grow every balcony's MLP to this many hidden units before training, computing "
                        "what it computed before (new units start with zero output); default: keep the width")
    p.add_argument("--first-sequence", type=int, default=0, metavar="N",
                   help="start at packed sequence N of the data order, e.g. after the sequences a warm start "
                        "already saw (tokens seen / seq-len)")
    p.add_argument("--output-dir", default="runs/balcony", help="checkpoint/, adapters/ and log.jsonl")
    p.add_argument("--tokens", type=int, default=None, help="length of the schedule in training tokens")
    p.add_argument("--max-steps", type=int, default=None, help="length of the schedule in optimizer steps")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop with a checkpoint after this step, keeping the schedule (resume later)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward per process")
    p.add_argument("--grad-accum", type=int, default=1, help="forwards per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak AdamW learning rate (default 1e-3: better than the paper's 5e-4 here, DESIGN §4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup-fraction", type=float, default=0.01, help="linear warm-up share, then cosine")
    p.add_argument("--clip-norm", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--kl-chunk", type=int, default=512, help="positions per chunk of full-vocabulary logits")
    p.add_argument("--objective", default="kl", choices=["kl", "fisher", "logits"],
                   help="kl: forward KL through the LM head (the paper's); fisher / logits: head-free, the "
                        "balcony's normed output pulled onto the full model's under the KL's average Fisher "
                        "or the centred-logit metric (an [H, H] matrix: no LM head in a step)")
    p.add_argument("--reverse-kl-weight", type=float, default=0.0,
                   help="--objective kl: train on (1 - b) KL(full || exit) + b KL(exit || full); the reverse KL "
                        "pulls an exit onto the full model's largest modes (greedy text, top-1 agreement) "
                        "rather than spreading it over the full model's tail (default %(default)s)")
    p.add_argument("--metric-tokens", type=int, default=8192,
                   help="--objective fisher: teacher tokens the metric is averaged over, from --first-sequence "
                        "(default %(default)s)")
    p.add_argument("--save-every", type=int, default=100, help="optimizer steps between checkpoints")
    p.add_argument("--log-every", type=int, default=10, help="optimizer steps between progress lines")
    p.add_argument("--snapshot-every", type=int, default=None,
                   help="also export adapters to OUTPUT_DIR/snapshots/step-N every N steps (quality curves)")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --output-dir")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--autocast", default="auto", choices=["auto", "bf16", "off"],
                   help="bf16 autocast (auto: where the device has native bf16)")
    p.add_argument("--adapter-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the exported adapters")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")


def cmd_train(args) -> int:
    import torch

    from balcony_runtime.errors import BalconyError
    from balcony_runtime.training.config import TrainConfig
    from balcony_runtime.training.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = TrainConfig(
            data=data_config(args), output_dir=args.output_dir, model=args.model, exits=args.exits,
            init=args.init, init_from=args.init_from, lens_tokens=args.lens_tokens, lens_norm=args.lens_norm,
            lens_heldout_every=args.lens_heldout_every, lens_weighting=args.lens_weighting,
            balcony_mlp_width=args.balcony_mlp_width, first_sequence=args.first_sequence, device=args.device, autocast=args.autocast, micro_batch_size=args.micro_batch_size,
            grad_accum=args.grad_accum, total_tokens=args.tokens, max_steps=args.max_steps,
            stop_after=args.stop_after, lr=args.lr, weight_decay=args.weight_decay,
            warmup_fraction=args.warmup_fraction, clip_norm=args.clip_norm, kl_chunk=args.kl_chunk,
            objective=args.objective, reverse_kl_weight=args.reverse_kl_weight,
            unlikelihood_weight=args.unlikely_repeats or 0.0, unlikely_anchor=args.unlikely_anchor,
            teacher_frequency_penalty=args.teacher_frequency_penalty, teacher_in_loops=args.teacher_in_loops,
            metric_tokens=args.metric_tokens,
            save_every=args.save_every, snapshot_every=args.snapshot_every, log_every=args.log_every,
            resume=not args.no_resume,
            adapter_dtype=args.adapter_dtype, command=shlex.join(["balcony"] + sys.argv[1:]),
        )
        state = train(config, log=lambda text: print(text, file=sys.stderr, flush=True))
    except (BalconyError, ValueError) as exc:
        print(f"balcony train: {exc}", file=sys.stderr)
        return 2
    planned_stop = min(state["total_steps"], config.stop_after or state["total_steps"])
    return 0 if state["step"] >= planned_stop else 130  # 130: stopped by Ctrl-C / SIGTERM, resumable
