"""The kustomize overlays build, every object validates against the Kubernetes schemas, and the
pieces fit together (probes, ports, selectors, grace period, GPU scheduling, autoscaling)."""

import shutil
import subprocess

import pytest
import yaml

import deploy_settings as ds
import kustomize_lite
import metric_names as mn
from deploy_support import REPO, require_module

KUBERNETES = REPO / "deploy/kubernetes"
OVERLAYS = sorted(p for p in (KUBERNETES / "overlays").iterdir() if p.is_dir())
# Oldest Kubernetes the manifests promise to work on, and the newest schemas installed.
MIN_KUBERNETES = "1.29"
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def one(objects, kind):
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(deployment):
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "balcony-serve")


@pytest.fixture(scope="module", params=OVERLAYS, ids=[p.name for p in OVERLAYS])
def overlay(request):
    return request.param, kustomize_lite.build(request.param)


def test_overlays_exist():
    assert {p.name for p in OVERLAYS} >= {"gpu", "cpu"}


def test_every_object_validates_against_the_kubernetes_schemas(overlay):
    kubernetes_validate = require_module("kubernetes_validate", "pip install kubernetes-validate")
    from kubernetes_validate.utils import latest_version

    path, objects = overlay
    checked = 0
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        for version in (MIN_KUBERNETES, latest_version()):
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{path.name}: {obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes "
                            f"{version} at {'/'.join(map(str, error.path))}: {error.message}")
        checked += 1
    assert checked >= 7


def test_crds_are_well_formed(overlay):
    """ServiceMonitor and PrometheusRule have no schema in kubernetes-validate: check by hand."""
    _, objects = overlay
    service = one(objects, "Service")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items(), "the ServiceMonitor must select the Service"
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        assert endpoint["interval"].endswith("s") and endpoint["scrapeTimeout"].endswith("s")
        assert int(endpoint["scrapeTimeout"][:-1]) <= int(endpoint["interval"][:-1])
    # With no jobLabel, the job label is the Service name: what the alert rules select on.
    assert service["metadata"]["name"] == "balcony-serve"

    rule = one(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"}
        for item in group["rules"]:
            assert set(item) <= {"alert", "record", "expr", "for", "labels", "annotations"}
            assert ("alert" in item) != ("record" in item)


def test_deployment_probes_ports_and_settings_agree(overlay):
    path, objects = overlay
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    server = container(deployment)
    env = ds.overlay_env(path)
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    assert ports == {"http": int(env["BALCONY_PORT"])}
    assert env["BALCONY_HOST"] == "0.0.0.0"

    assert server["startupProbe"]["httpGet"]["path"] == "/ready"
    assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["port"] in ports
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "first start loads and warms the model"

    # The pod gets preStop + the server's shutdown timeout + a margin before SIGKILL.
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= int(pre_stop[1]) + float(env["BALCONY_SHUTDOWN_TIMEOUT"]) + 5

    assert pod["enableServiceLinks"] is False, "service links inject BALCONY_SERVE_* variables"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns replicas"
    assert server["image"] != "balcony-serve", f"{path.name}: the overlay must name a built image"


def test_model_cache_is_a_persistent_volume_at_balcony_home(overlay):
    path, objects = overlay
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    home = ds.overlay_env(path)["BALCONY_HOME"]
    mount = next(m for m in container(deployment)["volumeMounts"] if m["mountPath"] == home)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert claim in {o["metadata"]["name"] for o in by_kind(objects, "PersistentVolumeClaim")}
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"], "the cache must be writable"
    writable = {m["mountPath"] for m in container(deployment)["volumeMounts"]}
    if container(deployment)["securityContext"].get("readOnlyRootFilesystem"):
        assert {"/tmp", "/dev/shm"} <= writable


def test_selectors_and_references_resolve(overlay):
    path, objects = overlay
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert one(objects, "Service")["spec"]["selector"].items() <= pod_labels.items()
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = one(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for source in container(deployment).get("envFrom", []):
        assert ("ConfigMap", source["configMapRef"]["name"]) in names
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, f"{path.name}: set one namespace"
    assert {o["metadata"]["name"] for o in by_kind(objects, "Namespace")} == namespaces


def test_gpu_overlay_schedules_on_nvidia_gpus():
    objects = kustomize_lite.build(KUBERNETES / "overlays/gpu")
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert int(container(deployment)["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert ds.overlay_env(KUBERNETES / "overlays/gpu")["BALCONY_DEVICE"] == "cuda"
    assert "cuda" in container(deployment)["image"].rsplit(":", 1)[-1]
    assert one(objects, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"], (
        "replicas on several nodes share the model cache")


def test_cpu_overlay_needs_no_gpu():
    objects = kustomize_lite.build(KUBERNETES / "overlays/cpu")
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert "runtimeClassName" not in pod
    assert "nvidia.com/gpu" not in container(deployment)["resources"].get("limits", {})
    assert ds.overlay_env(KUBERNETES / "overlays/cpu")["BALCONY_DEVICE"] == "cpu"
    assert container(deployment)["image"].endswith(":cpu")


def test_hpa_scales_on_the_queue_through_prometheus_adapter(overlay):
    _, objects = overlay
    hpa = one(objects, "HorizontalPodAutoscaler")
    exposed = mn.adapter_exposed_names()
    metrics = hpa["spec"]["metrics"]
    assert [m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"] == ["balcony_num_requests_waiting"]
    for metric in metrics:
        name = metric[metric["type"][0].lower() + metric["type"][1:]]["metric"]["name"]
        assert name in exposed, f"no prometheus-adapter rule serves {name}"
    assert exposed["balcony_num_requests_waiting"] == "balcony:num_requests_waiting"


def test_prometheus_adapter_rules_are_well_formed():
    values = yaml.safe_load(mn.ADAPTER_VALUES.read_text())
    assert values["prometheus"]["url"].startswith("http")
    for rule in values["rules"]["custom"]:
        assert set(rule) == {"seriesQuery", "resources", "name", "metricsQuery"}
        overrides = rule["resources"]["overrides"]
        assert overrides["namespace"] == {"resource": "namespace"} and overrides["pod"] == {"resource": "pod"}
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"]
        assert ":" not in rule["name"]["as"], "custom metrics API names cannot hold a colon"


def test_kustomizations_use_only_what_kustomize_lite_builds():
    for path in [KUBERNETES / "base", *OVERLAYS]:
        data = yaml.safe_load((path / "kustomization.yaml").read_text())
        assert data["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and data["kind"] == "Kustomization"
        assert set(data) <= kustomize_lite.SUPPORTED_FIELDS


def _canonical(objects):
    return sorted(
        ((o["kind"], o["metadata"].get("namespace") or "", o["metadata"]["name"]), yaml.safe_dump(o, sort_keys=True))
        for o in objects
    )


@pytest.mark.parametrize("path", [KUBERNETES / "base", *OVERLAYS], ids=lambda p: p.name)
def test_kustomize_lite_matches_kubectl_kustomize(path):
    """Optional cross-check: kubectl is not a CI requirement, kustomize_lite is what CI trusts."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (optional: it cross-checks tests/deploy/kustomize_lite.py)")
    result = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert _canonical(kustomize_lite.build(path)) == _canonical(expected)
