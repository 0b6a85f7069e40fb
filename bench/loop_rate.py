"""How often each exit's greedy answer loops, over many held-out chat prompts, and how much of
that answer the full model would have written itself.

bench/exit_samples.py reads ten answers side by side: the right thing to show, too few to count
(one answer is 10 points). This runs the same greedy decoding over the held-out slice of
bench/data/chat_prompts.txt.xz (prompts no training run answers; bench/chat_prompts.py) and reports
per exit:

- loops: the share of answers in which some run of 4 tokens occurs 3 times or more (the count
  exit_samples.py ends with);
- agreement: the share of the exit's own greedy tokens that are also the full model's greedy token
  after the same prefix (top-1 agreement measured on the text the exit writes, where its mistakes
  compound, instead of on reference text); also split into the tokens that repeat a run of 4
  already in the answer and the others. Once an answer repeats itself the full model mostly would
  too (copying from context is easy for both), so the split says where the exits part from it:
  before a loop, not inside one.

    python bench/loop_rate.py --adapters default --max-tokens 64 --dtype float32

The same count under the decoding a client may ask for instead (the API's request fields, e.g.
``--frequency-penalty 0.5`` or ``--temperature 0.7 --top-p 0.9 --seed 0``), at the exits given
(``--exits 22,full``), says what those settings buy against the loops.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_prompts import DEFAULT_POOL, HELDOUT_PROMPTS, read_pool, split_pool  # noqa: E402
from exit_samples import (  # noqa: E402
    LOOP_TIMES,
    LOOP_TOKENS,
    add_decoding_options,
    answers_at,
    chat_ids,
    decoding_settings,
    decoding_words,
    loops,
)

from balcony_runtime.training.repeat_marks import repeats  # noqa: E402


def full_model_agreement(model, prompt_ids: list[list[int]], answers: list[list[int]]) -> dict[str, tuple[int, int]]:
    """(tokens of ``answers`` that are the full model's argmax after the same prefix, tokens), over
    all tokens, those that repeat a run already written ("repeats") and the others ("fresh")."""
    import torch

    from balcony_runtime.training.dense_forward import backbone_pass, final_normed, lm_logits

    device = model.norm.device
    counts = {"all": [0, 0], "repeats": [0, 0], "fresh": [0, 0]}
    for prompt, answer in zip(prompt_ids, answers):
        if not answer:
            continue
        ids = torch.tensor([prompt + answer], device=device)  # [1, P + A]
        with torch.inference_mode():
            states = backbone_pass(model, ids, set())
            # the logits that predict each answer token: positions P-1 .. P+A-2
            normed = final_normed(model, *states.final)[len(prompt) - 1 : -1]  # [A, H]
            predicted = lm_logits(model, normed).argmax(-1).tolist()
        for p, a, repeated in zip(predicted, answer, repeats(answer)):
            for kind in ("all", "repeats" if repeated else "fresh"):
                counts[kind][0] += p == a
                counts[kind][1] += 1
    return {kind: (agree, total) for kind, (agree, total) in counts.items()}


def measure(loaded, prompts: list[str], max_tokens: int, exits: list[str] | None = None,
            decoding: dict | None = None) -> dict:
    """Loop share and full-model agreement of every served exit (or ``exits``) over ``prompts``,
    greedy, or with ``decoding``'s SamplingParams fields (temperature, penalties, ...)."""
    from balcony_runtime.engine import EngineConfig, LLMEngine
    from balcony_runtime.sampling_params import SamplingParams

    decoding = {"temperature": 0.0, **(decoding or {})}
    params = SamplingParams(max_tokens=max_tokens, **decoding)
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=min(64, len(prompts))))
    exits = exits or engine.exit_names()
    t0 = time.perf_counter()
    prompt_ids = [chat_ids(loaded.tokenizer, p) for p in prompts]
    answers = answers_at(engine, prompt_ids, exits, params)
    result = {"prompts": len(prompts), "max_tokens": max_tokens, "decoding": decoding, "exits": {}}
    for name, ids in answers.items():
        looped = [i for i, a in enumerate(ids) if loops(a)]
        # (which prompts loop, so two adapters can be compared prompt by prompt)
        row = {"loops": round(len(looped) / len(ids), 4), "mean_tokens": round(sum(map(len, ids)) / len(ids), 1),
               # answers that end (EOS) before the limit: a shorter answer has less room to loop
               "stopped": round(sum(len(a) < max_tokens for a in ids) / len(ids), 4),
               "looped_prompts": looped}
        if name != "full":
            agreement = full_model_agreement(loaded.model, prompt_ids, ids)
            row["agreement"] = round(agreement["all"][0] / max(agreement["all"][1], 1), 4)
            for kind in ("repeats", "fresh"):
                agree, total = agreement[kind]
                row[f"agreement_{kind}"] = round(agree / max(total, 1), 4)
                row[f"tokens_{kind}"] = total
        result["exits"][name] = row
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def markdown_line(result: dict) -> str:
    rows = result["exits"]
    decoding = decoding_words(result.get("decoding", {}))
    return (f"Over {result['prompts']} held-out chat prompts, {decoding}, {result['max_tokens']} tokens at most: loops "
            + ", ".join(f"{k} {v['loops']:.3f}" for k, v in rows.items())
            + f" (a run of {LOOP_TOKENS} tokens {LOOP_TIMES} times or more); the full model's greedy token "
            + ", ".join(f"{k} {v['agreement']:.3f}" for k, v in rows.items() if "agreement" in v) + ".")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", default="default", help="adapters directory, or 'default'")
    p.add_argument("--pool", type=Path, default=DEFAULT_POOL)
    p.add_argument("--prompts", type=int, default=HELDOUT_PROMPTS, help="held-out prompts read (default: all %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--exits", default=None, help="comma-separated exits to answer at (default: every served one)")
    add_decoding_options(p)
    args = p.parse_args(argv)
    settings = decoding_settings(args)

    import torch

    from balcony_runtime.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    _, heldout = split_pool(read_pool(args.pool))
    if not 0 < args.prompts <= len(heldout):
        p.error(f"--prompts must be 1..{len(heldout)} (the pool's held-out slice)")
    loaded = load_model(adapters=args.adapters, dtype=args.dtype)
    try:
        exits = args.exits.split(",") if args.exits else None
        measured = measure(loaded, heldout[: args.prompts], args.max_tokens, exits, settings)
    except ValueError as exc:  # a setting out of the API's range, or an exit the adapters lack
        p.error(str(exc))
    result = {"adapters": args.adapters, "dtype": args.dtype, **measured}
    print(json.dumps(result, indent=1))
    print(markdown_line(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
