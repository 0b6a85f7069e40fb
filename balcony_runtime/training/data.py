"""Training and evaluation text: sources -> documents -> token ids -> packed sequences.

Sources: a text file (.txt, .md, .rst, .text), a folder of them (recursive; empty files skipped),
a JSONL file (one object a line with a text field), or ``hf:NAME[:CONFIG]:SPLIT`` for a Hugging Face
dataset read in streaming mode (real hardware; no hub is reachable on CPU-only CI machines).
The held-out split is by document: a document is held out when a hash of (seed, its id) falls under
the held-out fraction, so the split needs no global pass and is the same in every process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from balcony_runtime.errors import BalconyError
from balcony_runtime.training import repeat_marks

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl",)


class DataError(BalconyError):
    """Training or evaluation data that cannot be read as asked."""


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...]  # files, folders, JSONL files or hf:NAME[:CONFIG]:SPLIT
    seq_len: int = 512  # tokens per packed sequence
    text_field: str = "text"  # JSONL / dataset field holding the document
    chat_template: bool = False  # wrap each document as an assistant reply (the paper's cosmopedia setup)
    chat_prompt: str = "Write a document."  # user turn when chat_template is on and no prompt field
    # With chat_template, this share of documents (chosen by document, like the held-out split) stays
    # plain text: completions and lm-eval's log-likelihoods score raw text, which a chat-only run
    # never shows the exits.
    raw_share: float = 0.0
    prompt_field: str = "prompt"  # JSONL / dataset field used as the user turn if present
    heldout_fraction: float = 0.05  # share of documents held out for evaluation (1: all, for eval-only sets)
    # Mark the loops of answers an exit wrote itself (JSONL rows with an ``exit`` field other than
    # "full", under the chat template) for unlikelihood training (training/repeat_marks.py).
    unlikely_repeats: bool = False
    writer_field: str = "exit"  # JSONL field naming the exit that wrote a document
    seed: int = 0  # fixes the held-out split and the epoch shuffles

    def __post_init__(self) -> None:
        if not self.sources:
            raise DataError("no data sources given")
        if self.seq_len < 2:
            raise DataError(f"sequence length must be at least 2, got {self.seq_len}")
        if not 0.0 <= self.heldout_fraction <= 1.0:
            raise DataError(f"held-out fraction must be in [0, 1], got {self.heldout_fraction}")
        if not 0.0 <= self.raw_share <= 1.0:
            raise DataError(f"raw share must be in [0, 1], got {self.raw_share}")
        if self.raw_share > 0 and not self.chat_template:
            raise DataError("a raw share only applies with the chat template (without it every document is raw)")
        if self.unlikely_repeats and not self.chat_template:
            raise DataError("unlikely repeats mark the exits' own chat answers: they need the chat template")
        if self.unlikely_repeats and any(s.startswith("hf:") for s in self.sources):
            raise DataError("unlikely repeats need local sources (a streamed dataset carries no per-token marks)")


@dataclass(frozen=True)
class Document:
    # A stable name, wherever the data lives: the path inside its folder (or the file's name), with
    # the line of a JSONL row; or the dataset row.
    doc_id: str
    text: str
    prompt: str | None = None
    writer: str | None = None  # the exit that wrote the text (JSONL ``exit`` field), if any


def _unit_hash(key: str) -> float:
    """A fixed draw in [0, 1) per key: the same in every process and on every machine."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def is_heldout(doc_id: str, config: DataConfig) -> bool:
    return config.heldout_fraction == 1.0 or _unit_hash(f"{config.seed}:{doc_id}") < config.heldout_fraction


def is_raw(doc_id: str, config: DataConfig) -> bool:
    """Whether a document stays plain text under the chat template (its own draw, not the held-out one)."""
    return config.raw_share > 0 and _unit_hash(f"raw:{config.seed}:{doc_id}") < config.raw_share


def iter_documents(config: DataConfig) -> Iterator[Document]:
    for source in config.sources:
        if source.startswith("hf:"):
            yield from _hf_documents(source, config)
            continue
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not files:
                raise DataError(f"folder {path} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
            for file in files:
                # Named relative to the folder: the held-out split must not change when the folder
                # is unpacked somewhere else (a script that picks training files and `balcony eval`
                # must agree on which are held out, wherever each finds them).
                yield from _file_documents(file, config, skip_empty=True, name=file.relative_to(path).as_posix())
        elif path.is_file():
            yield from _file_documents(path, config, skip_empty=False, name=path.name)
        else:
            raise DataError(f"data source {source!r} does not exist (a file, a folder or hf:NAME:SPLIT)")


def _file_documents(path: Path, config: DataConfig, skip_empty: bool, name: str) -> Iterator[Document]:
    if path.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
        raise DataError(
            f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; use text "
            f"({', '.join(TEXT_SUFFIXES)}), JSONL ({', '.join(JSONL_SUFFIXES)}) or hf:NAME:SPLIT"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from exc
    if not text.strip():
        if skip_empty:
            return
        raise DataError(f"{path} is empty")
    if path.suffix in TEXT_SUFFIXES:
        yield Document(name, text)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number} is not valid JSON: {exc}") from exc
        if not isinstance(row, dict) or not isinstance(row.get(config.text_field), str):
            raise DataError(f"{path}:{number} has no string field {config.text_field!r}")
        prompt, writer = row.get(config.prompt_field), row.get(config.writer_field)
        yield Document(f"{name}:{number}", row[config.text_field], prompt if isinstance(prompt, str) else None,
                       str(writer) if writer is not None else None)


def _hf_documents(source: str, config: DataConfig) -> Iterator[Document]:
    parts = source[3:].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"{source!r}: expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, subset, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        import datasets
    except ImportError as exc:
        raise DataError("hf: sources need the `datasets` package (pip install datasets)") from exc
    try:
        stream = datasets.load_dataset(name, subset, split=split, streaming=True)
    except Exception as exc:  # the hub's errors vary (offline, missing dataset, gated)
        raise DataError(f"could not open dataset {source!r}: {exc}") from exc
    for index, row in enumerate(stream):
        text = row.get(config.text_field)
        if not isinstance(text, str):
            raise DataError(f"{source!r} row {index} has no string field {config.text_field!r}")
        prompt = row.get(config.prompt_field)
        yield Document(f"{source}:{index}", text, prompt if isinstance(prompt, str) else None)


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def encode_document(doc: Document, tokenizer, config: DataConfig) -> list[int]:
    """Token ids of one document, ending in EOS so packed documents stay apart."""
    if config.chat_template and not is_raw(doc.doc_id, config):
        messages = [
            {"role": "user", "content": doc.prompt or config.chat_prompt},
            {"role": "assistant", "content": doc.text},
        ]
        return _chat_ids(tokenizer, messages, add_generation_prompt=False)
    ids = tokenizer.encode(doc.text, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def marks_of(doc: Document, ids: list[int], tokenizer, config: DataConfig) -> list[int]:
    """Per-token training marks of an encoded document (training/repeat_marks.py): the loops of an
    exit's own chat answer when ``config.unlikely_repeats``, plain KL everywhere else."""
    # (DataConfig refuses unlikely_repeats without the chat template)
    if not (config.unlikely_repeats and doc.writer not in (None, "full") and not is_raw(doc.doc_id, config)):
        return [repeat_marks.NORMAL] * len(ids)
    # the answer begins where the user turn and the assistant's header end
    prompt = _chat_ids(tokenizer, [{"role": "user", "content": doc.prompt or config.chat_prompt}],
                       add_generation_prompt=True)
    if ids[: len(prompt)] != prompt:
        raise DataError(f"{doc.doc_id}: the chat template does not put the answer after the prompt's "
                        "generation header; its loops cannot be located")
    return repeat_marks.document_marks(ids, len(prompt))


def _encoded(config: DataConfig, tokenizer) -> Iterator[tuple[Document, list[int], bool]]:
    """(document, its ids, whether it is held out) for every non-empty document of local sources."""
    for doc in iter_documents(config):
        ids = encode_document(doc, tokenizer, config)
        if ids:
            yield doc, ids, is_heldout(doc.doc_id, config)


def _no_training_documents(config: DataConfig) -> DataError:
    return DataError(f"no training documents in {', '.join(config.sources)} (all empty or held out)")


def split_documents(config: DataConfig, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Tokenised (train, held-out) documents of local sources, split by document."""
    train, heldout = [], []
    for _, ids, held in _encoded(config, tokenizer):
        (heldout if held else train).append(ids)
    if not train:
        raise _no_training_documents(config)
    return train, heldout


def pack(documents: list[list[int]], seq_len: int) -> torch.Tensor:
    """Concatenate documents and cut into rows of seq_len tokens: [N, S] int64 (the tail is dropped)."""
    flat = torch.tensor([t for doc in documents for t in doc], dtype=torch.long)
    n = flat.numel() // seq_len
    return flat[: n * seq_len].view(n, seq_len)


class PackedStream:
    """Packed training sequences in a fixed order: epoch e shuffles the documents with seed + e.

    Sequence i of the whole run is a pure function of (documents, seq_len, seed, i), so a run resumes
    exactly by its count of sequences consumed, and process r of w takes sequences i = r mod w.
    """

    def __init__(self, documents: list[list[int]], seq_len: int, seed: int, marks: list[list[int]] | None = None):
        # marks: per-token training marks parallel to documents (training/repeat_marks.py), or None
        self.documents, self.seq_len, self.seed, self.marks = documents, seq_len, seed, marks
        total = sum(len(d) for d in documents)
        self.per_epoch = total // seq_len
        if self.per_epoch == 0:
            raise DataError(f"training data has {total} tokens, fewer than one sequence of {seq_len}")
        self._epoch, self._rows, self._mark_rows = -1, None, None

    def _epoch_rows(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.documents), generator=g).tolist()
            self._rows = pack([self.documents[i] for i in order], self.seq_len)
            self._mark_rows = None if self.marks is None else pack([self.marks[i] for i in order], self.seq_len)
            self._epoch = epoch
        return self._rows, self._mark_rows

    def _row(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sequence ``index``'s ids [S] and marks [S] (None without marks)."""
        epoch, row = divmod(index, self.per_epoch)
        rows, mark_rows = self._epoch_rows(epoch)
        return rows[row], None if mark_rows is None else mark_rows[row]

    def sequence(self, index: int) -> torch.Tensor:
        return self._row(index)[0]

    def _indices(self, start: int, count: int, rank: int, world: int) -> list[int]:
        return [start + j * world + rank for j in range(count)]

    def batch(self, start: int, count: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """This process's share of global sequences start .. start + count * world: [count, S]."""
        return torch.stack([self.sequence(i) for i in self._indices(start, count, rank, world)])

    def marks_batch(self, start: int, count: int, rank: int = 0, world: int = 1) -> torch.Tensor | None:
        """The token marks of ``batch``'s sequences: [count, S] int64, or None for a stream without marks."""
        if self.marks is None:
            return None
        return torch.stack([self._row(i)[1] for i in self._indices(start, count, rank, world)])


class StreamingPacked:
    """Packed sequences read once, in order, from documents that do not fit in memory (hf: sources).

    Same interface as :class:`PackedStream` for increasing ``start``; resuming skips the sequences
    already consumed (reading them again), and every process reads the stream and keeps its share.
    """

    def __init__(self, documents: Iterator[list[int]], seq_len: int):
        self.documents, self.seq_len = documents, seq_len
        self.buffer: list[int] = []
        self.next_index = 0

    def _next_sequence(self) -> torch.Tensor:
        while len(self.buffer) < self.seq_len:
            try:
                self.buffer.extend(next(self.documents))
            except StopIteration:
                raise DataError("the data stream ended before the planned number of training tokens") from None
        row, self.buffer = self.buffer[: self.seq_len], self.buffer[self.seq_len :]
        self.next_index += 1
        return torch.tensor(row, dtype=torch.long)

    def sequence(self, index: int) -> torch.Tensor:
        if index < self.next_index:
            raise DataError("a streaming source is read forward only")
        while self.next_index < index:
            self._next_sequence()
        return self._next_sequence()

    def batch(self, start: int, count: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        return torch.stack([self.sequence(start + j * world + rank) for j in range(count)])

    def marks_batch(self, start: int, count: int, rank: int = 0, world: int = 1) -> None:
        return None  # DataConfig refuses unlikely repeats with streamed sources


def training_stream(config: DataConfig, tokenizer):
    """The training side of ``config``: in memory for local sources, streamed for hf: ones."""
    if any(s.startswith("hf:") for s in config.sources):
        docs = (
            encode_document(d, tokenizer, config)
            for d in iter_documents(config)
            if not is_heldout(d.doc_id, config)
        )
        return StreamingPacked(docs, config.seq_len)
    train, marks = [], []
    for doc, ids, held in _encoded(config, tokenizer):
        if not held:
            train.append(ids)
            if config.unlikely_repeats:
                marks.append(marks_of(doc, ids, tokenizer, config))
    if not train:
        raise _no_training_documents(config)
    return PackedStream(train, config.seq_len, config.seed, marks if config.unlikely_repeats else None)


def heldout_sequences(config: DataConfig, tokenizer, max_sequences: int) -> torch.Tensor:
    """Packed held-out sequences [N, S], at most max_sequences (in document order)."""
    docs: list[list[int]] = []
    needed = max_sequences * config.seq_len
    for doc in iter_documents(config):
        if is_heldout(doc.doc_id, config):
            docs.append(encode_document(doc, tokenizer, config))
            if sum(len(d) for d in docs) >= needed:
                break
    rows = pack(docs, config.seq_len)[:max_sequences]
    if rows.shape[0] == 0:
        raise DataError(
            f"held-out split of {', '.join(config.sources)} has fewer than {config.seq_len} tokens "
            f"(held-out fraction {config.heldout_fraction})"
        )
    return rows
