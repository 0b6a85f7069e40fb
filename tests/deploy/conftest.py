"""tests/deploy: checks of the Dockerfile, Kubernetes manifests and observability stack.

With --import-mode=importlib, test modules cannot import their neighbours; the helper modules
here (kustomize_lite, metric_names, deploy_settings, deploy_support) are made importable by
putting this folder on sys.path. Their names are specific enough not to shadow anything.
"""

import os
import sys
from pathlib import Path

import pytest

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import deploy_settings  # noqa: E402
import deploy_support  # noqa: E402


@pytest.fixture(scope="session")
def test_model(request) -> tuple[str, str]:
    """(--model, --adapters) for live servers: BALCONY_TEST_MODEL / BALCONY_TEST_ADAPTERS, or else
    the suite's tiny random LLaMA (tests/conftest.py) with fresh balconies."""
    deploy_support.skip_unless_server_exists()
    if os.environ.get("BALCONY_TEST_MODEL"):
        return os.environ["BALCONY_TEST_MODEL"], os.environ.get("BALCONY_TEST_ADAPTERS", "none")
    try:
        return str(request.getfixturevalue("tiny_model_dir")), "none"
    except getattr(pytest, "FixtureLookupError", LookupError):
        pytest.fail("no test model: set BALCONY_TEST_MODEL (a value for `balcony serve --model`), or provide "
                    "the `tiny_model_dir` fixture in tests/conftest.py", pytrace=False)


@pytest.fixture(scope="session")
def live_server(test_model):
    """One `balcony serve` configured the way the CPU Kubernetes overlay configures it (its
    BALCONY_* variables), shared by the tests that only read from it."""
    overlay_env = deploy_settings.overlay_env(deploy_settings.OVERLAYS / "cpu")
    env = {k: v for k, v in overlay_env.items() if v is not None and k != "BALCONY_HOME"}
    model, adapters = test_model
    server = deploy_support.LiveServer(model, adapters, env=env).start()
    yield server
    server.stop()
