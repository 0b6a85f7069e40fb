"""Every `balcony:` metric the deploy files use, and what the server promises to export.

The dashboard, the alert rules, prometheus-adapter's rules and the HorizontalPodAutoscaler all
name server metrics. `used_metrics()` collects each name with the PromQL expression and file it
came from; `CONTRACT` is the list the server honours (docs/deployment.md repeats it);
`exported_series()` reads a live /metrics page. The tests compare the three.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

import kustomize_lite

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy/observability/grafana/dashboards/balcony-serve.json"
ALERT_RULES = REPO / "deploy/observability/prometheus/rules/balcony-alerts.yml"
PROMETHEUS_RULE = REPO / "deploy/kubernetes/base/prometheusrule.yaml"
ADAPTER_VALUES = REPO / "deploy/kubernetes/prometheus-adapter/values.yaml"
OVERLAYS = REPO / "deploy/kubernetes/overlays"


@dataclass(frozen=True)
class Metric:
    name: str  # as registered, e.g. "balcony:request_success_total"
    type: str  # "counter" | "gauge" | "histogram"
    labels: frozenset[str]  # labels the server sets (not the scrape's job/instance)

    def sample_names(self) -> set[str]:
        """Series names a scrape of this metric yields."""
        if self.type == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}


EXIT = frozenset({"exit"})
CONTRACT = [
    Metric("balcony:time_to_first_token_seconds", "histogram", EXIT),
    Metric("balcony:inter_token_latency_seconds", "histogram", EXIT),
    Metric("balcony:e2e_request_latency_seconds", "histogram", EXIT),
    Metric("balcony:request_queue_time_seconds", "histogram", EXIT),
    Metric("balcony:router_prediction_error_seconds", "histogram", EXIT),
    Metric("balcony:num_requests_running", "gauge", frozenset()),
    Metric("balcony:num_requests_waiting", "gauge", frozenset()),
    Metric("balcony:kv_cache_usage_perc", "gauge", frozenset()),
    Metric("balcony:cpu_threads", "gauge", frozenset()),
    Metric("balcony:prompt_tokens_total", "counter", EXIT),
    Metric("balcony:generation_tokens_total", "counter", EXIT),
    Metric("balcony:request_success_total", "counter", EXIT | {"finished_reason"}),
    Metric("balcony:budget_requests_total", "counter", EXIT | {"outcome"}),
]
# Label values the contract fixes; `exit` is open ("8", "15", "22", "full", ...).
CONTRACT_LABEL_VALUES = {
    "finished_reason": {"stop", "length", "abort"},
    "outcome": {"hit", "miss", "none"},
}
# Labels Prometheus (static config or ServiceMonitor) attaches to every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}


def contract_series() -> dict[str, Metric]:
    """Series name -> the contract metric that yields it."""
    return {sample: metric for metric in CONTRACT for sample in metric.sample_names()}


# ---------------------------------------------------------------------------------------------
# Where the deploy files use metrics.

@dataclass(frozen=True)
class Expression:
    source: str  # "file: where", for messages
    promql: str


def dashboard_expressions(path: Path = DASHBOARD) -> list[Expression]:
    dashboard = json.loads(path.read_text())
    found = []

    def walk_panels(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append(Expression(f"{path.name}: panel {panel.get('title')!r}", target["expr"]))
            walk_panels(panel.get("panels", []))

    walk_panels(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if variable.get("type") == "query" and query:
            found.append(Expression(f"{path.name}: variable ${variable['name']}", query))
    return found


def rule_expressions(path: Path) -> list[Expression]:
    data = yaml.safe_load(path.read_text())
    groups = data["spec"]["groups"] if data.get("kind") == "PrometheusRule" else data["groups"]
    return [
        Expression(f"{path.name}: {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in groups
        for rule in group["rules"]
    ]


def adapter_rules(path: Path = ADAPTER_VALUES) -> list[dict]:
    return yaml.safe_load(path.read_text())["rules"]["custom"]


def adapter_expressions(path: Path = ADAPTER_VALUES) -> list[Expression]:
    return [Expression(f"{path.name}: seriesQuery", rule["seriesQuery"]) for rule in adapter_rules(path)]


def adapter_exposed_names(path: Path = ADAPTER_VALUES) -> dict[str, str]:
    """Custom metrics API name -> Prometheus series name, as prometheus-adapter renames them."""
    exposed = {}
    for rule in adapter_rules(path):
        series = series_name(rule["seriesQuery"])
        pattern = rule.get("name", {}).get("matches", "^(.*)$")
        template = rule.get("name", {}).get("as", "$1")
        match = re.search(pattern, series)
        if match is None:
            raise ValueError(f"adapter rule name.matches {pattern!r} does not match its series {series!r}")
        # Go's regexp template syntax ($1, ${1}) -> Python's (\g<1>).
        python_template = re.sub(r"\$\{?(\w+)\}?", r"\\g<\1>", template)
        exposed[match.expand(python_template)] = series
    return exposed


def series_name(series_query: str) -> str:
    match = re.match(r"\s*([A-Za-z_:][A-Za-z0-9_:]*)", series_query)
    if not match:
        raise ValueError(f"seriesQuery {series_query!r} does not start with a metric name")
    return match.group(1)


def hpa_metric_names(overlays: Path = OVERLAYS) -> dict[str, set[str]]:
    """Custom-metric names each rendered overlay's HorizontalPodAutoscalers ask for."""
    names: dict[str, set[str]] = {}
    for overlay in sorted(p for p in overlays.iterdir() if p.is_dir()):
        for obj in kustomize_lite.build(overlay):
            if obj["kind"] != "HorizontalPodAutoscaler":
                continue
            for metric in obj["spec"].get("metrics", []):
                block = metric.get(metric["type"][0].lower() + metric["type"][1:], {})
                name = block.get("metric", {}).get("name")
                if name:
                    names.setdefault(name, set()).add(f"{overlay.name}/{obj['metadata']['name']}")
    return names


def all_expressions() -> list[Expression]:
    return (
        dashboard_expressions()
        + rule_expressions(ALERT_RULES)
        + rule_expressions(PROMETHEUS_RULE)
        + adapter_expressions()
    )


METRIC_RE = re.compile(r"(?<![\w:])(balcony:[A-Za-z0-9_:]+)(\{[^}]*\})?")
MATCHER_RE = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def metric_references(promql: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """[(series name, {label: (operator, value)})] for each `balcony:` selector in PromQL."""
    references = []
    for match in METRIC_RE.finditer(promql):
        matchers = {
            label: (operator, value)
            for label, operator, value in MATCHER_RE.findall(match.group(2) or "")
        }
        references.append((match.group(1), matchers))
    return references


def grouping_labels(promql: str) -> set[str]:
    """Labels named in `by (...)` / `without (...)` clauses (Grafana/adapter templates skipped)."""
    labels = set()
    for group in GROUPING_RE.findall(promql):
        labels |= {label.strip() for label in group.split(",") if label.strip() and "<<" not in label}
    return labels


def used_metrics() -> dict[str, set[str]]:
    """Series name -> the places that use it, over the dashboard, rules, adapter and HPA."""
    used: dict[str, set[str]] = {}
    for expression in all_expressions():
        for name, _ in metric_references(expression.promql):
            used.setdefault(name, set()).add(expression.source)
    exposed = adapter_exposed_names()
    for hpa_name, places in hpa_metric_names().items():
        series = exposed.get(hpa_name, hpa_name)  # unmapped names fail the contract check
        used.setdefault(series, set()).update(f"HPA {place} ({hpa_name})" for place in places)
    return used


# ---------------------------------------------------------------------------------------------
# What a live server exports.

def exported_series(exposition: str) -> dict[str, set[str]]:
    """Series name -> label names seen, from Prometheus text format.

    A labelled metric with no observations yet has only its # TYPE line, so names are also
    derived from the types (`prometheus_client` prints counters' TYPE with or without _total).
    """
    series: dict[str, set[str]] = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            kind = kind.strip()
            if kind == "counter":
                base = name.removesuffix("_total")
                names = {base + "_total"}
            elif kind == "histogram":
                names = {name + "_bucket", name + "_sum", name + "_count"}
            elif kind == "summary":
                names = {name, name + "_sum", name + "_count"}
            else:
                names = {name}
            for each in names:
                series.setdefault(each, set())
        elif line and not line.startswith("#"):
            match = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s", line)
            if match:
                labels = set(re.findall(r'([A-Za-z_]\w*)="', match.group(3) or ""))
                series.setdefault(match.group(1), set()).update(labels)
    return series
