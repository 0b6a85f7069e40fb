"""Fused C loops for a CPU decode step (native/cpu_decode.c), built on the machine that runs them.

Why C, and why here: on a CPU a one-row decode step of a small model spends about as long
dispatching small torch ops (norms, RoPE, cache writes, attention, SiLU: some thirty calls per
layer at several microseconds each) as in its matrix products (docs/benchmarks.md, issue 16). The
products stay in torch (FBGEMM, oneDNN); what lies between them becomes four calls into plain C:

- ``rms_norm``: the residual add and RMSNorm in one pass;
- ``attend``: RoPE of q and k, the cache write of k and v, and paged decode attention;
- ``silu_mul``: SwiGLU's activation of the fused gate/up product.

And one product (native/fp16_linear.c): fp16 weights in blocks of 16 output rows times fp32
activations, split across torch's own OpenMP team. For a step of a few rows it reads the weights
faster than FBGEMM's fp16 GEMM (docs/benchmarks.md), so the fp16 weight format
(model/packed_weights.py) takes it where it is vectorized and threaded (``fp16_linear_fast``).

The source is compiled once per machine with the system C compiler (``cc``, -O3 -march=native;
well under a second) into a cache directory the caller names, keyed by the source, the compiler
and the CPU's flags, and loaded with ctypes, which passes raw pointers: no torch headers, no
build step at install. Without a compiler, or when the build fails, :func:`load` returns None and
the torch references serve (the server logs why). The kernels take fp32 tensors on the CPU; any
other input, or one that needs gradients, goes to the reference instead, so results are the
reference's up to summation order (tests/kernels/test_cpu_native.py holds them to it).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import cpu_decode, reference
from kernels.cpu_decode import DecodeTables

log = logging.getLogger("balcony.kernels")

SOURCES = tuple(Path(__file__).with_name("native") / name for name in ("cpu_decode.c", "fp16_linear.c"))
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared")
# -fopenmp: the fp16 product's parallel loop, run by the libgomp torch loaded (same soname, so the
# loader reuses it: one team of threads in the process). Where the compiler has no OpenMP (clang
# without libomp), -fopenmp-simd: the `omp simd` loops still vectorize, the product runs on one
# thread and FBGEMM keeps the fp16 products.
_OPENMP_FLAGS = (("-fopenmp",), ("-fopenmp-simd",))

_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {  # C name -> (argument types, return type)
    "balcony_add_rms_norm": ([_p, _p, _p, _p, _p, _i64, _i64, _f32], None),
    "balcony_rope_cache": ([_p, _p, _p, _i64, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64], None),
    "balcony_decode_attention": ([_p, _p, _p, _p, _i64, _p, _p, _i64, _i64, _i64, _i64, _i64, _f32], ctypes.c_int),
    "balcony_silu_mul": ([_p, _p, _i64, _i64], None),
    "balcony_fp16_linear": ([_p, _p, _p, _i64, _i64, _i64, _i64], None),
    "balcony_fp16_linear_fast": ([], ctypes.c_int),
}
FP16_BLOCK = 16  # output rows per block of the fp16 product's weight layout (native/fp16_linear.c)


class NativeBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded here (the message says why)."""


def _cpu_flags() -> str:
    """What -march=native compiles for: the CPU's feature flags (a library built on one machine
    must not load on another that lacks an instruction it uses)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise NativeBuildError("no C compiler (cc, gcc or clang) on PATH")


def build(cache_dir: Path, defines: tuple[str, ...] = ()) -> Path:
    """Compile the sources into ``cache_dir`` (once per source, compiler and CPU); returns the library.
    ``defines``: extra macros (tests build BALCONY_PORTABLE, the loops without AVX-512 intrinsics)."""
    compiler = _compiler()
    flags = (*_FLAGS, *(f"-D{name}" for name in defines))
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"{compiler} --version failed: {exc}") from exc
    key = hashlib.sha256("\0".join([*(source.read_text() for source in SOURCES), version, " ".join(flags),
                                    repr(_OPENMP_FLAGS), _cpu_flags(), platform.machine()]).encode()).hexdigest()[:16]
    target = Path(cache_dir) / f"cpu_decode-{key}.so"
    if target.exists():
        return target
    # Built under a temporary name and renamed: a concurrent start never loads a half-written file.
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError as exc:  # a read-only or full cache folder: serve with the torch ops
        raise NativeBuildError(f"cannot write to {target.parent}: {exc}") from exc
    os.close(fd)
    try:
        for openmp in _OPENMP_FLAGS:  # the first that compiles
            done = subprocess.run([compiler, *flags, *openmp, *map(str, SOURCES), "-o", scratch, "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                break
        else:
            raise NativeBuildError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(scratch, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"{compiler} could not run: {exc}") from exc
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target


def openmp_runtimes() -> set[str]:
    """The OpenMP runtime libraries mapped into this process (by file), from /proc/self/maps
    (empty where there is none to read)."""
    names = ("libgomp", "libiomp", "libomp")
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    paths = {line.split(maxsplit=5)[-1] for line in lines if any(n in line.rsplit("/", 1)[-1] for n in names)}
    return {os.path.realpath(p) for p in paths if p.startswith("/")}


@dataclass(frozen=True)
class NativeKernels:
    """The C loops behind the signatures of kernels.dispatch.KernelOps' fields."""

    lib: ctypes.CDLL
    path: Path
    # fp16_linear is vectorized and runs on torch's own OpenMP team: faster than FBGEMM's fp16 GEMM
    # for a few rows. False where the build has no AVX-512 or no OpenMP, or where a second OpenMP
    # runtime got loaded (two teams would take turns on the cores); the product is exact anyway.
    fp16_linear_fast: bool = False

    @classmethod
    def open(cls, path: Path) -> "NativeKernels":
        try:
            lib = ctypes.CDLL(str(path))
            for name, (args, result) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, result
        except (OSError, AttributeError) as exc:
            raise NativeBuildError(f"cannot load {path}: {exc}") from exc
        fast = bool(lib.balcony_fp16_linear_fast())
        runtimes = openmp_runtimes() if fast else set()
        if len(runtimes) > 1:
            log.warning("native fp16 products off: the process has two OpenMP runtimes (%s); FBGEMM's serve",
                        ", ".join(sorted(runtimes)))
            fast = False
        return cls(lib, Path(path), fast)

    def fp16_linear(self, x: torch.Tensor, blocked: torch.Tensor, n: int) -> torch.Tensor:
        """x [T, K] @ W^T -> [T, n] fp32, W given as block_fp16(W) ([ceil(n / 16), K, 16] fp16).
        Inference only (no autograd). Checks are the cheap ones: a one-row step makes 121 of these
        calls, and ``blocked`` comes from block_fp16."""
        if x.dtype is not torch.float32 or x.dim() != 2 or not x.is_contiguous() or x.shape[1] != blocked.shape[1]:
            raise ValueError(f"fp16_linear takes a contiguous fp32 [T, {blocked.shape[1]}] input, "
                             f"not {x.dtype} {tuple(x.shape)}")
        rows, k = x.shape
        out = torch.empty(rows, n)
        self.lib.balcony_fp16_linear(x.data_ptr(), blocked.data_ptr(), out.data_ptr(), rows, n, k,
                                     torch.get_num_threads())
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """reference.rms_norm: (RMSNorm(x + residual) * weight, x + residual); x, residual [T, H]."""
        if not _plain(x, weight, residual) or x.dim() != 2:
            return reference.rms_norm(x, weight, eps, residual)
        rows, width = x.shape
        out = torch.empty_like(x)
        total = x if residual is None else torch.empty_like(x)
        self.lib.balcony_add_rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(),
                                      weight.data_ptr(), out.data_ptr(), total.data_ptr(), rows, width, eps)
        return out, total

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """reference.silu_mul: SiLU(gate) * up of gate_up [T, 2I] = [gate | up] -> [T, I]."""
        if not _plain(gate_up) or gate_up.dim() != 2:
            return reference.silu_mul(gate_up)
        rows, width = gate_up.shape
        out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
        self.lib.balcony_silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, width // 2)
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: DecodeTables, slots: torch.Tensor,
               block_tables: torch.Tensor, scale: float) -> torch.Tensor:
        """cpu_decode.attend: RoPE on q [B, Hq, D] and k [B, Hk, D], k and v written at ``slots`` [B],
        then each row's query against its cached context. Returns [B, Hq, D]."""
        batch, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        row_stride = q.stride(0)  # q, k and v are column ranges of one [B, (Hq + 2 Hk) D] product
        if (not _plain(tables.k_flat, tables.v_flat, tables.cos, tables.sin) or tables.context_lens is None
                or not all(t.dtype is torch.float32 and t.stride(2) == 1 and t.stride(1) == head_dim
                           and (batch == 1 or t.stride(0) == row_stride) for t in (q, k, v))
                or slots.dtype != torch.int64 or not slots.is_contiguous()
                or block_tables.dtype != torch.int32 or block_tables.stride(1) != 1
                or tables.context_lens.dtype != torch.int32 or not tables.context_lens.is_contiguous()):
            return cpu_decode.attend(q, k, v, tables, slots, block_tables, scale)
        rotated = torch.empty(batch, num_heads, head_dim)
        self.lib.balcony_rope_cache(q.data_ptr(), k.data_ptr(), v.data_ptr(), row_stride, tables.cos.data_ptr(),
                                    tables.sin.data_ptr(), slots.data_ptr(), rotated.data_ptr(),
                                    tables.k_flat.data_ptr(), tables.v_flat.data_ptr(),
                                    batch, num_heads, num_kv_heads, head_dim)
        out = torch.empty(batch, num_heads, head_dim)
        failed = self.lib.balcony_decode_attention(
            rotated.data_ptr(), tables.k_cache.data_ptr(), tables.v_cache.data_ptr(), block_tables.data_ptr(),
            block_tables.stride(0), tables.context_lens.data_ptr(), out.data_ptr(), batch, num_heads,
            num_kv_heads, head_dim, tables.k_cache.shape[1], scale)
        if failed:
            raise MemoryError("decode attention could not allocate its scores")
        return out


def block_fp16(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> fp16 [ceil(N / 16), K, 16]: blocked[b, k, j] = weight[16 b + j, k], zero rows
    past N (native/fp16_linear.c's layout)."""
    n, k = weight.shape
    blocks = -(-n // FP16_BLOCK)
    padded = torch.zeros(blocks * FP16_BLOCK, k, dtype=torch.float16)
    padded[:n] = weight.detach()
    return padded.view(blocks, FP16_BLOCK, k).transpose(1, 2).contiguous()


def unblock_fp16(blocked: torch.Tensor, n: int) -> torch.Tensor:
    """block_fp16's inverse: [ceil(N / 16), K, 16] -> [N, K] fp16."""
    blocks, k, width = blocked.shape
    return blocked.transpose(1, 2).reshape(blocks * width, k)[:n]


def _plain(*tensors: torch.Tensor | None) -> bool:
    """fp32, contiguous, on the CPU, and outside autograd: what the C loops take."""
    grad = torch.is_grad_enabled()  # False in inference mode, where serving runs
    for t in tensors:
        if t is not None and (t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous()
                              or (grad and t.requires_grad)):
            return False
    return True


def open_built(cache_dir: Path) -> NativeKernels:
    """The C kernels built for this machine (compiling them once); NativeBuildError says why not."""
    return NativeKernels.open(build(cache_dir))


def load(cache_dir: Path) -> NativeKernels | None:
    """open_built, or None with the reason logged (callers then use the torch ops)."""
    try:
        return open_built(cache_dir)
    except NativeBuildError as exc:
        log.warning("native CPU kernels unavailable, using torch ops: %s", exc)
        return None
