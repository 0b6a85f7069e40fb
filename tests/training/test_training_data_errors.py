"""Bad data gives a clear error before any training; the split is by document and seeded."""

from __future__ import annotations

import json

import pytest

from balcony_runtime.training.data import (
    DataConfig, DataError, PackedStream, encode_document, is_heldout, is_raw, iter_documents,
    split_documents,
)
from balcony_runtime.training.config import TrainConfig
from balcony_runtime.training.trainer import train
from server.cli import main


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        list(iter_documents(DataConfig((str(tmp_path / "empty.txt"),))))


def test_folder_of_empty_files_has_no_training_documents(tmp_path, default_model):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.md").write_text("\n")
    with pytest.raises(DataError, match="no training documents"):
        split_documents(DataConfig((str(tmp_path),)), default_model.tokenizer)


def test_unknown_format_and_missing_source_are_refused(tmp_path):
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="unknown data format"):
        list(iter_documents(DataConfig((str(tmp_path / "data.parquet"),))))
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents(DataConfig((str(tmp_path / "nope"),))))
    with pytest.raises(DataError, match="hf:NAME"):
        list(iter_documents(DataConfig(("hf:only-a-name",))))


def test_jsonl_needs_its_text_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:2 has no string field 'text'"):
        list(iter_documents(DataConfig((str(path),))))
    path.write_text("{not json\n")
    with pytest.raises(DataError, match="not valid JSON"):
        list(iter_documents(DataConfig((str(path),))))


def test_sequence_longer_than_the_model_is_refused(text_corpus, tiny_model_dir, tmp_path, capsys):
    config = TrainConfig(data=DataConfig((str(text_corpus),), seq_len=512), output_dir=str(tmp_path),
                         model=str(tiny_model_dir), exits=(1, 2, 3), device="cpu", max_steps=1)
    with pytest.raises(DataError, match="sequence length 512 exceeds the model's 256 positions"):
        train(config, log=lambda _: None)
    code = main(["train", str(text_corpus), "--model", str(tiny_model_dir), "--exits", "1,2,3",
                 "--seq-len", "512", "--max-steps", "1", "--output-dir", str(tmp_path), "--device", "cpu"])
    assert code == 2 and "exceeds the model's 256 positions" in capsys.readouterr().err


def test_heldout_split_is_by_document_and_seeded(text_corpus, default_model):
    config = DataConfig((str(text_corpus),), seq_len=16, heldout_fraction=0.3, seed=5)
    ids = [d.doc_id for d in iter_documents(config)]
    held = {i for i in ids if is_heldout(i, config)}
    assert 0 < len(held) < len(ids)
    assert held == {i for i in ids if is_heldout(i, DataConfig(config.sources, heldout_fraction=0.3, seed=5))}
    assert held != {i for i in ids if is_heldout(i, DataConfig(config.sources, heldout_fraction=0.3, seed=6))}
    train_docs, heldout_docs = split_documents(config, default_model.tokenizer)
    assert len(train_docs) + len(heldout_docs) == len(ids)


def test_packed_stream_is_a_pure_function_of_the_index(default_model, text_corpus):
    train_docs, _ = split_documents(DataConfig((str(text_corpus),), seq_len=16), default_model.tokenizer)
    a, b = PackedStream(train_docs, 16, 0), PackedStream(train_docs, 16, 0)
    late = a.sequence(a.per_epoch + 3)  # second epoch, reshuffled
    assert b.sequence(3).shape == (16,) and a.sequence(3).equal(b.sequence(3))
    assert late.equal(b.sequence(b.per_epoch + 3))
    both = a.batch(10, 2, rank=0, world=2), a.batch(10, 2, rank=1, world=2)
    assert both[0][1].equal(a.sequence(12)) and both[1][0].equal(a.sequence(11))


def test_heldout_split_does_not_depend_on_where_the_folder_is(text_corpus, tmp_path):
    """A folder copied elsewhere (a data-building script's copy, another machine) holds out the
    same documents: ids are paths inside the folder, so training and evaluation agree."""
    import shutil

    moved = tmp_path / "elsewhere" / "corpus"
    shutil.copytree(text_corpus, moved)

    def held(folder):
        config = DataConfig((str(folder),), seq_len=16, heldout_fraction=0.3, seed=5)
        return {d.doc_id: d.text for d in iter_documents(config) if is_heldout(d.doc_id, config)}

    assert held(text_corpus) and held(text_corpus) == held(moved)


def test_raw_share_keeps_a_seeded_share_of_documents_plain(text_corpus, default_model):
    """--raw-share: the drawn documents encode exactly as without the template, the rest as chats;
    the draw is by document and seed, and independent of the held-out draw."""
    tok = default_model.tokenizer
    config = DataConfig((str(text_corpus),), seq_len=16, chat_template=True, raw_share=0.5, seed=5)
    plain = DataConfig(config.sources, seq_len=16)
    chat = DataConfig(config.sources, seq_len=16, chat_template=True, seed=5)
    docs = list(iter_documents(config))
    raw = {d.doc_id for d in docs if is_raw(d.doc_id, config)}
    assert 0 < len(raw) < len(docs)
    for doc in docs:
        want = plain if doc.doc_id in raw else chat
        assert encode_document(doc, tok, config) == encode_document(doc, tok, want)
    assert raw != {d.doc_id for d in docs if is_raw(d.doc_id, DataConfig(config.sources, chat_template=True,
                                                                          raw_share=0.5, seed=6))}
    held = DataConfig(config.sources, heldout_fraction=0.5, seed=5)
    assert raw != {d.doc_id for d in docs if is_heldout(d.doc_id, held)}
    assert not any(is_raw(d.doc_id, chat) for d in docs)
    with pytest.raises(DataError, match="raw share"):
        DataConfig(config.sources, raw_share=1.5, chat_template=True)
    with pytest.raises(DataError, match="only applies with the chat template"):
        DataConfig(config.sources, raw_share=0.5)
