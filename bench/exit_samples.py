"""Greedy answers to ten varied chat prompts at every exit, side by side with the full model's.

Reads as a user would: the chat template applied, temperature 0, the same tokens at every exit
(one batch per exit through LLMEngine). Writes a markdown section (prompt, then one line per exit),
ending in a count per exit of the answers that loop: some run of LOOP_TOKENS tokens occurs
LOOP_TIMES times or more (issue 12's greedy-text goal asks for none at exit 22).

    python bench/exit_samples.py --adapters default --max-tokens 48 --out -
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from balcony_runtime.training.repeat_marks import RUN_TOKENS

PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for sleeping better.",
    "Write a short poem about the sea.",
    "What is photosynthesis?",
    "How do I reverse a list in Python?",
    "Who wrote Romeo and Juliet?",
    "Suggest a name for a small bakery.",
    "What are the benefits of regular exercise?",
    "Summarize the story of Cinderella in one paragraph.",
]
# What the prompts above ask about, with the forms a topic might take: training prompts that use
# one of these words are left out (bench/chat_prompts.py), so the greedy answers stay unseen.
SUBJECT_WORDS = frozenset({
    "capital", "capitals", "france", "french", "paris", "sky", "skies", "sleep", "sleeping", "sleepy",
    "insomnia", "poem", "sea", "seas", "ocean", "oceans", "photosynthesis", "chlorophyll", "reverse",
    "reversing", "romeo", "juliet", "shakespeare", "bakery", "bakeries", "baker", "exercise", "exercises",
    "fitness", "workout", "cinderella", "fairy",
})


# "the sea is a sea of sea. the sea is a sea of sea. ..." loops; training marks the same runs
LOOP_TOKENS, LOOP_TIMES = RUN_TOKENS, 3


def loop_start(token_ids: list[int], n: int = LOOP_TOKENS, times: int = LOOP_TIMES) -> int | None:
    """Where the answer starts to loop: the index of the first run of ``n`` tokens that occurs for
    the ``times``-th time (overlaps count), or None when no run comes back that often."""
    seen: dict[tuple[int, ...], int] = {}
    for i in range(len(token_ids) - n + 1):
        gram = tuple(token_ids[i:i + n])
        seen[gram] = seen.get(gram, 0) + 1
        if seen[gram] >= times:
            return i
    return None


def loops(token_ids: list[int], n: int = LOOP_TOKENS, times: int = LOOP_TIMES) -> bool:
    """Whether some run of ``n`` consecutive tokens occurs ``times`` times or more (overlaps count)."""
    return loop_start(token_ids, n, times) is not None


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids of one user turn, the chat template applied, ready for the answer."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                        add_generation_prompt=True, return_dict=False)
    return [int(t) for t in ids]


def greedy_answers(engine, prompt_ids: list[list[int]], exits: list[str], max_tokens: int) -> dict[str, list[list[int]]]:
    """Greedy token ids of every prompt at every exit."""
    from balcony_runtime.sampling_params import SamplingParams

    return answers_at(engine, prompt_ids, exits, SamplingParams(max_tokens=max_tokens, temperature=0.0))


def answers_at(engine, prompt_ids: list[list[int]], exits: list[str], params) -> dict[str, list[list[int]]]:
    """Token ids of every prompt at every exit, decoded as ``params`` (a SamplingParams) says."""
    return {name: [list(o.token_ids) for o in engine.generate(prompt_ids, params, exit_layer=name)] for name in exits}


_DECODING_FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "frequency_penalty": "--frequency-penalty",
                   "presence_penalty": "--presence-penalty", "seed": "--seed"}


def add_decoding_options(parser: argparse.ArgumentParser) -> None:
    """Greedy by default; the API's request fields that a client may set instead."""
    group = parser.add_argument_group("decoding (default greedy), as the API's request fields")
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--frequency-penalty", type=float, default=None)
    group.add_argument("--presence-penalty", type=float, default=None)
    group.add_argument("--seed", type=int, default=None, help="per-request seed when sampling")


def decoding_settings(args: argparse.Namespace) -> dict:
    """The SamplingParams fields the decoding options set: temperature always, the rest if given."""
    return {k: getattr(args, k) for k in _DECODING_FLAGS if k == "temperature" or getattr(args, k) is not None}


def decoding_words(decoding: dict) -> str:
    """'greedy', or the settings that differ from greedy, e.g. 'greedy, frequency_penalty 0.5'."""
    rest = ", ".join(f"{k} {v}" for k, v in decoding.items() if k != "temperature")
    head = "greedy" if not decoding.get("temperature") else f"temperature {decoding['temperature']}"
    return head + (f", {rest}" if rest else "")


def decoding_flags(decoding: dict) -> str:
    """The command-line flags that ask for ``decoding`` ('' for greedy)."""
    return "".join(f" {_DECODING_FLAGS[k]} {v}" for k, v in decoding.items() if k != "temperature" or v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", default="default", help="adapters directory, or 'default'")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default="-", help="markdown file to write, '-' for stdout")
    add_decoding_options(parser)
    args = parser.parse_args()
    decoding = decoding_settings(args)

    from balcony_runtime.engine import EngineConfig, LLMEngine
    from balcony_runtime.loader import load_model
    from balcony_runtime.sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, **decoding)
    except ValueError as exc:
        parser.error(str(exc))
    loaded = load_model(adapters=args.adapters, dtype=args.dtype)
    engine = LLMEngine(loaded, EngineConfig())
    prompt_ids = [chat_ids(loaded.tokenizer, p) for p in PROMPTS]
    answers = answers_at(engine, prompt_ids, engine.exit_names(), params)
    tok = loaded.tokenizer
    how = decoding_words(decoding)
    lines = [f"{how[0].upper() + how[1:]}, chat template, {args.max_tokens} tokens at most, adapters `{args.adapters}` "
             f"(`python bench/exit_samples.py --adapters {args.adapters} --max-tokens {args.max_tokens}"
             f"{'' if args.dtype == 'auto' else ' --dtype ' + args.dtype}{decoding_flags(decoding)}`).", ""]
    for i, prompt in enumerate(PROMPTS):
        lines.append(f"**{prompt}**")
        lines.append("")
        for name, outs in answers.items():
            text = " ".join(tok.decode(outs[i], skip_special_tokens=True).split())  # one line: newlines would break the list
            lines.append(f"- {name}: {text}")
        lines.append("")
    lines += [f"Answers that loop (a run of {LOOP_TOKENS} tokens {LOOP_TIMES} times or more), of {len(PROMPTS)}: "
              + ", ".join(f"{name} {sum(loops(ids) for ids in outs)}" for name, outs in answers.items())
              + ".", ""]
    text = "\n".join(lines)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
