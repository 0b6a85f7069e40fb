"""yamllint (strict: warnings fail) over every YAML file under deploy/."""

import subprocess
import sys

from deploy_support import REPO, require_module

CONFIG = REPO / "deploy/.yamllint"


def test_all_deploy_yaml_is_lint_clean():
    require_module("yamllint", "pip install yamllint")
    files = sorted(p for p in (REPO / "deploy").rglob("*") if p.suffix in (".yml", ".yaml"))
    assert len(files) >= 15, files
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-f", "parsable", "-c", str(CONFIG), *map(str, files)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_yamllint_config_is_itself_clean():
    require_module("yamllint", "pip install yamllint")
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(CONFIG), str(CONFIG)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
