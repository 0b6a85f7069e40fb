"""CI runs exactly the test command a newcomer reads in the README, so the two cannot drift apart."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "README.md has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_the_serve_and_test_commands():
    serve, test = readme_commands()[:2]
    assert "balcony serve" in serve
    assert "pytest" in test and "tests/install_system_tools.sh" in test


def test_ci_runs_the_readme_test_command_verbatim():
    test = readme_commands()[1]
    ci_lines = [line for line in (REPO / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == test

