"""Decode throughput of our engine against transformers' generate, per exit and dtype.

    python bench/decode_throughput.py [--dtypes float32 bfloat16] [--tokens 48] [--out docs/benchmarks.md]

Prints a markdown table and writes it (with the command and machine) into the output file between
markers, so docs/benchmarks.md keeps other sections. Decode rate = tokens generated after the first
(prefill) step divided by the time of those steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from balcony_runtime.decode_benchmark import (
    hf_decode_rate, machine_line, markdown_header, markdown_rows, measure_exits,
)
from balcony_runtime.loader import load_model


def run(dtypes: list[str], tokens: int, batch: int) -> str:
    lines: list[str] = []
    for dtype in dtypes:
        loaded = load_model(adapters=None, dtype=dtype, device="cpu")
        if not lines:
            lines = [f"Decode, {machine_line(loaded, tokens)}", "", *markdown_header(batch)]
        hf_rate = hf_decode_rate(loaded, tokens)
        lines += markdown_rows(dtype, measure_exits(loaded, tokens, batch), hf_rate, loaded.model.full_depth)
    return "\n".join(lines)


def write_section(path: Path, name: str, body: str, command: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n`{command}`\n\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    table = run(args.dtypes, args.tokens, args.batch)
    print(table)
    command = "python bench/decode_throughput.py " + " ".join(
        [f"--dtypes {' '.join(args.dtypes)}", f"--tokens {args.tokens}", f"--batch {args.batch}"]
    )
    write_section(args.out, "decode-throughput", table, command)


if __name__ == "__main__":
    main()
