"""Every flag and BALCONY_* variable the deploy files pass is one `balcony serve` accepts: first
against the CLI contract, then against `balcony serve --help` and the CLI's own parsing."""

import subprocess

import pytest

import deploy_settings as ds
import deploy_support

SETTINGS = ds.all_settings()


def test_deploy_files_set_server_settings():
    sources = {setting.source.split(":")[0] for setting in SETTINGS}
    assert {"Dockerfile stage cpu", "Dockerfile stage cuda", "gpu", "cpu", "docker-compose.yml",
            "deployment.md"} <= sources, sources


def test_every_setting_is_a_contract_flag_with_a_valid_value():
    problems = []
    for setting in SETTINGS:
        if setting.flag is None:
            continue
        if setting.flag not in ds.CONTRACT_FLAGS:
            problems.append(f"{setting.source}: {setting.env or setting.flag} is not a `balcony serve` option")
            continue
        if setting.value is None:
            continue
        choices = ds.CONTRACT_FLAGS[setting.flag]
        if choices and setting.value not in choices:
            problems.append(f"{setting.source}: {setting.flag} {setting.value!r} is not one of {sorted(choices)}")
        try:
            if setting.flag in ds.INTEGER_FLAGS:
                int(setting.value)
            if setting.flag in ds.NUMBER_FLAGS:
                float(setting.value)
        except ValueError:
            problems.append(f"{setting.source}: {setting.flag} {setting.value!r} is not a number")
    assert not problems, "\n".join(problems)


def test_containers_listen_on_all_interfaces():
    hosts = {s.source: s.value for s in SETTINGS if s.flag == "--host" and s.source.split(":")[0] != "deployment.md"}
    assert hosts and set(hosts.values()) == {"0.0.0.0"}, hosts


# ---------------------------------------------------------------------------------------------
# Against the CLI itself.

def run_cli(*args, env=None):
    return subprocess.run(
        deploy_support.cli_command(*args), cwd=deploy_support.REPO, capture_output=True, text=True, timeout=300,
        env={**deploy_support.subprocess_env(), **(env or {})},
    )


@pytest.fixture(scope="module")
def serve_help():
    deploy_support.skip_unless_server_exists()
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    return ds.help_flags(result.stdout)


def test_every_flag_the_deploy_files_pass_is_accepted_by_balcony_serve(serve_help):
    problems = []
    for setting in SETTINGS:
        if setting.flag is None:
            continue
        if setting.flag not in serve_help:
            problems.append(f"{setting.source}: `balcony serve --help` has no {setting.flag}"
                            + (f" (for {setting.env})" if setting.env else ""))
            continue
        choices = serve_help[setting.flag]
        if choices and setting.value is not None and setting.value not in choices:
            problems.append(f"{setting.source}: {setting.flag} accepts {sorted(choices)}, not {setting.value!r}")
    assert not problems, "\n".join(problems)


def test_the_cli_still_offers_every_contract_flag(serve_help):
    """A flag the deploy docs describe but the CLI dropped would break users' own manifests."""
    missing = sorted(set(ds.CONTRACT_FLAGS) - set(serve_help))
    assert not missing, missing


@pytest.mark.parametrize("source", ["Dockerfile stage cpu", "Dockerfile stage cuda", "gpu", "cpu",
                                    "docker-compose.yml", "docker-compose.gpu.yml"])
def test_the_cli_parses_each_deploy_environment(source, serve_help):
    """The CLI turns BALCONY_* values into typed defaults when it builds its parser; a value it
    cannot convert stops `balcony serve` before anything loads. Run it with each file's variables."""
    env = {s.env: s.value for s in SETTINGS if s.env and s.value is not None and s.source.split(":")[0] == source}
    if source != "docker-compose.gpu.yml":
        assert env, f"{source} sets no BALCONY_* variables"
    result = run_cli("serve", "--help", env=env)
    assert result.returncode == 0, f"{source} {env}:\n{result.stdout}{result.stderr}"
    for name in env:
        if name not in ds.NON_FLAG_ENV:
            assert f"[env {name}]" in result.stdout or ds.env_to_flag(name) in result.stdout, name
