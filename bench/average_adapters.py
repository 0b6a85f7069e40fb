"""Average the weights of several adapters that continued from one start (a "model soup").

Runs that start from the same adapters and differ only in their data order end in nearby points of
weight space; their mean is often better than any one of them (Wortsman et al. 2022) and, unlike
picking the best run on the held-out sets, is not a selection on run-to-run noise. Every source
must be made for the same backbone, with the same exits and tensor shapes; the mean is taken in
fp32 and stored in the first source's dtype. The result's balcony.json records this command and
each source's training block (its own command and lineage); evaluate it afterwards with
`balcony eval` and bench/record_evaluation.py as any other adapters.

    python bench/average_adapters.py RUN_A/adapters RUN_B/adapters RUN_C/adapters --out SOUP
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


def average_adapters(sources: list[Path], out: Path, command: str = "") -> None:
    """Write the element-wise mean of ``sources``' balconies to ``out`` (AdapterError on a mismatch)."""
    if len(sources) < 2:
        raise AdapterError("averaging needs at least two adapters")
    loaded = load_matching(sources)
    first_meta, first = loaded[0]
    mean = {
        k: {name: torch.stack([b[k][name].float() for _, b in loaded]).mean(dim=0) for name in named}
        for k, named in first.items()
    }
    training = {
        "command": command,
        "averaged_from": [{"adapters": str(s), **meta.training} for s, (meta, _) in zip(sources, loaded)],
    }
    meta = replace(first_meta, training=training, evaluation={})
    save_adapters(out, meta, mean, getattr(torch, first_meta.dtype))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", type=Path, help="adapters directories")
    parser.add_argument("--out", type=Path, required=True, help="adapters directory to write")
    args = parser.parse_args(argv)
    return write_recorded("average_adapters", argv, lambda command: average_adapters(args.sources, args.out, command),
                          f"averaged {len(args.sources)} adapters into {args.out}")


if __name__ == "__main__":
    sys.exit(main())
