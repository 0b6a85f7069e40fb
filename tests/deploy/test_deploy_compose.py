"""The docker-compose stack parses and its parts point at each other: build targets, mounted
files, the scrape target, Grafana's data source and dashboard provider, and the dashboard."""

import json
import re
import shutil
import subprocess

import pytest
import yaml

import deploy_settings as ds
import metric_names as mn
from deploy_support import REPO

OBSERVABILITY = REPO / "deploy/observability"
COMPOSE = OBSERVABILITY / "docker-compose.yml"
GPU_OVERRIDE = OBSERVABILITY / "docker-compose.gpu.yml"
SERVICE_KEYS = {"build", "image", "environment", "ports", "volumes", "shm_size", "stop_grace_period", "restart",
                "healthcheck", "command", "depends_on", "deploy"}


def load(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), f"{path.name} is not a compose file"
    return data


def test_compose_files_parse_with_known_keys_only():
    for path in (COMPOSE, GPU_OVERRIDE):
        data = load(path)
        assert set(data) <= {"name", "services", "volumes", "networks"}
        assert "version" not in data, "the `version` key is obsolete in the Compose Specification"
        for name, service in data["services"].items():
            assert set(service) <= SERVICE_KEYS, f"{path.name}: {name}: {set(service) - SERVICE_KEYS}"


def test_images_are_pinned():
    for name, service in load(COMPOSE)["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"


def test_balcony_service_builds_a_dockerfile_target_and_keeps_the_cache():
    stages = {stage.name for stage in ds.final_stages(ds.dockerfile_stages())}
    balcony = load(COMPOSE)["services"]["balcony"]
    build = balcony["build"]
    context = (OBSERVABILITY / build["context"]).resolve()
    assert context == REPO and (context / build["dockerfile"]).is_file()
    assert build["target"] in stages
    assert load(GPU_OVERRIDE)["services"]["balcony"]["build"]["target"] in stages
    devices = load(GPU_OVERRIDE)["services"]["balcony"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]

    cache_home = next(
        ds.parse_env_instruction(arguments)["BALCONY_HOME"]
        for stage in ds.dockerfile_stages() if stage.name == build["target"]
        for instruction, arguments in stage.instructions
        if instruction == "ENV" and "BALCONY_HOME" in arguments
    )
    volume_targets = {volume.split(":")[1] for volume in balcony["volumes"]}
    assert cache_home in volume_targets, "mount a volume at BALCONY_HOME or every start downloads the model"
    assert "8000:8000" in balcony["ports"]
    assert "/ready" in " ".join(balcony["healthcheck"]["test"])
    shutdown = float(balcony["environment"]["BALCONY_SHUTDOWN_TIMEOUT"])
    assert int(balcony["stop_grace_period"].rstrip("s")) >= shutdown + 5, "docker would SIGKILL mid-drain"


def test_bind_mounts_exist_and_named_volumes_are_declared():
    data = load(COMPOSE)
    declared = set(data.get("volumes") or {})
    for name, service in data["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (OBSERVABILITY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_prometheus_scrapes_the_balcony_service():
    data = load(COMPOSE)
    config = yaml.safe_load((OBSERVABILITY / "prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = jobs["balcony-serve"]["static_configs"][0]["targets"]
    assert targets == ["balcony:8000"] and "balcony" in data["services"]
    assert jobs["balcony-serve"]["metrics_path"] == "/metrics"
    command = data["services"]["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    data = load(COMPOSE)
    grafana = data["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    datasources = yaml.safe_load((OBSERVABILITY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    source = datasources["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "prometheus" in data["services"]
    providers = yaml.safe_load((OBSERVABILITY / "grafana/provisioning/dashboards/balcony.yml").read_text())
    provider_path = providers["providers"][0]["options"]["path"]
    assert mounts["./grafana/dashboards"] == provider_path
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider_path + "/")
    assert (OBSERVABILITY / "grafana/dashboards" / home.rsplit("/", 1)[1]).is_file()


def test_dashboard_is_well_formed_and_covers_what_the_issue_asks():
    dashboard = json.loads(mn.DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$\{?(\w+)\}?", target["expr"])) - {"__rate_interval", "__interval"}
            assert used <= variables, f"{panel['title']}: undefined variables {used - variables}"
    exprs = {panel["title"]: " ".join(t["expr"] for t in panel.get("targets", [])) for panel in panels}

    def panel_with(*needles):
        found = [title for title, expr in exprs.items() if all(needle in expr for needle in needles)]
        assert found, f"no panel uses {needles}"

    panel_with("balcony:request_success_total", "by (exit)")
    panel_with("balcony:generation_tokens_total", "by (exit)")
    panel_with("histogram_quantile(0.95", "balcony:time_to_first_token_seconds_bucket", "exit")
    panel_with("histogram_quantile(0.95", "balcony:inter_token_latency_seconds_bucket", "exit")
    panel_with("balcony:budget_requests_total", 'outcome="hit"')
    panel_with("balcony:num_requests_waiting")
    panel_with("balcony:kv_cache_usage_perc")


def test_docker_compose_config_accepts_the_stack():
    """Optional: the Compose plugin is not a CI requirement (no Docker engine here)."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("`docker compose` is not installed (optional: it re-checks the compose files)")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "-f", str(GPU_OVERRIDE), "config", "-q"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
