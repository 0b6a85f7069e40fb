"""Our ``kernels`` package must import anywhere and never pass for Hugging Face's ``kernels``.

transformers asks ``is_kernels_available()`` and, when it says yes, loads hub kernels through that
package's API, which ours does not have. It says yes for an importable ``kernels`` whose version is
in [0.18.2, 0.19): ours has no ``__version__`` and its distribution (balcony-serve) is 0.1.0.
Each check runs in a fresh interpreter without TRITON_INTERPRET and with no GPU visible, as a
user's plain ``import kernels`` would be.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_kernels_works_without_a_gpu():
    out = _run(
        "import kernels, kernels.triton_ops\n"
        "from kernels import select_ops\n"
        "print(kernels.__file__)\n"
        "print(select_ops('cpu').name, select_ops('cpu', backend='triton').name)\n"
    )
    path, names = out.strip().splitlines()
    assert Path(path).resolve().is_relative_to(REPO), f"imported someone else's kernels: {path}"
    assert names == "torch triton"


def test_transformers_does_not_take_ours_for_hub_kernels():
    out = _run(
        "import kernels\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "print(kernels.__file__)\n"
        "print(is_kernels_available())\n"
    )
    path, available = out.strip().splitlines()
    assert Path(path).resolve().is_relative_to(REPO)
    assert available == "False"


def test_our_distribution_version_stays_below_the_hub_range():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert Version(version) < Version("0.18.2")
