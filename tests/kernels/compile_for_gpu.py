"""Compile every kernel for an NVIDIA GPU without one: ``python tests/kernels/compile_for_gpu.py``.

The interpreter runs a kernel's Python, not Triton's compiler, so it misses what only compilation
checks (dot shapes, types, control flow). Here each launcher runs on CPU tensors with its launch
intercepted: the arguments it would pass are turned into a signature and compiled ahead of time,
down to a cubin with the ptxas that ships in Triton's wheel, by default for sm_90 (H100/H200) and
sm_80 (A100) in bf16 and fp32 (about a minute on two cores; the test does sm_90 bf16 only).
Needs TRITON_INTERPRET unset (tests/kernels/test_compile_for_gpu.py runs it in a subprocess).
Prints one line per compiled variant; exits 1 on the first failure, with its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import launch  # noqa: E402

TRITON_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
                torch.int32: "*i32", torch.int64: "*i64"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def _scalar_type(value) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type launch argument {value!r}")


def compile_launches(fn, launches, targets) -> list[str]:
    """AOT-compile each captured launch of ``fn`` for each target; returns what was compiled."""
    done, seen = [], set()
    for args, kwargs in launches:
        bound = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
        constexprs = {p.name: bound[p.name] for p in fn.params if p.is_constexpr}
        signature = {
            name: "constexpr" if name in constexprs
            else TRITON_TYPES[value.dtype] if isinstance(value, torch.Tensor) else _scalar_type(value)
            for name, value in bound.items()
        }
        options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
        variant = repr((sorted(signature.items()), sorted(constexprs.items()), sorted(options.items())))
        if variant in seen:  # same types and constants as one already compiled: the same binary
            continue
        seen.add(variant)
        for target in targets:
            triton.compile(ASTSource(fn, signature, constexprs), target=target, options=options)
            done.append(f"{fn.__name__} sm_{target.arch} {constexprs} {options}")
    return done


def capture(fn) -> list:
    """Make ``fn[grid](...)`` record its arguments instead of launching."""
    launches = []
    fn.run = lambda *args, grid, warmup, **kwargs: launches.append((args, kwargs))
    return launches


def main() -> int:
    parser = argparse.ArgumentParser(description="AOT-compile every kernel for NVIDIA GPUs")
    parser.add_argument("--archs", default="90,80", help="compute capabilities, e.g. 90,80")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="activation dtypes to compile for")
    args = parser.parse_args()
    if launch.interpreting():
        print("unset TRITON_INTERPRET: this compiles for the GPU", file=sys.stderr)
        return 2
    launch.check_device = lambda op, **tensors: None  # CPU tensors stand in for CUDA ones here

    import kernels.decode_attention as decode
    import kernels.prefill_attention as prefill
    import kernels.rms_norm as rms
    import kernels.rotary_cache as rotary
    import kernels.swiglu as swiglu

    kernels = [rms._rms_norm_kernel, rotary._rotary_cache_kernel, decode._decode_split_kernel,
               decode._decode_merge_kernel, prefill._prefill_kernel, swiglu._swiglu_kernel]
    launches = {fn: capture(fn) for fn in kernels}

    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        for q_heads, kv_heads, head_dim in ((9, 3, 64), (32, 8, 128)):
            x = torch.zeros(4, q_heads * head_dim, dtype=dtype)
            rms.rms_norm(x, torch.ones(x.shape[1], dtype=dtype), 1e-5, torch.zeros_like(x))
            rms.rms_norm(x, torch.ones(x.shape[1], dtype=dtype), 1e-5)
            rms.rms_norm(x, torch.ones(x.shape[1], dtype=dtype), 1e-5, torch.zeros_like(x), rows_per_program=4)
            q = torch.zeros(4, q_heads, head_dim, dtype=dtype)
            k = torch.zeros(4, kv_heads, head_dim, dtype=dtype)
            cache = torch.zeros(8, 16, kv_heads, head_dim, dtype=dtype)
            table = torch.zeros(32, head_dim // 2)
            rotary.rotary_and_cache(q, k, k, table, table, torch.zeros(4, dtype=torch.int64), cache, cache,
                                    torch.zeros(4, dtype=torch.int64))
            block_tables = torch.zeros(4, 8, dtype=torch.int32)
            lens = torch.ones(4, dtype=torch.int32)
            for splits in (1, 4):
                decode.decode_attention(q, cache, cache, block_tables, lens, 0.125, num_splits=splits)
            prefill.prefill_attention(q, cache, cache, block_tables[:2], torch.tensor([0, 2, 4], dtype=torch.int32),
                                      lens[:2], 0.125, 2)
            prefill.prefill_attention(torch.zeros(300, q_heads, head_dim, dtype=dtype), cache, cache, block_tables[:1],
                                      torch.tensor([0, 300], dtype=torch.int32), lens[:1], 0.125, 300)
        for tokens in (1, 40, 300):  # the three tile families
            swiglu.swiglu(torch.zeros(tokens, 576, dtype=dtype), torch.zeros(2 * 1536, 576, dtype=dtype))

    targets = [GPUTarget("cuda", int(arch), 32) for arch in args.archs.split(",")]
    for fn, captured in launches.items():
        for line in compile_launches(fn, captured, targets):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's notice; GPU launches fuse too
    sys.exit(main())
