"""English prose from Perl's manual pages (Debian's ``perl-doc``) as training documents.

    cd /tmp && apt-get download perl-doc && dpkg -x perl-doc_*.deb /tmp/perldoc && cd -
    python bench/perl_doc_text.py /tmp/perldoc/usr/share/perl --out /tmp/fit6/perl

Each ``.pod`` file is rendered to plain text by ``pod2text`` (part of Perl itself) and cut into
documents of about 6,000 characters at paragraph breaks, as bench/train_data.py cuts its text.
The per-release change logs (``perl5*delta.pod``) are left out: lists of changed functions, not
prose. Used for the GPU training run's wider text mix (docs/training.md, "The GPU run").
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_data import chunks  # noqa: E402  (the same cut as the other text)

CHANGE_LOG = re.compile(r"^perl\d+delta\.pod$")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", type=Path, help="a folder holding the .pod files (searched recursively)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    pods = sorted(f for f in args.source.rglob("*.pod") if not CHANGE_LOG.match(f.name))
    if not pods:
        p.error(f"no .pod files under {args.source}")
    args.out.mkdir(parents=True, exist_ok=True)
    docs = chars = 0
    for pod in pods:
        text = subprocess.run(["pod2text", str(pod)], capture_output=True, text=True, errors="replace").stdout
        for i, piece in enumerate(chunks(text)):
            (args.out / f"{pod.stem}-{i:03d}.txt").write_text(piece + "\n")
            docs, chars = docs + 1, chars + len(piece)
    print(f"{len(pods)} pod files, {docs} documents, {chars:,} characters in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
