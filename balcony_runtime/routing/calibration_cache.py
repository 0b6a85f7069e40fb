"""The start-up calibration kept on disk, so a warm restart skips measuring (seconds to minutes).

An entry is the fitted step-cost model (its coefficients and the calibration steps it anchors on)
under a key of everything that changes what a step costs: the backbone (identity and weight
fingerprint), what the engine runs (architecture, served exits, which balconies carry a lens map,
the kernel implementation), dtype, device, torch's thread count, the machine (CPU model and count,
GPU name), the torch version, the calibration's own settings and this file's format version. A
cached model is only a start: the engine refits it from every live step (routing/step_cost.py), so
a machine that has become busier is followed within a few dozen steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from balcony_runtime.routing.step_cost import FEATURES, StepCostModel

FORMAT_VERSION = 1  # bump when the entry layout or the meaning of a feature changes

log = logging.getLogger("balcony.calibration")


@dataclass(frozen=True)
class CalibrationKey:
    """What a calibration depends on; two engines with equal keys cost the same per step."""

    model: str  # backbone identity and weight fingerprint
    structure: str  # architecture, served exits, balconies with a lens, kernels, weight quantization
    dtype: str  # e.g. "float32"
    device: str  # e.g. "cpu", "cuda:0"
    threads: int  # torch.get_num_threads(): CPU steps scale with it
    machine: str  # CPU model and count, GPU name
    software: str  # torch version: kernels change speed between releases
    settings: str  # the calibration's arguments (shapes measured)
    format_version: int = FORMAT_VERSION

    @classmethod
    def of(cls, engine, settings: dict) -> "CalibrationKey":
        import torch

        model = engine.model
        lens = [k for k in engine.exits if k < model.full_depth and model.balconies[str(k)].lens is not None]
        device = model.norm.device
        # The native library's file name carries a digest of its sources and build: a change to
        # the C kernels (the fp16 product, say) changes what a step costs.
        native = model.ops.native
        kernels = model.ops.name
        if native is not None:
            kernels += f" {native.path.name} fp16={native.fp16_linear_fast}"
        return cls(
            model=f"{engine.loaded.identity} {engine.loaded.fingerprint}",
            structure=(f"{model.arch} exits={list(engine.exits)} lens={lens} kernels={kernels} "
                       f"weights={model.quantization}"),
            dtype=str(model.dtype).removeprefix("torch."),
            device=str(device),
            threads=torch.get_num_threads(),
            machine=machine_name(device),
            software=f"torch {torch.__version__}",
            settings=json.dumps(settings, sort_keys=True),
        )

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def machine_name(device=None) -> str:
    """The CPU's model name and count, and the GPU's name when ``device`` is one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = f"{cpu} x{os.cpu_count()}"
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        name += f", {torch.cuda.get_device_name(device)}"
    return name


@dataclass(frozen=True)
class CachedCalibration:
    """A calibration read back from disk."""

    model: StepCostModel  # fitted; the engine refines it from live steps
    path: Path  # the entry's file
    measured_at: str  # when it was measured (local time, for the log)
    seconds: float  # how long measuring took: what this hit saved


@dataclass(frozen=True)
class CalibrationCache:
    """Calibrations on disk, one JSON file per key."""

    directory: Path  # e.g. $BALCONY_HOME/calibration
    reuse: bool = True  # False: measure even when an entry fits, and replace it (--recalibrate)

    def path_of(self, key: CalibrationKey) -> Path:
        return self.directory / f"{key.digest()}.json"

    def load(self, key: CalibrationKey, full_depth: int) -> CachedCalibration | None:
        """The entry for ``key``, or None (absent, unreadable, or written for another key)."""
        if not self.reuse:
            return None
        path = self.path_of(key)
        try:
            entry = json.loads(path.read_text())
            if entry.get("key") != asdict(key):
                return None  # a digest collision or an older layout: measure again
            coefficients = tuple(float(c) for c in entry["coefficients"])
            anchors = [(tuple(float(f) for f in features), float(seconds)) for features, seconds in entry["anchors"]]
            if len(coefficients) != len(FEATURES) or any(len(f) != len(FEATURES) for f, _ in anchors):
                raise ValueError("feature count differs")
            model = StepCostModel(full_depth, coefficients=coefficients, anchors=anchors)
            return CachedCalibration(model, path, str(entry["measured_at"]), float(entry["seconds"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable calibration cache entry %s: %s", path, exc)
            return None

    def store(self, key: CalibrationKey, model: StepCostModel, seconds: float) -> Path:
        """Write ``model`` under ``key`` atomically (a reader never sees half a file)."""
        path = self.path_of(key)
        entry = {
            "key": asdict(key),
            "coefficients": list(model.coefficients),
            "anchors": [[list(features), seconds_] for features, seconds_ in model.anchors],
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": round(seconds, 3),
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".partial-{os.getpid()}")
        partial.write_text(json.dumps(entry))
        partial.replace(path)
        return path
