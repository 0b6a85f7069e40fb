"""The installable wheel (what the Docker image installs with `pip install .`) carries the shipped
adapters, so `balcony serve` in an image serves trained balconies, not fresh ones."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_includes_the_shipped_adapters(tmp_path):
    shipped = sorted(p.relative_to(REPO).as_posix()
                     for p in (REPO / "balcony_runtime" / "shipped_adapters").glob("*/*") if p.is_file())
    assert shipped, "no shipped adapters in the source tree"
    # Build from a clean copy: setuptools leaves build/ in the source tree, and a stale build/lib
    # there could hide a file missing from the package data.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".venv", ".benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
                   check=True, timeout=600, capture_output=True)
    (wheel,) = tmp_path.glob("balcony_serve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(shipped) <= names
    assert {"server/cli.py", "kernels/dispatch.py", "balcony_runtime/loader.py"} <= names
    assert "kernels/native/cpu_decode.c" in names  # compiled where it runs (kernels/cpu_native.py)
