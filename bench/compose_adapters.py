"""Adapters whose balcony at each exit comes from a chosen run: one run's exit 8, another's 15 and 22.

Each exit's balcony is trained by its own loss (the objective is a sum over exits, and no
parameter is shared between balconies; the backbone is frozen), so a run that is better at one exit
and worse at another can give just that exit to the shipped set without changing what the others
compute. Every source must be made for the same backbone, with the same exits and tensor shapes.
The result's balcony.json records this command, the base's training block and, per taken exit,
the source's; evaluate it afterwards with `balcony eval` and bench/record_evaluation.py as any
other adapters.

    python bench/compose_adapters.py BASE/adapters --take 8=OTHER/adapters --out COMPOSED
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapter_sources import load_matching, write_recorded  # noqa: E402

from balcony_runtime.adapters import save_adapters  # noqa: E402
from balcony_runtime.errors import AdapterError  # noqa: E402


def compose_adapters(base: Path, takes: dict[int, Path], out: Path, command: str = "") -> None:
    """Write ``base``'s balconies to ``out``, each exit in ``takes`` replaced by that source's."""
    sources = [base, *dict.fromkeys(takes.values())]
    loaded = dict(zip(sources, load_matching(sources)))
    base_meta, balconies = loaded[base]
    unknown = sorted(set(takes) - set(balconies))
    if unknown:
        raise AdapterError(f"exit(s) {unknown} are not among the adapters' exits {sorted(balconies)}")
    composed = {k: loaded[takes.get(k, base)][1][k] for k in balconies}

    def total(source: Path, key: str) -> float:
        record = loaded[source][0].training
        return record.get(f"{key}_total", record.get(key, 0))

    training = {"command": command, "base": {"adapters": str(base), **base_meta.training},
                "exits_taken": {str(k): {"adapters": str(src), **loaded[src][0].training} for k, src in sorted(takes.items())},
                # the most that stands behind any one exit's balcony (a warm start from these adds to it)
                "tokens_seen_total": max(total(s, "tokens_seen") for s in sources),
                "wall_s_total": max(total(s, "wall_s") for s in sources)}
    save_adapters(out, replace(base_meta, training=training, evaluation={}), composed, getattr(torch, base_meta.dtype))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="adapters directory every exit comes from unless taken")
    parser.add_argument("--take", action="append", required=True, metavar="EXIT=ADAPTERS",
                        help="take this exit's balcony from these adapters (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="adapters directory to write")
    args = parser.parse_args(argv)
    takes = {}
    for item in args.take:
        exit_name, sep, path = item.partition("=")
        if not sep or not exit_name.isdigit() or not path:
            parser.error(f"--take wants EXIT=ADAPTERS, got {item!r}")
        takes[int(exit_name)] = Path(path)
    return write_recorded("compose_adapters", argv, lambda command: compose_adapters(args.base, takes, args.out, command),
                          f"composed {args.out}: exits {sorted(takes)} taken, the rest from {args.base}")


if __name__ == "__main__":
    sys.exit(main())
