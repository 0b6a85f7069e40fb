"""promtool checks the alert rules (and unit-tests them), the Prometheus config, and the PromQL of
the dashboard and of prometheus-adapter's rules."""

import re
import subprocess

import yaml

import metric_names as mn
from deploy_support import REPO, require_tool

OBSERVABILITY = REPO / "deploy/observability"
INSTALL = "bash tests/install_system_tools.sh (Debian's prometheus package carries promtool)"


def promtool(*args, cwd=REPO):
    tool = require_tool("promtool", INSTALL)
    result = subprocess.run([tool, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_alert_rules_pass_promtool_check_rules():
    out = promtool("check", "rules", mn.ALERT_RULES)
    assert "SUCCESS" in out


def test_alert_rules_pass_their_unit_tests():
    promtool("test", "rules", OBSERVABILITY / "prometheus/tests/balcony-alerts.test.yml")


def test_prometheus_config_passes_promtool_check_config():
    promtool("check", "config", "prometheus.yml", cwd=OBSERVABILITY / "prometheus")


def test_kubernetes_prometheusrule_carries_the_same_rules(tmp_path):
    rule = yaml.safe_load(mn.PROMETHEUS_RULE.read_text())
    groups = yaml.safe_load(mn.ALERT_RULES.read_text())["groups"]
    assert rule["spec"]["groups"] == groups, "edit both rule files together"
    extracted = tmp_path / "prometheusrule.yml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    promtool("check", "rules", extracted)


def test_the_issue_s_alerts_exist_and_carry_severity_and_summary():
    rules = {r["alert"]: r for g in yaml.safe_load(mn.ALERT_RULES.read_text())["groups"] for r in g["rules"]}
    for required in ("BalconyServerDown", "BalconyBudgetMissRateHigh", "BalconyQueueGrowing"):
        assert required in rules
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert 'job="balcony-serve"' in rule["expr"] or "balcony:" in rule["expr"], name


def test_the_unit_tests_cover_every_alert():
    tests = yaml.safe_load((OBSERVABILITY / "prometheus/tests/balcony-alerts.test.yml").read_text())
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    rules = {r["alert"] for g in yaml.safe_load(mn.ALERT_RULES.read_text())["groups"] for r in g["rules"]}
    assert rules <= fired, f"alerts never shown to fire: {sorted(rules - fired)}"


def _as_recording_rules(expressions, tmp_path):
    """Grafana and adapter expressions are PromQL with template variables; substitute plausible
    values and let promtool parse each one as a recording rule."""
    rules = []
    for index, expression in enumerate(expressions):
        promql = expression.promql
        promql = promql.replace("$__rate_interval", "1m").replace("$__interval", "1m")
        promql = re.sub(r"\$\{?(job|instance|\w+)\}?", ".*", promql)
        promql = promql.replace("<<.Series>>", "balcony:num_requests_waiting")
        promql = promql.replace("<<.LabelMatchers>>", 'namespace="balcony",pod=~"balcony-serve-.*"')
        promql = promql.replace("<<.GroupBy>>", "pod")
        # Grafana's label_values(metric, label) is not PromQL; check the metric selector inside.
        match = re.fullmatch(r"label_values\((.*),\s*\w+\)", promql.strip())
        if match:
            promql = match.group(1)
        rules.append({"record": f"check:expression_{index}", "expr": promql})
    path = tmp_path / "expressions.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "expressions", "rules": rules}]}))
    return path


def test_dashboard_promql_parses(tmp_path):
    expressions = mn.dashboard_expressions()
    assert len(expressions) >= 20
    promtool("check", "rules", _as_recording_rules(expressions, tmp_path))


def test_adapter_promql_parses(tmp_path):
    expressions = list(mn.adapter_expressions())
    for rule in mn.adapter_rules():
        expressions.append(mn.Expression("adapter metricsQuery", rule["metricsQuery"]))
    promtool("check", "rules", _as_recording_rules(expressions, tmp_path))


def test_rate_and_quantile_are_applied_to_the_right_metric_types():
    """rate() of a gauge or histogram_quantile() of a non-bucket series parse fine but mean nothing."""
    contract = mn.contract_series()
    problems = []
    for expression in mn.all_expressions():
        for match in re.finditer(r"\b(rate|increase|irate|deriv|histogram_quantile)\(", expression.promql):
            inner = expression.promql[match.end():]
            names = [name for name, _ in mn.metric_references(inner)]
            metric = contract.get(names[0]) if names else None
            if metric is None:
                continue  # unknown names fail in test_deploy_metric_names
            function, where = match.group(1), f"{expression.source}: {function_call(match.group(1), names[0])}"
            if function in ("rate", "increase", "irate") and metric.type not in ("counter", "histogram"):
                problems.append(f"{where} of a {metric.type}")
            if function == "deriv" and metric.type != "gauge":
                problems.append(f"{where} of a {metric.type}")
            if function == "histogram_quantile":
                if not names[0].endswith("_bucket"):
                    problems.append(f"{where}: not a _bucket series")
                if not re.search(r"by \([^)]*\ble\b", inner):
                    problems.append(f"{where}: the aggregation must keep `le`")
    assert not problems, "\n".join(problems)


def function_call(function, name):
    return f"{function}({name} ...)"
