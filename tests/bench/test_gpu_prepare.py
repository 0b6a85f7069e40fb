"""bench/gpu_prepare.py: what a GPU check carries to a bare device (the download itself is pip's and
needs the network; here the shape directory, the pins and the commands are checked)."""

from __future__ import annotations

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
