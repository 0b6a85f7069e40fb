"""bench/gpu_train.py end to end on the CPU (--smoke): the weights split into parts that fit a
device call and reassembled byte for byte, the text archive, the probe, the closed-form start, a
short schedule, the held-out evaluation and the report, as the device would run it."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_train.py"


def test_pack_then_run_trains_and_reports(tmp_path, default_model, bench_script):
    from balcony_runtime.model_source import balcony_home

    train = tmp_path / "train"
    train.mkdir()
    (train / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    held = tmp_path / "held"
    held.mkdir()
    (held / "b.txt").write_text("A held-out paragraph about rivers, mountains and the sea. " * 40)
    pack = tmp_path / "pack"
    subprocess.run([sys.executable, str(SCRIPT), "--pack", str(pack), "--data", str(train), "--heldout", str(held)],
                   check=True)
    parts = sorted(pack.rglob("*.part-*"))
    names = [p.parent.name for p in parts]
    assert names == [chr(ord("a") + i) for i in range(len(names))] and len(names) >= 2
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_train
    finally:
        sys.path.remove(str(SCRIPT.parent))
    tree = gpu_train.tracked_bytes()
    assert tree > 0 and all(tree + p.stat().st_size <= 64 * 2**20 for p in parts)  # each fits one device call
    import importlib.metadata

    wheel = pack / names[-1] / f"gguf-{importlib.metadata.version('gguf')}-py3-none-any.whl"
    assert wheel.is_file()  # the device's image has no gguf: it travels with the last part

    # On the device: part a was kept by an earlier call, part b arrives with this one.
    (pack / "keep").mkdir()
    for p in parts:
        p.rename(pack / "keep" / p.name)
    home, out = tmp_path / "home", tmp_path / "out"
    env = {**os.environ, "BALCONY_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    back = tmp_path / "back"
    subprocess.run([sys.executable, str(SCRIPT), "--run", str(pack), "--smoke", "--out", str(out),
                    "--return-dir", str(back), "--answers-minutes", "0.01"], check=True, env=env)

    original = balcony_home() / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assembled = home / "downloads" / original.name
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(assembled) == digest(original)
    report = json.loads((out / "gpu_train.json").read_text())
    assert report["trained"] == {"steps": 2, "tokens": 2 * 2 * 64}
    assert report["probe_tokens_per_s"] > 0
    assert set(report["english_heldout"]["exits"]) == {"8", "15", "22"}
    for row in report["english_heldout"]["exits"].values():
        assert 1.0 < row["balcony"]["perplexity"] < 1e6
    meta = json.loads((out / "adapters" / "balcony.json").read_text())
    assert "gpu_train.py" in meta["training"]["command"]
    assert (out / "gpu_train.md").read_text().startswith("# Balconies trained on cpu")
    # What a device call brings back: at most 8 flat files of at most 16 MiB, the weights joined again
    # byte for byte.
    returned = sorted(back.iterdir())
    assert len(returned) <= 8 and all(p.is_file() and p.stat().st_size <= 16 * 2**20 for p in returned)
    parts = sorted(back.glob("balcony.safetensors.part-*"))
    assert len(parts) >= 2
    joined = b"".join(p.read_bytes() for p in parts)
    assert joined == (out / "adapters" / "balcony.safetensors").read_bytes()
    assert {"gpu_train.json", "balcony.json", "log.jsonl"} <= {p.name for p in returned}

    # The full model's answers to the pool's training prompts (one wave under --smoke), trained on
    # beside the text, and brought back compressed.

    with bench_script("chat_prompts") as chat_prompts:
        trainable, heldout = chat_prompts.split_pool(chat_prompts.read_pool(chat_prompts.DEFAULT_POOL))
    written = (out / "answers" / "generations.jsonl").read_text()
    rows = [json.loads(line) for line in written.splitlines()]
    assert len(rows) == report["answers"]["answers"] == 32 and all(r["prompt"] in trainable[:32] for r in rows)
    assert all(r["text"] for r in rows) and report["answers"]["tokens"] > 16
    assert meta["training"]["recipe"]["data"]["sources"][-1] == str(out / "answers")
    returned_answers = b"".join(p.read_bytes() for p in sorted(back.glob("generations.jsonl.xz.part-*")))
    assert lzma.decompress(returned_answers).decode() == written
    # The trained exits' greedy answers on held-out prompts, every exit, in the report.
    greedy = report["greedy_heldout_prompts"]
    assert greedy["prompts"] == 2 and set(greedy["exits"]) == {"8", "15", "22", "full"}
    assert "Greedy answers (float32)" in (out / "gpu_train.md").read_text()


def test_the_repositorys_text_is_read_when_the_pack_has_none(tmp_path):
    """A run whose directory holds no text archive unpacks bench/data's: training text from the
    recorded sources, and a held-out English set that shares no file with it."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_train
    finally:
        sys.path.remove(str(SCRIPT.parent))
    train, heldout = gpu_train.unpack(tmp_path, tmp_path / "home")  # no parts, no text.tar.xz
    folders = {p.relative_to(train).parts[:2] for p in train.rglob("*") if p.is_file() and len(p.relative_to(train).parts) > 2}
    assert folders == {("0-fit4", "text"), ("0-fit4", "pydoc"), ("2-fit5", "wordnet"), ("3-fit6", "perl")}
    answers = (train / "1-gen" / "generations.jsonl").read_text().splitlines()
    assert len(answers) == 320 and all(json.loads(line)["prompt"] for line in answers)
    held = sorted(p.name for p in heldout.iterdir())
    assert "constitution.txt" in held and len(held) == 17
    trained_text = {p.read_text(errors="replace")[:200] for p in train.rglob("*.txt")}
    assert not any(p.read_text()[:200] in trained_text for p in heldout.iterdir())


def test_a_carried_gguf_wheel_is_imported_where_the_machine_has_none(tmp_path, monkeypatch):
    """On the device (no gguf installed) the wheel packed beside part a goes on the path, and a
    process the run starts finds it too; a machine that has gguf keeps its own."""
    import importlib.util

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_train
    finally:
        sys.path.remove(str(SCRIPT.parent))
    wheel = gpu_train.fetch_gguf_wheel(tmp_path / "pack" / "a")
    (tmp_path / "pack" / "keep").mkdir()
    kept = tmp_path / "pack" / "keep" / wheel.name
    kept.write_bytes(wheel.read_bytes())
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    gpu_train.gguf_importable(tmp_path / "pack")  # gguf is installed here: nothing changes
    assert sys.path[0] != str(kept)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    gpu_train.gguf_importable(tmp_path / "pack")
    assert sys.path[0] == str(kept) and os.environ["PYTHONPATH"] == str(kept)
    # Python imports the package from the zip alone (in a process that cannot see the installed one).
    probe = ("import sys, numpy, yaml, tqdm, requests; sys.path = [p for p in sys.path if 'site-packages' not in p]; "
             "import gguf.quants, gguf.constants; print(gguf.__file__)")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert shown.startswith(str(kept))


def test_a_run_continues_from_given_adapters(tmp_path, default_model):
    """--init-from: a later GPU session trains on from the shipped adapters with a new schedule,
    without the closed-form fit, and the adapters record where they started; --answers-from adds an
    earlier run's answers to the text; --own-answers-minutes has the given adapters' exits answer
    training prompts greedily, in turn, and --unlikely-repeats / --unlikely-anchor / --teacher-frequency-penalty reach the trainer,
    the answers coming back compressed; --steps fixes the schedule's length."""
    pack = tmp_path / "pack"
    subprocess.run([sys.executable, str(SCRIPT), "--pack", str(pack)], check=True)
    shipped = REPO / "balcony_runtime" / "shipped_adapters" / "smollm2-135m"
    home, out, back = tmp_path / "home", tmp_path / "out", tmp_path / "back"
    env = {**os.environ, "BALCONY_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    answers = tmp_path / "answers"  # what an earlier run generated (its OUT/answers)
    answers.mkdir()
    (answers / "generations.jsonl").write_text(json.dumps({"prompt": "Tell me about violins.",
                                                           "text": "Violins have four strings. " * 30}) + "\n")
    subprocess.run([sys.executable, str(SCRIPT), "--run", str(pack), "--smoke", "--out", str(out),
                    "--init-from", str(shipped), "--answers-from", str(answers), "--greedy-prompts", "0", "--steps", "3",
                    "--own-answers-minutes", "0.01", "--unlikely-repeats", "2", "--unlikely-anchor", "--teacher-frequency-penalty", "1.5",
                    "--return-dir", str(back)],
                   check=True, env=env)
    meta = json.loads((out / "adapters" / "balcony.json").read_text())
    recipe = meta["training"]["recipe"]
    assert recipe["init_from"] == str(shipped)
    assert recipe["data"]["sources"][1:] == [str(answers), str(out / "own_answers")]
    assert recipe["data"]["unlikely_repeats"] and recipe["unlikelihood_weight"] == 2.0 and recipe["unlikely_anchor"]
    assert recipe["teacher_frequency_penalty"] == 1.5
    written = (out / "own_answers" / "generations.jsonl").read_text()
    rows = [json.loads(line) for line in written.splitlines()]
    assert len(rows) == 32 and [r["exit"] for r in rows[:6]] == ["8", "15", "22", "8", "15", "22"]
    assert all(r["prompt"] and r["finish"] in ("stop", "length") for r in rows)
    returned = b"".join(p.read_bytes() for p in sorted(back.glob("own_generations.jsonl.xz.part-*")))
    assert lzma.decompress(returned).decode() == written
    assert "Own answers: the exits answered 32" in (out / "gpu_train.md").read_text()
    report = json.loads((out / "gpu_train.json").read_text())
    assert report["answers"] == {"from": str(answers)} and "greedy_heldout_prompts" not in report
    assert report["own_answers"]["answers"] == 32
    assert report["trained"]["steps"] == 3  # --steps: a control arm matches another run's tokens
    assert meta["training"]["initialised_from"]["command"] == json.loads(
        (shipped / "balcony.json").read_text())["training"]["command"]
    assert not (out / "run" / "lens_fit.json").exists()  # no closed-form fit: the start is given


def test_a_failed_greedy_check_is_reported_not_fatal(tmp_path, monkeypatch, bench_script):
    """The greedy check runs after the adapters are trained: its fault is written into the report,
    and the run still writes its adapters and what comes back."""
    with bench_script("gpu_train") as gpu_train:
        def broken(*args, **kwargs):
            raise RuntimeError("no graphs today")

        monkeypatch.setattr(gpu_train, "greedy_check", broken)
        pack = tmp_path / "pack"
        monkeypatch.setenv("BALCONY_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        shipped = REPO / "balcony_runtime" / "shipped_adapters" / "smollm2-135m"
        gpu_train.pack(pack, [], None)
        out, back = tmp_path / "out", tmp_path / "back"
        monkeypatch.setattr(sys, "argv", ["gpu_train.py", "--run", str(pack), "--smoke", "--out", str(out),
                                          "--init-from", str(shipped), "--return-dir", str(back)])
        assert gpu_train.main() == 0
    report = json.loads((out / "gpu_train.json").read_text())
    assert report["greedy_heldout_prompts"] == {"error": "RuntimeError: no graphs today"}
    assert "the check failed (RuntimeError: no graphs today)" in (out / "gpu_train.md").read_text()
    assert (out / "adapters" / "balcony.safetensors").is_file() and (back / "balcony.json").is_file()
