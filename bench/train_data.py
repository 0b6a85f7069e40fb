"""Build the varied fit / training text of issue 12 under /tmp (never in git).

    python bench/train_data.py --out /tmp/fitdata --threads 1

Writes three kinds of documents under ``--out``, all readable by ``balcony train`` / ``balcony
fit-lens`` as one folder source:

- ``pydoc/``: a fixed share of the Python 3.11 documentation's TRAINING split (the split ``balcony
  train`` makes with seed 0 and 5% held out), copied file by file; the 24 held-out files are never
  copied, so ``balcony eval`` on the original folder still scores unseen text.
- ``text/``: English from Debian packages that is not Debian-policy prose: the GNU coding and
  maintainer standards, the Bash reference manual, the Jargon File, the docutils documentation,
  git's guides and the English fortune files (not the ``debian`` hints), cut into documents of
  about 6,000 characters at paragraph breaks and capped per package so no source dominates.
- ``gen/generations.jsonl``: the full model's own answers (through ``LLMEngine.generate``, batched,
  temperature 0.8, top-p 0.95, one seed per prompt) to varied prompts (instructions, questions,
  openings of documents), with the prompt in the ``prompt`` field so ``--chat-template`` rebuilds
  the exact chat the model answered. With ``--exits 8,15,22`` the balconies answer instead, in
  turn (an ``exit`` field says which): the exits' own text, which training then scores with the
  full model's distributions (on-policy for the students, as in generalized knowledge distillation).

The held-out English set of docs/training.md (doc-debian, debian-reference-en) is never read here.
"""

from __future__ import annotations

import argparse
import gzip
import html.parser
import json
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

PACKAGES = ["python3.11-doc", "gnu-standards", "bash-doc", "jargon-text", "docutils-doc", "git-doc", "fortunes"]
PYDOC = "usr/share/doc/python3.11/html/_sources"
# English fortune files only (the "debian" file is Debian hints: left out with the held-out domain).
FORTUNES = ["art", "computers", "cookie", "definitions", "education", "food", "goedel", "humorists",
            "kids", "law", "literature", "love", "magic", "medicine", "men-women", "miscellaneous",
            "news", "people", "pets", "platitudes", "politics", "riddles", "science", "songs-poems",
            "sports", "startrek", "wisdom", "work", "zippy"]
CAP_CHARS = {"gnu-standards": 500_000, "bash": 300_000, "jargon": 500_000, "docutils": 350_000,
             "git": 450_000, "fortunes": 400_000}

TOPICS = [
    "photosynthesis", "the French Revolution", "black holes", "compound interest", "the water cycle",
    "how vaccines work", "the history of the printing press", "climate change", "plate tectonics",
    "the human immune system", "supply and demand", "the Roman Empire", "machine learning",
    "how a bicycle works", "the causes of World War I", "healthy sleep habits", "the Pythagorean theorem",
    "bees and pollination", "the stock market", "renewable energy", "the Renaissance", "DNA replication",
    "how the internet works", "public speaking", "the solar system", "ancient Egypt", "probability",
    "writing a good essay", "volcanoes", "the history of jazz", "time management", "recycling",
    "the theory of evolution", "how airplanes fly", "learning a new language", "the moon landing",
    "chess openings", "baking bread", "the Industrial Revolution", "ocean currents", "electric cars",
    "the Great Wall of China", "friendship", "budgeting for students", "sorting algorithms",
    "a rainy day in a small town", "a lighthouse keeper", "a lost robot", "the first day of school",
]
KINDS = [
    "Explain {t} to a high-school student.",
    "Write a short essay about {t}.",
    "What are the most important facts about {t}?",
    "Give me five tips related to {t}, with a sentence of explanation each.",
    "Write the opening paragraphs of an encyclopedia article on {t}.",
    "Write a short story that involves {t}.",
    "Summarize the main ideas of {t} in plain English.",
    "Write a blog post introducing {t} to beginners.",
    "Why does {t} matter? Answer in a few paragraphs.",
    "Write a lesson plan for teaching {t}.",
    "Compare two different views on {t}.",
    "Write a letter to a friend describing {t}.",
]
EXTRA_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "How do I read a CSV file in Python?",
    "What is the difference between a list and a tuple in Python?",
    "Write a haiku about autumn.",
    "Translate 'Good morning, how are you?' into French and Spanish and explain the grammar.",
    "What should I pack for a week-long hiking trip?",
    "Write an email asking my manager for a day off.",
    "Explain recursion with an example.",
    "What is 17 times 23? Show your working.",
    "Write a product description for a reusable water bottle.",
    "Describe the rules of soccer.",
    "Write a recipe for vegetable soup.",
]


class _HtmlProse(html.parser.HTMLParser):
    """Paragraphs of 8+ words outside pre/code/table (as the English held-out script does)."""

    SKIP, BLOCK = {"pre", "code", "script", "style", "table", "head"}, {"p", "li", "h1", "h2", "h3", "h4", "dd", "dt"}

    def __init__(self):
        super().__init__()
        self.depth, self.parts, self.buf = 0, [], []

    def handle_starttag(self, tag, attrs):
        self.depth += tag in self.SKIP
        if tag in self.BLOCK:
            self.flush()

    def handle_endtag(self, tag):
        self.depth = max(0, self.depth - (tag in self.SKIP))
        if tag in self.BLOCK:
            self.flush()

    def handle_data(self, data):
        if not self.depth:
            self.buf.append(data)

    def flush(self):
        t, self.buf = re.sub(r"\s+", " ", "".join(self.buf)).strip(), []
        if len(t.split()) >= 8:
            self.parts.append(t)


def html_prose(path: Path) -> str:
    p = _HtmlProse()
    p.feed(path.read_text(errors="replace"))
    p.flush()
    return "\n\n".join(p.parts)


def chunks(text: str, size: int = 6000) -> list[str]:
    """Documents of about ``size`` characters, cut at paragraph breaks."""
    out, cur = [], []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        cur.append(para)
        if sum(len(c) for c in cur) >= size:
            out.append("\n\n".join(cur))
            cur = []
    if cur:
        out.append("\n\n".join(cur))
    return out


def fetch_debs(work: Path) -> Path:
    root = work / "root"
    if root.is_dir():
        return root
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=work, check=True)
    for deb in sorted(work.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def build_text(root: Path, out: Path) -> dict[str, int]:
    doc = root / "usr/share/doc"
    sources: dict[str, str] = {
        "gnu-standards": "\n\n".join(
            gzip.open(doc / "gnu-standards" / n, "rt", errors="replace").read()
            for n in ("standards.text.gz", "maintain.text.gz")
        ),
        "bash": html_prose(doc / "bash/bashref.html"),
        "jargon": gzip.open(doc / "jargon-text/jargon.txt.gz", "rt", errors="replace").read(),
        "docutils": "\n\n".join(
            p.read_text(errors="replace") for p in sorted((doc / "docutils-doc").rglob("*.txt"))
        ),
        "git": "\n\n".join(
            p.read_text(errors="replace") for p in sorted((doc / "git-doc").rglob("*.txt"))
        ),
        "fortunes": "\n\n".join(
            (root / "usr/share/games/fortunes" / n).read_text(errors="replace").replace("\n%\n", "\n\n")
            for n in FORTUNES if (root / "usr/share/games/fortunes" / n).is_file()
        ),
    }
    sizes = {}
    for name, text in sources.items():
        folder = out / "text" / name
        folder.mkdir(parents=True, exist_ok=True)
        kept, total = 0, 0
        for i, piece in enumerate(chunks(text)):
            if total >= CAP_CHARS[name]:
                break
            (folder / f"{name}-{i:04d}.txt").write_text(piece + "\n")
            kept, total = kept + 1, total + len(piece)
        sizes[name] = total
    return sizes


def copy_pydoc(root: Path, out: Path, share: float, seed: int) -> int:
    """Copy ``share`` of the training-split Python docs (the split balcony train makes: seed 0, 5%)."""
    from balcony_runtime.training.data import DataConfig, is_heldout

    src = root / PYDOC
    split = DataConfig(sources=(str(src),), heldout_fraction=0.05, seed=0)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in (".txt", ".rst"))
    train = [p for p in files if p.stat().st_size and not is_heldout(p.relative_to(src).as_posix(), split)]
    random.Random(seed).shuffle(train)
    total = 0
    for p in train[: int(len(train) * share)]:
        dest = out / "pydoc" / p.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
        total += p.stat().st_size
    return total


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = [k.format(t=t) for k in KINDS for t in TOPICS] + EXTRA_PROMPTS
    rng.shuffle(pool)
    return pool[:n]


def generate(out: Path, n: int, max_tokens: int, batch: int, seed: int, dtype: str, quantization: str,
             exits: list[str], adapters: str) -> dict:
    from balcony_runtime.engine import EngineConfig, LLMEngine
    from balcony_runtime.loader import load_model
    from balcony_runtime.sampling_params import SamplingParams

    # The serving load (measured dtype and weight format, as ``balcony serve`` picks them): the
    # library's plain default keeps weights unpacked, where a dtype measured for one row can be far
    # slower at this batch (bf16 converted in software on CPUs without native bf16).
    loaded = load_model(adapters=None if exits == ["full"] else adapters, dtype=dtype, quantization=quantization)
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=1024))
    tok = loaded.tokenizer
    path = out / "gen" / "generations.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    todo = prompts(n, seed)
    # resumable: prompts already answered (in order) are kept; each prompt has its own seed
    done_before = len(path.read_text().splitlines()) if path.is_file() else 0
    t0, tokens = time.perf_counter(), 0
    with path.open("a") as f:
        for start in range(done_before, len(todo), batch):
            group = todo[start : start + batch]
            ids = []
            for p in group:
                enc = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True)
                ids.append([int(t) for t in (enc["input_ids"] if hasattr(enc, "keys") else enc)])
            # one seed per prompt: reproducible whatever the batch
            params = [SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=seed + start + i)
                      for i in range(len(group))]
            # prompt k is answered at exits[k % len(exits)]: with exits, the text is the student's
            # own (on-policy for the exits; training scores it with the full model's KL)
            at = [exits[(start + i) % len(exits)] for i in range(len(group))]
            outs = engine.generate(ids, params, exit_layer=at)
            for p, o, e in zip(group, outs, at):
                tokens += len(o.token_ids)
                f.write(json.dumps({"prompt": p, "text": o.text.strip(), "finish": o.finish_reason, "exit": e}) + "\n")
            f.flush()
            print(f"generated {start + len(group)}/{len(todo)} prompts, {tokens} tokens, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    return {"prompts": len(todo), "tokens": tokens, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/fitdata")
    ap.add_argument("--debs", default="/tmp/fitdata-debs", help="where the .deb files are downloaded and unpacked")
    ap.add_argument("--pydoc-share", type=float, default=0.25, help="share of the Python-doc training files copied")
    ap.add_argument("--prompts", type=int, default=320)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto", help="generation dtype (auto: measured, as balcony serve does)")
    ap.add_argument("--quantization", default="auto", help="CPU weight format (auto: measured, never lossy int8)")
    ap.add_argument("--exits", default="full",
                    help="comma-separated exits that answer the prompts in turn (e.g. 8,15,22): the exits' own text")
    ap.add_argument("--adapters", default="default", help="the balconies that answer at --exits (default: shipped)")
    ap.add_argument("--skip-generation", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if (out / "pydoc").is_dir() and (out / "text").is_dir():
        shutil.rmtree(out / "pydoc"), shutil.rmtree(out / "text")  # rebuilt identically; gen/ is resumed
    root = fetch_debs(Path(args.debs))
    report = {"text_chars": build_text(root, out), "pydoc_chars": copy_pydoc(root, out, args.pydoc_share, args.seed)}
    print(json.dumps(report), flush=True)
    if not args.skip_generation:
        report["generation"] = generate(out, args.prompts, args.max_tokens, args.batch, args.seed, args.dtype, args.quantization,
                                        args.exits.split(","), args.adapters)
    (out / "manifest.json").write_text(json.dumps({"args": vars(args), **report}, indent=1) + "\n")
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
