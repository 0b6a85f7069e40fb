"""Every `balcony:` metric the dashboard, alert rules, adapter rules and HPA use is one the server
exports: first against the metric contract (no server needed), then against a live /metrics."""

import httpx

import metric_names as mn

TARGET_AND_BUCKET_LABELS = mn.TARGET_LABELS | {"le"}


def test_the_deploy_files_use_metrics_at_all():
    used = mn.used_metrics()
    assert len(used) >= 12, sorted(used)
    assert any(place.startswith("HPA ") for places in used.values() for place in places)


def test_every_used_metric_is_in_the_contract():
    contract = mn.contract_series()
    unknown = {name: sorted(places) for name, places in mn.used_metrics().items() if name not in contract}
    assert not unknown, f"metrics the server does not promise: {unknown}"


def test_every_contract_metric_is_on_the_dashboard():
    on_dashboard = {name for e in mn.dashboard_expressions() for name, _ in mn.metric_references(e.promql)}
    missing = [m.name for m in mn.CONTRACT if not (m.sample_names() & on_dashboard)]
    assert not missing, f"not shown anywhere on the dashboard: {missing}"


def test_label_matchers_and_groupings_use_labels_the_metrics_have():
    contract = mn.contract_series()
    problems = []
    for expression in mn.all_expressions():
        references = mn.metric_references(expression.promql)
        allowed_in_expression = set(TARGET_AND_BUCKET_LABELS)
        for name, matchers in references:
            metric = contract.get(name)
            if metric is None:
                continue
            allowed = metric.labels | TARGET_AND_BUCKET_LABELS
            allowed_in_expression |= allowed
            for label, (operator, value) in matchers.items():
                if label not in allowed:
                    problems.append(f"{expression.source}: {name} has no label {label!r}")
                if label in mn.CONTRACT_LABEL_VALUES and operator in ("=", "=~"):
                    values = set(value.split("|")) if operator == "=~" else {value}
                    bad = values - mn.CONTRACT_LABEL_VALUES[label]
                    if bad:
                        problems.append(f"{expression.source}: {label} is never {sorted(bad)}")
        if references:
            bad_groupings = mn.grouping_labels(expression.promql) - allowed_in_expression
            if bad_groupings:
                problems.append(f"{expression.source}: grouping by unknown labels {sorted(bad_groupings)}")
    assert not problems, "\n".join(problems)


def test_hpa_metrics_resolve_through_the_adapter_to_contract_metrics():
    exposed = mn.adapter_exposed_names()
    for name in mn.hpa_metric_names():
        assert name in exposed, f"the HPA asks for {name}, which no prometheus-adapter rule serves"
        assert exposed[name] in mn.contract_series()


# ---------------------------------------------------------------------------------------------
# Against a running server.

def test_a_running_server_exports_every_metric_the_deploy_files_use(live_server):
    with httpx.Client(base_url=live_server.base_url, timeout=120) as client:
        before = mn.exported_series(client.get("/metrics").text)
        # One request with a latency budget, so that the labelled series have samples as well.
        model = client.get("/v1/models").json()["data"][0]["id"]
        response = client.post(
            "/v1/completions",
            json={"model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0},
            headers={"X-Latency-Budget-Ms": "60000"},
        )
        assert response.status_code == 200, response.text
        exported = mn.exported_series(client.get("/metrics").text)

    missing = {name: sorted(places) for name, places in mn.used_metrics().items() if name not in exported}
    assert not missing, f"used by the deploy files but not on /metrics: {missing}"
    not_yet = sorted(set(mn.contract_series()) - set(before))
    assert not not_yet, f"contract series absent from /metrics before any request: {not_yet}"

    problems = []
    for name, metric in mn.contract_series().items():
        labels = exported.get(name, set()) - {"le"}
        if labels and labels != metric.labels:
            problems.append(f"{name}: labels {sorted(labels)}, contract {sorted(metric.labels)}")
    assert not problems, "\n".join(problems)
    for name in ("balcony:request_success_total", "balcony:budget_requests_total",
                 "balcony:generation_tokens_total", "balcony:time_to_first_token_seconds_bucket"):
        assert exported[name], f"{name} has no samples after a finished request"
