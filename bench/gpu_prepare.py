"""Build what one GPU check needs to carry to a bare device machine, and print the call to make.

The device machine has torch, triton and transformers but no internet and none of the serving
stack; a device call carries at most 64 MiB of ignored files. This puts in ``--out`` (default
``.whl/``, git-ignored):

- the wheels of what the project needs and the device's image lacks, with their dependencies, for
  the device's Python (SERVING_STACK: fastapi, uvicorn, pydantic, orjson, llguidance, gguf, and
  openai for the check's client, at this environment's versions), fetched with
  ``pip download --only-binary=:all:`` for that Python and manylinux;
- ``smollm2-135m-shape/``: the default model's config.json and tokenizer files, without its weights
  (bench/gpu_check.py builds random weights of that shape, seeded).

Then it prints the one device call, for `run` with ``carry: [".whl"]``. The wheels come with their
dependencies, one version of each (pip resolves them here), so the device installs them without
a resolver.

    python bench/gpu_prepare.py                  # about 10 MB, a few seconds
    python bench/gpu_prepare.py --python-version 3.11 --out /tmp/whl

A device session's minutes are few; everything that can be done here is done here.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

# pyproject.toml's runtime dependencies that the device's image holds (the device notes' package
# list) and that therefore do not travel; tests/bench/test_gpu_prepare.py checks that every
# dependency is in one list or the other, so a new one cannot be forgotten.
DEVICE_HAS = ("torch", "transformers", "safetensors", "tokenizers", "accelerate", "numpy", "triton",
              "prometheus-client", "httpx", "tqdm", "matplotlib")
# What travels: the dependencies the image lacks (an earlier run stopped at a missing fastapi
# dependency; orjson and gguf came after it), and openai for the check's client.
SERVING_STACK = ("fastapi", "uvicorn", "pydantic", "orjson", "llguidance", "gguf", "openai")
# Fetched without their dependencies: gguf's (numpy, pyyaml, requests, tqdm) are all on the device,
# and a carried numpy would shadow the one the device's torch was built against.
WITHOUT_DEPS = ("gguf",)
PLATFORMS = ("manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CARRY_LIMIT_MB = 64  # a device call's files: the tracked tree and the carried paths together
SHAPE_DIR = "smollm2-135m-shape"


def pinned(names: tuple[str, ...] = SERVING_STACK) -> list[str]:
    """Each distribution at this environment's version (what the tests ran against), else unpinned."""
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def download_command(requirements: list[str], out: Path, python_version: str, deps: bool = True) -> list[str]:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(out),
               "--python-version", python_version, "--implementation", "cp", *([] if deps else ["--no-deps"])]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return command + requirements


def copy_shape(model_dir: Path, out: Path) -> Path:
    """config.json and the tokenizer files of ``model_dir`` (no weights) into out/SHAPE_DIR."""
    from gpu_check import TOKENIZER_FILES  # the files gpu_check.py reads from --shape

    shape = out / SHAPE_DIR
    shape.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", *TOKENIZER_FILES):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, shape / name)
    if not (shape / "config.json").is_file():
        raise SystemExit(f"{model_dir} has no config.json: not a model directory")
    return shape


def device_command(out: Path) -> str:
    """Install the carried wheels beside the device's own packages (a --target directory on
    PYTHONPATH, as the device's notes advise: no resolver, nothing of the image replaced), then the
    check."""
    return (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
            f"{out}/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 bench/gpu_check.py "
            f"--shape {out}/{SHAPE_DIR} --quick --out $OUT/gpu_h200.md --json $OUT/gpu_h200.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".whl"), help="where the wheels and the shape go")
    parser.add_argument("--python-version", default="3.12", help="the device's Python (default %(default)s)")
    parser.add_argument("--model", default="smollm2-135m", help="model whose shape travels (default %(default)s)")
    parser.add_argument("--no-download", action="store_true", help="only the shape directory (tests)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "bench"))
    from balcony_runtime.model_source import resolve_model

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    shape = copy_shape(resolve_model(args.model).path, out)
    print(f"shape: {shape} ({', '.join(sorted(p.name for p in shape.iterdir()))})")
    requirements = pinned()
    if not args.no_download:
        for stale in out.glob("*.whl"):  # (two versions of one package stop the device's install)
            stale.unlink()
        alone = [r for r in requirements if r.split("==")[0] in WITHOUT_DEPS]
        for group, deps in (([r for r in requirements if r not in alone], True), (alone, False)):
            command = download_command(group, out, args.python_version, deps)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
                print(f"pip download failed (exit {done.returncode}): {' '.join(command)}", file=sys.stderr)
                return 1
        shadowing = sorted(p.name for p in out.glob("*.whl")
                           if p.name.split("-")[0].lower().replace("_", "-") in DEVICE_HAS)
        if shadowing:  # a dependency pulled in something the device's image has: it would shadow it
            print(f"{', '.join(shadowing)}: the device has these; not carried", file=sys.stderr)
            for name in shadowing:
                (out / name).unlink()
    from gpu_train import tracked_bytes  # (what every device call brings besides its carry)

    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    tree_mb = tracked_bytes() / 2**20
    wheels = sorted(p.name for p in out.glob("*.whl"))
    print(f"{len(wheels)} wheels in {out}, {size_mb:.1f} MiB in all, beside a tracked tree of {tree_mb:.1f} MiB "
          f"(a device call brings at most {CARRY_LIMIT_MB} MiB)")
    if size_mb + tree_mb > CARRY_LIMIT_MB:
        print(f"{out} and the tree are too large for one device call", file=sys.stderr)
        return 1
    print(f"\nThe device call (run, carry [\"{out}\"]; the check takes a few minutes):\n")
    print(device_command(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
