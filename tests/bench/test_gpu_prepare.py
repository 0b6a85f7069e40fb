"""bench/gpu_prepare.py: what a GPU check carries to a bare device (the download itself is pip's and
needs the network; here the shape directory, the pins and the commands are checked)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def prepare(bench_script):
    with bench_script("gpu_prepare") as module:
        yield module


def test_the_shape_travels_without_the_weights(prepare, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "whl"
    assert prepare.main(["--model", str(tiny_model_dir), "--out", str(out), "--no-download"]) == 0
    shape = out / prepare.SHAPE_DIR
    copied = {p.name for p in shape.iterdir()}
    assert "config.json" in copied and "tokenizer.json" in copied
    assert not any(name.endswith((".safetensors", ".bin", ".gguf")) for name in copied)
    assert (shape / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    printed = capsys.readouterr().out
    assert f"--shape {out}/{prepare.SHAPE_DIR}" in printed and f"--target /tmp/site {out}/*.whl" in printed


def test_wheels_are_pinned_to_this_environment_and_fetched_for_the_device(prepare, tmp_path):
    import fastapi

    requirements = prepare.pinned()
    assert f"fastapi=={fastapi.__version__}" in requirements
    command = prepare.download_command(requirements, tmp_path, "3.12")
    assert command[command.index("--python-version") + 1] == "3.12"
    assert "--only-binary=:all:" in command and command[-len(requirements):] == requirements
    assert {"manylinux2014_x86_64", "manylinux_2_31_x86_64"} <= set(command)


def test_a_directory_without_a_config_is_refused(prepare, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        prepare.copy_shape(tmp_path / "empty", tmp_path / "whl")


def test_every_runtime_dependency_either_travels_or_is_on_the_device(prepare):
    import re
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    names = {re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower() for dep in pyproject["project"]["dependencies"]}
    assert names <= set(prepare.SERVING_STACK) | set(prepare.DEVICE_HAS), names - set(prepare.DEVICE_HAS)
    assert not set(prepare.SERVING_STACK) & set(prepare.DEVICE_HAS)


def test_what_pip_fetches_is_cleaned_of_stale_and_shadowing_wheels(prepare, tiny_model_dir, tmp_path, monkeypatch):
    """Wheels from an earlier run go first (two versions of one package stop the device's
    install); a dependency the device's image has is not carried (it would shadow the image's)."""
    out = tmp_path / "whl"
    out.mkdir()
    (out / "fastapi-0.100.0-py3-none-any.whl").write_bytes(b"old")
    calls, real_run = [], subprocess.run

    def fake_pip(command, **kwargs):  # what `pip download` would leave in --dest
        if "download" not in command:
            return real_run(command, **kwargs)  # (git ls-files: the tracked tree's size)
        calls.append(command)
        dest = Path(command[command.index("--dest") + 1])
        for name in ("fastapi-9.9.9-py3-none-any.whl", "numpy-2.5.5-cp312-cp312-manylinux_2_28_x86_64.whl",
                     "prometheus_client-0.26.0-py3-none-any.whl"):
            (dest / name).write_bytes(b"wheel")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(prepare.subprocess, "run", fake_pip)
    assert prepare.main(["--model", str(tiny_model_dir), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.whl")) == ["fastapi-9.9.9-py3-none-any.whl"]
    assert len(calls) == 2 and "--no-deps" not in calls[0] and "--no-deps" in calls[1]  # gguf alone, no deps
    assert any(r.startswith("gguf") for r in calls[1]) and not any(r.startswith("gguf") for r in calls[0])
