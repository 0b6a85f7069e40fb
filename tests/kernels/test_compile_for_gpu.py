"""Every kernel compiles for an H100/H200 (sm_90), checked on a machine without a GPU.

The interpreter tests run the kernels' Python; only Triton's compiler checks what the GPU build
needs (dot shapes, types, control flow). tests/kernels/compile_for_gpu.py intercepts each launcher's
launch and compiles it ahead of time with the ptxas in Triton's wheel. It runs in a subprocess
because this suite's triton was imported with TRITON_INTERPRET=1, which builds no compilable kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")


def test_all_kernels_compile_for_sm90():
    try:
        from triton.backends import backends
    except ImportError:
        pytest.skip("this triton has no backend registry")
    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--archs", "90", "--dtypes", "bfloat16"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    compiled = done.stdout.splitlines()
    for kernel in ("_rms_norm_kernel", "_rotary_cache_kernel", "_decode_split_kernel", "_decode_merge_kernel",
                   "_prefill_kernel", "_swiglu_kernel"):
        assert any(line.startswith(kernel + " sm_90") for line in compiled), f"{kernel} was not compiled"
