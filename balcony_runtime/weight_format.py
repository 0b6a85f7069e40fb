"""Pick the CPU's dtype and weight format by measuring them, once per machine.

A CPU decode step is bound by reading the weights, and which format reads fastest depends on the
machine, not on a flag: on a 2-core EPYC without AVX-512, bf16 matrices (converted in software)
beat fp32 for one row and lose for 16, FBGEMM's fp16 beats both; on one with AVX512-BF16, oneDNN's
packed bf16 ties fp16 for one row and beats it for 16; and torch's int8 kernel is fast with bf16
activations but a scalar loop with fp32 ones there
(docs/benchmarks.md has the figures). So ``--dtype auto`` and
``--quantization auto`` time the candidates on matrices of the model's own shapes, enough layers
to spill out of the caches, at 1 and 16 rows, and keep the fastest. The verdict is cached per
machine, thread count, torch version and shapes, so only the first start pays (about a second).

``auto`` never picks a lossy format (int8): that stays an explicit choice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from balcony_runtime.config import ModelArch
from balcony_runtime.cpu_contention import BUSY_CORES, CpuContention
from balcony_runtime.model.packed_weights import (FORMATS, QUANTIZATIONS, Bf16Weight, Fp16Weight, PackedWeight,
                                                  linear, packer)
from kernels.cpu_native import NativeKernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # the --dtype names
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
FP32_ONLY = ("fp16", "fp16+bf16")  # FBGEMM's format: float32 activations in and out
ROWS = (1, 16)  # one stream, and a busy batch
SPLIT_ROWS = (2, 4, 8, 16, 32, 64)  # where fp16+bf16 may switch from FBGEMM to oneDNN
TARGET_BYTES = 192 * 2**20  # fp32 bytes of the timed layers: past the last-level cache of a server CPU


@dataclass(frozen=True)
class WeightChoice:
    dtype: torch.dtype
    quantization: str  # "none" or a key of packed_weights.FORMATS
    timings_ms: dict[str, list[float]]  # candidate label -> ms per pass at each of ROWS
    cached: bool = False  # read back from disk instead of measured now
    bf16_from_rows: int | None = None  # fp16+bf16: products of this many rows and more take bf16
    others_cores: float | None = None  # CPU cores other processes used while it was measured

    @property
    def label(self) -> str:
        return candidate_label(self.dtype, self.quantization)


def candidate_label(dtype: torch.dtype, quantization: str) -> str:
    name = DTYPE_NAMES[dtype]
    return name if quantization == "none" else f"{name} + {quantization} weights"


def candidates(dtype: str, quantization: str) -> list[tuple[torch.dtype, str]]:
    """The (dtype, format) pairs a CPU start may choose between, given the two flags."""
    dtypes = [torch.float32, torch.bfloat16] if dtype == "auto" else [DTYPES[dtype]]
    # An explicit --dtype is a request for weights in that dtype (e.g. float32 for exactness):
    # auto packs weights only when the dtype is left to the measurement too.
    onednn = ["bf16", "fp16+bf16"] if Bf16Weight.supported() else []
    packing = ["none", "fp16", *onednn] if dtype == "auto" else ["none"]
    formats = packing if quantization == "auto" else [quantization]
    # FBGEMM's kernels take fp32 activations only. bf16 weights under bf16 activations are an
    # explicit choice only: the timing below measures matrices, and a bf16 model's other ops cost
    # more than fp32's on a CPU (the norms and RoPE upcast), which it would not see.
    return [(d, f) for d in dtypes for f in formats
            if not (f in FP32_ONLY and d != torch.float32)
            and not (f == "bf16" and quantization == "auto" and d != torch.float32)]


def split_crossover(fp16_ms: list[float], bf16_ms: list[float]) -> int | None:
    """The fewest rows from which oneDNN's bf16 is faster than FBGEMM's fp16 at every larger count
    of SPLIT_ROWS (None: never), given both formats' timings at SPLIT_ROWS."""
    crossover = None
    for rows, fp16, bf16 in reversed(list(zip(SPLIT_ROWS, fp16_ms, bf16_ms))):
        if bf16 >= fp16:
            break
        crossover = rows
    return crossover


def timing_matrices(arch: ModelArch) -> list[torch.Tensor]:
    """Random fp32 matrices of the model's shapes: enough decoder layers to pass TARGET_BYTES, then
    the head. Drawn once and converted per candidate (drawing dominates the measurement's cost)."""
    h, inter = arch.hidden_size, arch.intermediate_size
    q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    shapes = [(q_size + 2 * kv_size, h), (h, q_size), (2 * inter, h), (h, inter)]
    layers = max(2, min(arch.num_layers, math.ceil(TARGET_BYTES / (4 * sum(n * k for n, k in shapes)))))
    generator = torch.Generator().manual_seed(0)
    return [torch.empty(n, k).uniform_(-0.05, 0.05, generator=generator)
            for n, k in [*shapes * layers, (arch.vocab_size, h)]]


def time_candidate(matrices: list[torch.Tensor], dtype: torch.dtype, quantization: str,
                   repeats: int = 2, rows: tuple[int, ...] = ROWS, native: NativeKernels | None = None,
                   pack: Callable[[torch.Tensor], PackedWeight] | None = None) -> list[float]:
    """Best ms of a pass over ``matrices`` (x @ W^T for each) at each of ``rows``, in this format
    (packed by ``pack`` if given, else as the loader would with the ``native`` kernels)."""
    if pack is None and quantization != "none":
        pack = packer(quantization, native=native)
    weights = [m.to(dtype) if pack is None else pack(m.to(dtype)) for m in matrices]
    result = []
    for rows in rows:
        inputs = {k: torch.ones(rows, k, dtype=dtype) for k in {w.shape[1] for w in weights}}
        best = float("inf")
        for _ in range(repeats + 1):  # the first pass pays the kernels' one-time setup
            start = time.perf_counter()
            for w in weights:
                linear(inputs[w.shape[1]], w)
            best = min(best, time.perf_counter() - start)
        result.append(best * 1e3)
    return result


def choose_cpu_weights(arch: ModelArch, dtype: str, quantization: str, cache_dir: Path | None,
                       native: NativeKernels | None = None) -> WeightChoice:
    """Measure the candidates the flags allow (or read the verdict cached for this machine), each
    packed as the loader will pack it with the ``native`` kernels (None: torch's kernels only)."""
    options = candidates(dtype, quantization)
    if len(options) == 1:
        return WeightChoice(*options[0], timings_ms={})
    native_fp16 = native is not None and native.fp16_linear_fast
    key = _cache_key(arch, options, native_fp16)
    path = None if cache_dir is None else cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path is not None and path.is_file():
        try:
            entry = json.loads(path.read_text())
            if entry["key"] == key:
                return WeightChoice(DTYPES[entry["dtype"]], entry["quantization"], entry["timings_ms"], cached=True,
                                    bf16_from_rows=entry.get("bf16_from_rows"))
        except (OSError, ValueError, KeyError):
            pass  # unreadable: measure again and overwrite
    matrices = timing_matrices(arch)
    contention = CpuContention()
    contention.start()
    split = (torch.float32, "fp16+bf16")
    crossover, timings = None, {}
    if split in options:
        # fp16 and bf16 timed once over ROWS and SPLIT_ROWS: the crossover comes from the sweep, and
        # the split's own timing is theirs on each side of it (the same kernels on the same matrices).
        # The fp16 side is the split's own fp16 copy: with native kernels, their blocked layout
        # alone, which is not the fp16 format's (that keeps FBGEMM's too, for many rows).
        swept_rows = tuple(sorted({*ROWS, *SPLIT_ROWS}))
        split_fp16 = partial(Fp16Weight.pack, native=native, fbgemm=False)
        swept = {"fp16": time_candidate(matrices, torch.float32, "fp16", rows=swept_rows, pack=split_fp16),
                 "bf16": time_candidate(matrices, torch.float32, "bf16", rows=swept_rows)}
        swept = {f: dict(zip(swept_rows, ms)) for f, ms in swept.items()}
        for f, ms in swept.items():
            if not (f == "fp16" and native_fp16):
                timings[candidate_label(torch.float32, f)] = [ms[r] for r in ROWS]
        crossover = split_crossover(*([swept[f][r] for r in SPLIT_ROWS] for f in ("fp16", "bf16")))
        if crossover is None:  # oneDNN never wins here: the split would be fp16 with twice the memory
            options.remove(split)
        else:
            timings[candidate_label(*split)] = [swept["fp16" if r < crossover else "bf16"][r] for r in ROWS]
    for d, f in options:
        if candidate_label(d, f) not in timings:
            timings[candidate_label(d, f)] = time_candidate(matrices, d, f, native=native)
    timings = {candidate_label(*o): timings[candidate_label(*o)] for o in options}  # in the options' order
    del matrices
    others = contention.others_cores()

    def score(option: tuple[torch.dtype, str]) -> float:
        # Geometric mean over ROWS: a format must win for one stream and for a batch alike.
        return math.prod(timings[candidate_label(*option)]) ** (1 / len(ROWS))

    best = min(options, key=score)
    split = crossover if best[1] == "fp16+bf16" else None
    choice = WeightChoice(best[0], best[1], timings, bf16_from_rows=split, others_cores=others)
    # A verdict measured while other processes held the CPU is used for this run only: cached, it
    # would keep a busy moment's pick (a start beside a training job once picked plain fp32, 3x
    # slower) for every later start on this machine.
    if path is not None and (others is None or others < BUSY_CORES):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "dtype": DTYPE_NAMES[best[0]], "quantization": best[1],
                                   "timings_ms": timings, "bf16_from_rows": split}, indent=1))
        tmp.replace(path)  # atomic: a concurrent start never reads half a file
    return choice


def _cache_key(arch: ModelArch, options: list[tuple[torch.dtype, str]], native_fp16: bool) -> str:
    from balcony_runtime.routing.calibration_cache import machine_name

    return json.dumps({
        "machine": machine_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "shapes": [arch.hidden_size, arch.intermediate_size, arch.num_heads, arch.num_kv_heads,
                   arch.head_dim, arch.vocab_size, arch.num_layers],
        "options": [candidate_label(*o) for o in options], "target_bytes": TARGET_BYTES, "rows": ROWS,
        "split_rows": SPLIT_ROWS, "fp16_kernel": "native" if native_fp16 else "fbgemm",
        "version": 1,
    }, sort_keys=True)


def describe(choice: WeightChoice) -> str:
    """One log line: what was picked and what the others measured."""
    if not choice.timings_ms:
        return f"{choice.label} (as asked)"
    rows = "/".join(str(r) for r in ROWS)
    measured = "; ".join(f"{label} {'/'.join(f'{t:.1f}' for t in ms)} ms"
                         for label, ms in choice.timings_ms.items())
    split = f", bf16 from {choice.bf16_from_rows} rows" if choice.bf16_from_rows else ""
    busy = ""
    if choice.others_cores is not None and choice.others_cores >= BUSY_CORES:
        busy = (f"; other processes used {choice.others_cores:.1f} CPU cores meanwhile, so this verdict is "
                "not cached and the next start measures again")
    return f"{choice.label}{split} ({'cached' if choice.cached else 'measured'} at {rows} rows: {measured}{busy})"


def resolve_weights(dtype: str, quantization: str, device: torch.device, arch: ModelArch,
                    cache_dir: Path | None, native: NativeKernels | None = None) -> WeightChoice:
    """The dtype and weight format a model loads with, from the ``--dtype`` and ``--quantization``
    flags: GPUs take bf16 (auto) and their exact Triton path; CPUs measure (choose_cpu_weights,
    with the ``native`` kernels the model will run)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose {', '.join(QUANTIZATIONS)}")
    if device.type != "cpu":
        if quantization in FORMATS:
            raise ValueError(f"--quantization {quantization} is a CPU weight format (for bandwidth-bound CPU "
                             f"decode); the model is on {device.type}")
        return WeightChoice(torch.bfloat16 if dtype == "auto" else DTYPES[dtype], "none", {})
    if quantization in FP32_ONLY and dtype not in ("auto", "float32"):
        raise ValueError(f"--quantization {quantization} runs float32 activations through FBGEMM: use it "
                         f"with --dtype float32 or auto, not {dtype}")
    return choose_cpu_weights(arch, dtype, quantization, cache_dir, native)
