"""Every `balcony serve` flag and BALCONY_* variable the deploy files set, and the CLI contract.

Sources: the Dockerfile's ENTRYPOINT/CMD/ENV of its final stages, the rendered Kubernetes
overlays (container command/args/env and the ConfigMaps they load), both compose files, and the
command lines in docs/deployment.md. Each setting is a `Setting(flag, value, source)`, with
environment variables turned into the flag they stand for (BALCONY_MAX_NUM_SEQS ->
--max-num-seqs). BALCONY_HOME is not a flag: it names the model cache.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

import kustomize_lite

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
OVERLAYS = REPO / "deploy/kubernetes/overlays"
COMPOSE_FILES = sorted((REPO / "deploy/observability").glob("docker-compose*.yml"))
DOCS = REPO / "docs/deployment.md"

ENV_PREFIX = "BALCONY_"
# BALCONY_* variables that are not `balcony serve` flags.
NON_FLAG_ENV = {"BALCONY_HOME"}
# Placeholders and test-only names the docs may mention.
DOC_ONLY_ENV = {"BALCONY_FOO_BAR", "BALCONY_TEST_MODEL", "BALCONY_TEST_ADAPTERS", "BALCONY_TEST_READY_TIMEOUT",
                "BALCONY_SERVE_SERVICE_HOST", "BALCONY_SERVE_PORT"}  # the last two: Kubernetes service links

# `balcony serve` flags from the server contract; None = free value.
CONTRACT_FLAGS: dict[str, set[str] | None] = {
    "--model": None,
    "--adapters": None,
    "--dtype": {"auto", "float32", "bfloat16", "float16"},
    "--quantization": {"auto", "none", "fp16", "bf16", "fp16+bf16", "int8"},
    "--device": {"auto", "cpu", "cuda"},
    "--enforce-eager": {"1", "true", "yes", "on", "0", "false", "no", "off"},
    "--host": None,
    "--port": None,
    "--api-key": None,
    "--max-num-seqs": None,
    "--max-queued-requests": None,
    "--max-model-len": None,
    "--num-kv-blocks": None,
    "--shutdown-timeout": None,
    "--budget-policy": {"best-effort", "reject"},
    "--exits": None,
    "--starvation-ratio": None,
    "--served-model-name": None,
    "--no-prefix-caching": {"1", "true", "yes", "on", "0", "false", "no", "off"},
    "--no-overlap-steps": {"1", "true", "yes", "on", "0", "false", "no", "off"},
    "--tool-call-parser": {"auto", "hermes", "llama3_json", "none"},
    "--log-level": {"debug", "info", "warning", "error"},
    "--event-loop": {"asyncio", "uvloop"},
    "--engine-process": {"1", "true", "yes", "on", "0", "false", "no", "off", "auto"},
    "--override-generation-config": None,
}
INTEGER_FLAGS = {"--port", "--max-num-seqs", "--max-queued-requests", "--max-model-len", "--num-kv-blocks"}
NUMBER_FLAGS = {"--shutdown-timeout", "--starvation-ratio"}


@dataclass(frozen=True)
class Setting:
    flag: str | None  # "--max-num-seqs"; None for a non-flag variable such as BALCONY_HOME
    value: str | None  # None where the value is not known here (a secret, a compose default)
    source: str  # where it is set, for messages
    env: str | None = None  # the variable's name when set through the environment


def env_to_flag(name: str) -> str | None:
    if name in NON_FLAG_ENV:
        return None
    return "--" + name[len(ENV_PREFIX):].lower().replace("_", "-")


def flag_to_env(flag: str) -> str:
    return ENV_PREFIX + flag[2:].upper().replace("-", "_")


def from_env(name: str, value, source: str) -> Setting:
    return Setting(env_to_flag(name), None if value is None else str(value), source, env=name)


def from_argv(argv: list[str], source: str) -> list[Setting]:
    """Flags in an argument list that follows `balcony serve` (or the image's entrypoint)."""
    settings = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            if "=" in arg:
                flag, value = arg.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                flag, value = arg, argv[i + 1]
                i += 1
            else:
                flag, value = arg, None
            settings.append(Setting(flag, value, source))
        i += 1
    return settings


# ---------------------------------------------------------------------------------------------
# Dockerfile

@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments), continuations joined


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    logical, buffer = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continuation
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        logical.append(buffer + stripped)
        buffer = ""
    stages: list[Stage] = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            parts = arguments.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, parts[0], []))
        elif stages:
            stages[-1].instructions.append((instruction, arguments.strip()))
    return stages


def parse_env_instruction(arguments: str) -> dict[str, str]:
    """ENV a=1 b="two words" (the legacy `ENV a 1` form is rejected by hadolint anyway)."""
    return dict(token.split("=", 1) for token in shlex.split(arguments))


def final_stages(stages: list[Stage]) -> list[Stage]:
    """Stages no other stage builds on or copies from: the images users run."""
    used = set()
    for stage in stages:
        used.add(stage.base)
        for instruction, arguments in stage.instructions:
            match = re.search(r"--from=(\S+)", arguments)
            if instruction == "COPY" and match:
                used.add(match.group(1))
    return [stage for stage in stages if stage.name not in used]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    if not isinstance(value, list):
        raise TypeError(f"{arguments!r} is not exec (JSON array) form")
    return value


def dockerfile_settings(path: Path = DOCKERFILE) -> list[Setting]:
    settings = []
    for stage in final_stages(dockerfile_stages(path)):
        entrypoint: list[str] = []
        cmd: list[str] = []
        for instruction, arguments in stage.instructions:
            if instruction == "ENV":
                for name, value in parse_env_instruction(arguments).items():
                    if name.startswith(ENV_PREFIX):
                        settings.append(from_env(name, value, f"Dockerfile stage {stage.name}: ENV"))
            elif instruction == "ENTRYPOINT":
                entrypoint = exec_form(arguments)
            elif instruction == "CMD":
                cmd = exec_form(arguments)
        argv = entrypoint + cmd
        settings.extend(from_argv(argv[2:], f"Dockerfile stage {stage.name}: ENTRYPOINT/CMD"))
    return settings


# ---------------------------------------------------------------------------------------------
# Kubernetes

def kubernetes_settings(overlays: Path = OVERLAYS) -> list[Setting]:
    settings = []
    for overlay in sorted(p for p in overlays.iterdir() if p.is_dir()):
        settings.extend(overlay_settings(overlay))
    return settings


def overlay_settings(overlay: Path) -> list[Setting]:
    """Settings of every container in one rendered overlay: ConfigMaps first, then env."""
    settings = []
    objects = kustomize_lite.build(overlay)
    config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    for obj in objects:
        if obj["kind"] not in kustomize_lite.POD_SPEC_PATHS:
            continue
        spec = obj
        for key in kustomize_lite.POD_SPEC_PATHS[obj["kind"]]:
            spec = spec[key]
        for container in spec.get("containers", []):
            where = f"{overlay.name}: {obj['kind']}/{obj['metadata']['name']} container {container['name']}"
            command, args = container.get("command"), container.get("args", [])
            if command and command[:2] != ["balcony", "serve"]:
                raise ValueError(f"{where}: command {command} is not `balcony serve`")
            settings.extend(from_argv((command or [])[2:] + args, where + " args"))
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef")
                if not ref:
                    continue
                config_map = config_maps.get(ref["name"])
                if config_map is None:
                    raise ValueError(f"{where}: envFrom ConfigMap {ref['name']} is not in the overlay")
                for name, value in config_map.get("data", {}).items():
                    if name.startswith(ENV_PREFIX):
                        settings.append(from_env(name, value, f"{overlay.name}: ConfigMap/{ref['name']}"))
            for env in container.get("env", []):
                if env["name"].startswith(ENV_PREFIX):
                    settings.append(from_env(env["name"], env.get("value"), where + " env"))
    return settings


def overlay_env(overlay: Path) -> dict[str, str | None]:
    """BALCONY_* -> value the server container of one overlay sees (env wins over envFrom)."""
    return {s.env: s.value for s in overlay_settings(overlay) if s.env}


# ---------------------------------------------------------------------------------------------
# Compose

COMPOSE_DEFAULT_RE = re.compile(r"^\$\{(\w+)(?::?-([^}]*))?\}$")


def compose_settings(files: list[Path] = COMPOSE_FILES) -> list[Setting]:
    settings = []
    for path in files:
        data = yaml.safe_load(path.read_text())
        for name, service in (data.get("services") or {}).items():
            image = str(service.get("image", ""))
            build = service.get("build")
            if "balcony-serve" not in image and not build:
                continue
            where = f"{path.name}: service {name}"
            environment = service.get("environment") or {}
            if isinstance(environment, list):
                environment = dict(item.split("=", 1) if "=" in item else (item, None) for item in environment)
            for env_name, value in environment.items():
                if not env_name.startswith(ENV_PREFIX):
                    continue
                if isinstance(value, str) and (match := COMPOSE_DEFAULT_RE.match(value)):
                    value = match.group(2)  # the default a user gets
                settings.append(from_env(env_name, value, where + " environment"))
            command = service.get("command") or []
            if isinstance(command, str):
                command = shlex.split(command)
            settings.extend(from_argv(command, where + " command"))
    return settings


# ---------------------------------------------------------------------------------------------
# Docs

def docs_settings(path: Path = DOCS) -> list[Setting]:
    """Flags after `balcony serve` or a `balcony-serve:TAG` image, and -e BALCONY_* in code blocks."""
    settings = []
    text = path.read_text()
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split(" #", 1)[0]
            try:
                tokens = shlex.split(command)
            except ValueError:
                continue
            if "--entrypoint" in tokens:
                continue  # arguments after the image go to another command
            for index, token in enumerate(tokens):
                if token == "serve" and index and tokens[index - 1] == "balcony":
                    settings.extend(from_argv(tokens[index + 1:], f"{path.name}: {command.strip()[:60]}"))
                elif re.fullmatch(r"(\S+/)?balcony-serve:\S+", token) and index and tokens[0] == "docker":
                    settings.extend(from_argv(tokens[index + 1:], f"{path.name}: {command.strip()[:60]}"))
    for name, value in re.findall(r"\b(BALCONY_[A-Z0-9_]+)(?:=([^\s`'\"]+))?", text):
        if name not in DOC_ONLY_ENV:
            settings.append(from_env(name, value or None, f"{path.name}: mentions {name}"))
    return settings


def all_settings() -> list[Setting]:
    return dockerfile_settings() + kubernetes_settings() + compose_settings() + docs_settings()


# ---------------------------------------------------------------------------------------------
# `balcony serve --help`

def help_flags(help_text: str) -> dict[str, set[str] | None]:
    """Flag -> its {choices} as argparse prints them, or None."""
    flags: dict[str, set[str] | None] = {}
    for match in re.finditer(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)(?:[ =]\{([^}]*)\})?", help_text):
        flag, choices = match.group(1), match.group(2)
        if choices:
            flags[flag] = {choice.strip() for choice in choices.split(",")}
        else:
            flags.setdefault(flag, None)
    return flags
