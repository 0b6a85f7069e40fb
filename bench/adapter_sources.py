"""What the scripts that write adapters from other adapters share (bench/average_adapters.py,
bench/compose_adapters.py): loading sources that must match, and writing the result with the
command line that made it on record."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from balcony_runtime.adapters import load_adapters
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
