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
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch

from balcony_runtime.adapters import load_adapters, save_adapters
from balcony_runtime.errors import AdapterError


def load_matching(sources: list[Path]) -> list[tuple]:
    """(meta, balconies) of every source, after checking they were made for one backbone, with the
    same exits and tensor shapes as the first (AdapterError naming the one that differs)."""
    loaded = [load_adapters(Path(s)) for s in sources]
    first_meta, first = loaded[0]
    for source, (meta, balconies) in zip(sources[1:], loaded[1:]):
        if (meta.backbone_fingerprint, meta.num_layers, meta.exits) != (
                first_meta.backbone_fingerprint, first_meta.num_layers, first_meta.exits):
            raise AdapterError(f"{source} was made for another backbone or other exits than {sources[0]}")
        for k, named in first.items():
            theirs = balconies[k]
            if theirs.keys() != named.keys() or any(theirs[n].shape != t.shape for n, t in named.items()):
                raise AdapterError(f"balcony {k} of {source} has other tensors or shapes than in {sources[0]}")
    return loaded


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


def write_recorded(script: str, argv: list[str] | None, write, done: str) -> int:
    """Run ``write(command)`` with this invocation's command line (recorded in the adapters); an
    AdapterError becomes a one-line message and exit status 2."""
    command = shlex.join(["python", f"bench/{script}.py"] + (sys.argv[1:] if argv is None else argv))
    try:
        write(command)
    except AdapterError as exc:
        print(f"{script}: {exc}", file=sys.stderr)
        return 2
    print(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
