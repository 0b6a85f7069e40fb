"""bench/soak.py without a server: parsing and diffing /metrics text, the counts the client expects
the server to have made, the checks, and the docs section it writes in place."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest


# /metrics of server/metrics.py's registry (prometheus_client's rendering), after one choice at
# exit 8 finished by length with a budget, two at exit 8 aborted, and one at full depth finished
# by stop without a budget; histograms cut to a few buckets, `_created` stamps kept.
METRICS = """\
# HELP balcony:time_to_first_token_seconds Time to first token.
# TYPE balcony:time_to_first_token_seconds histogram
# HELP balcony:e2e_request_latency_seconds End-to-end request latency.
# TYPE balcony:e2e_request_latency_seconds histogram
balcony:e2e_request_latency_seconds_bucket{exit="8",le="1.0"} 0.0
balcony:e2e_request_latency_seconds_bucket{exit="8",le="+Inf"} 1.0
balcony:e2e_request_latency_seconds_count{exit="8"} 1.0
balcony:e2e_request_latency_seconds_sum{exit="8"} 1.2
balcony:e2e_request_latency_seconds_bucket{exit="full",le="1.0"} 0.0
balcony:e2e_request_latency_seconds_bucket{exit="full",le="+Inf"} 1.0
balcony:e2e_request_latency_seconds_count{exit="full"} 1.0
balcony:e2e_request_latency_seconds_sum{exit="full"} 1.7
# HELP balcony:e2e_request_latency_seconds_created End-to-end request latency.
# TYPE balcony:e2e_request_latency_seconds_created gauge
balcony:e2e_request_latency_seconds_created{exit="8"} 1.7960967615026457e+09
balcony:e2e_request_latency_seconds_created{exit="full"} 1.7960967615030315e+09
# HELP balcony:request_queue_time_seconds Time waiting before first run.
# TYPE balcony:request_queue_time_seconds histogram
balcony:request_queue_time_seconds_bucket{exit="8",le="+Inf"} 1.0
balcony:request_queue_time_seconds_count{exit="8"} 1.0
balcony:request_queue_time_seconds_sum{exit="8"} 0.1
balcony:request_queue_time_seconds_bucket{exit="full",le="+Inf"} 1.0
balcony:request_queue_time_seconds_count{exit="full"} 1.0
balcony:request_queue_time_seconds_sum{exit="full"} 0.1
# HELP balcony:router_prediction_error_seconds Absolute error of the router's predicted end-to-end latency.
# TYPE balcony:router_prediction_error_seconds histogram
balcony:router_prediction_error_seconds_bucket{exit="8",le="+Inf"} 1.0
balcony:router_prediction_error_seconds_count{exit="8"} 1.0
balcony:router_prediction_error_seconds_sum{exit="8"} 0.3
balcony:router_prediction_error_seconds_bucket{exit="full",le="+Inf"} 1.0
balcony:router_prediction_error_seconds_count{exit="full"} 1.0
balcony:router_prediction_error_seconds_sum{exit="full"} 0.3
# HELP balcony:num_requests_running Requests running.
# TYPE balcony:num_requests_running gauge
balcony:num_requests_running 0.0
# HELP balcony:num_requests_waiting Requests waiting.
# TYPE balcony:num_requests_waiting gauge
balcony:num_requests_waiting 0.0
# HELP balcony:kv_cache_usage_perc KV-cache usage, 0 to 1.
# TYPE balcony:kv_cache_usage_perc gauge
balcony:kv_cache_usage_perc 0.0
# HELP balcony:prompt_tokens_total Prompt tokens processed.
# TYPE balcony:prompt_tokens_total counter
balcony:prompt_tokens_total{exit="8"} 7.0
balcony:prompt_tokens_total{exit="full"} 12.0
# HELP balcony:prompt_tokens_created Prompt tokens processed.
# TYPE balcony:prompt_tokens_created gauge
balcony:prompt_tokens_created{exit="8"} 1.796096761502597e+09
balcony:prompt_tokens_created{exit="full"} 1.7960967615026116e+09
# HELP balcony:generation_tokens_total Tokens generated.
# TYPE balcony:generation_tokens_total counter
balcony:generation_tokens_total{exit="8"} 16.0
balcony:generation_tokens_total{exit="full"} 5.0
# HELP balcony:generation_tokens_created Tokens generated.
# TYPE balcony:generation_tokens_created gauge
balcony:generation_tokens_created{exit="8"} 1.7960967615025647e+09
balcony:generation_tokens_created{exit="full"} 1.7960967615025816e+09
# HELP balcony:request_success_total Finished requests.
# TYPE balcony:request_success_total counter
balcony:request_success_total{exit="8",finished_reason="length"} 1.0
balcony:request_success_total{exit="8",finished_reason="abort"} 2.0
balcony:request_success_total{exit="full",finished_reason="stop"} 1.0
# HELP balcony:request_success_created Finished requests.
# TYPE balcony:request_success_created gauge
balcony:request_success_created{exit="8",finished_reason="length"} 1.7960967615024905e+09
balcony:request_success_created{exit="8",finished_reason="abort"} 1.7960967615025258e+09
balcony:request_success_created{exit="full",finished_reason="stop"} 1.7960967615025477e+09
# HELP balcony:budget_requests_total Requests by budget outcome.
# TYPE balcony:budget_requests_total counter
balcony:budget_requests_total{exit="8",outcome="miss"} 1.0
balcony:budget_requests_total{exit="full",outcome="none"} 1.0
# HELP balcony:budget_requests_created Requests by budget outcome.
# TYPE balcony:budget_requests_created gauge
balcony:budget_requests_created{exit="8",outcome="miss"} 1.7960967615033593e+09
balcony:budget_requests_created{exit="full",outcome="none"} 1.7960967615035512e+09
"""

STATUS = """\
Name:\tpython3.11
VmPeak:\t 4557120 kB
VmHWM:\t 1353908 kB
VmRSS:\t 1126040 kB
Threads:\t21
"""


@pytest.fixture(scope="module")
def soak(bench_script):
    with bench_script("soak") as module:
        yield module


def records(soak):
    R = soak.Record
    return [
        R("completion", "ok", 200, "8", 1, True, ["length"], 7, 16),
        R("disconnect", "disconnected", 200, "8", 2, False),
        R("chat", "ok", 200, "full", 1, False, ["stop"], 12, 5),
        R("completion", "400", 400, None, 1, False),  # refused: the server counts nothing
    ]


def test_parse_metrics_reads_samples_and_drops_created_stamps(soak):
    samples = soak.parse_metrics(METRICS)
    assert samples[("balcony:request_success_total", (("exit", "8"), ("finished_reason", "abort")))] == 2.0
    assert samples[("balcony:e2e_request_latency_seconds_count", (("exit", "full"),))] == 1.0
    assert samples[("balcony:e2e_request_latency_seconds_bucket", (("exit", "8"), ("le", "+Inf")))] == 1.0
    assert not [name for name, _ in samples if name.endswith("_created")]
    assert soak.gauges(samples) == {"balcony:kv_cache_usage_perc": 0.0, "balcony:num_requests_running": 0.0,
                                    "balcony:num_requests_waiting": 0.0}


def test_diff_subtracts_the_baseline_and_keeps_new_label_sets(soak):
    before = soak.parse_metrics(METRICS)
    line = 'balcony:generation_tokens_total{exit="full"} 5.0\n'
    after = soak.parse_metrics(METRICS.replace('{exit="8"} 16.0', '{exit="8"} 40.0')
                               .replace(line, line + 'balcony:generation_tokens_total{exit="15"} 3.0\n'))
    delta = soak.diff(after, before)
    assert delta[("balcony:generation_tokens_total", (("exit", "8"),))] == 24.0
    assert delta[("balcony:generation_tokens_total", (("exit", "15"),))] == 3.0
    assert delta[("balcony:request_success_total", (("exit", "full"), ("finished_reason", "stop")))] == 0.0


def test_expected_counters_match_what_the_server_counted(soak):
    expected = soak.expected_counters(records(soak))
    server = soak.server_counters(soak.parse_metrics(METRICS))
    rows = soak.compare(expected, server)
    assert all(r["equal"] for r in rows), [r for r in rows if not r["equal"]]
    # hit and miss compare as one outcome: the client cannot know the server's clock
    assert expected[("balcony:budget_requests_total", (("exit", "8"), ("outcome", "hit|miss")))] == 1
    assert expected[("balcony:request_success_total", (("exit", "8"), ("finished_reason", "abort")))] == 2
    assert ("balcony:e2e_request_latency_seconds_count", (("exit", "full"),)) in expected


def test_compare_reports_each_difference_either_side(soak):
    recs = records(soak)
    recs[0].completion_tokens = 17  # the client saw one token more than the server counted
    recs.append(soak.Record("timeout", "timeout", None, "22", 1, False))  # the server counted no abort at 22
    rows = soak.compare(soak.expected_counters(recs), soak.server_counters(soak.parse_metrics(METRICS)))
    bad = {(r["metric"], tuple(r["labels"].values())): (r["client"], r["server"]) for r in rows if not r["equal"]}
    assert bad == {("balcony:generation_tokens_total", ("8",)): (17, 16),
                   ("balcony:request_success_total", ("22", "abort")): (1, 0)}


def test_error_envelope(soak):
    good = json.dumps({"error": {"message": "max_tokens: too large", "type": "invalid_request_error",
                                 "param": "max_tokens", "code": None}}).encode()
    assert soak.error_envelope_ok(400, 400, good)
    assert not soak.error_envelope_ok(422, 400, good)  # the wrong status
    assert not soak.error_envelope_ok(400, 400, b'{"detail": [{"msg": "field required"}]}')  # FastAPI's own
    assert not soak.error_envelope_ok(400, 400, b"Bad Request")
    assert not soak.error_envelope_ok(400, 400, json.dumps({"error": {"message": "", "type": "x"}}).encode())


def test_proc_status_and_log_errors(soak):
    assert soak.vm_kib(STATUS) == 1126040
    assert soak.vm_kib(STATUS, "VmHWM") == 1353908
    log = ("2026-12-01 03:44:18,850 INFO balcony.server: model ready\n"
           "2026-12-01 03:50:00,001 ERROR balcony.server: unhandled error\n"
           "Traceback (most recent call last):\n"
           "ERROR:    Exception in ASGI application\n"
           "INFO:     Shutting down\n")
    assert len(soak.log_errors(log)) == 3


def evaluate(soak, **changes):
    kwargs = dict(outcomes=Counter(ok=90, disconnected=5, timeout=5), invalid=Counter(ok=20), server_errors=0,
                  idle_s=0.5, idle_gauges={"balcony:kv_cache_usage_perc": 0.0}, rss_base_kib=1000_000,
                  rss_end_kib=1030_000, mismatches={"soak window": 0}, idle_limit_s=10, growth_limit=0.05)
    return {c.name: c.passed for c in soak.evaluate(**(kwargs | changes))}


def test_evaluate_passes_a_clean_run_and_fails_each_goal(soak):
    assert all(evaluate(soak).values())
    assert not evaluate(soak, outcomes=Counter(ok=90, stream_error=1))["no 5xx"]
    assert not evaluate(soak, server_errors=1)["no 5xx"]
    assert not evaluate(soak, invalid=Counter(ok=19, **{"wrong: 422": 1}))[
        "invalid requests get their 4xx in OpenAI's envelope"]
    assert not evaluate(soak, outcomes=Counter(ok=90, **{"unexpected: 429": 1}))["valid requests never fail"]
    assert not evaluate(soak, idle_s=None)["no leaked blocks: KV usage, running, waiting back to 0"]
    assert not evaluate(soak, rss_end_kib=1050_000)["memory growth (VmRSS end / after warm-up)"]
    assert not evaluate(soak, mismatches={"soak window": 2})["counters exact (soak window)"]


def test_classify_separates_aborts_by_design_from_failures(soak):
    R = soak.Record
    valid, invalid = soak.classify([R("disconnect", "disconnected"), R("timeout", "timeout"),
                                    R("stream_timeout", "timeout"), R("chat", "timeout"), R("chat", "429"),
                                    R("invalid: bad JSON", "ok"), R("invalid: unknown model", "wrong: 400")])
    assert valid == Counter({"disconnected": 1, "timeout": 2, "unexpected: timeout": 1, "unexpected: 429": 1})
    assert invalid == Counter({"ok": 1, "wrong: 400": 1})


def test_the_mix_is_seeded_and_aborting_kinds_cannot_finish(soak):
    def specs(seed):
        rng = random.Random(seed)
        return [soak.build_spec(rng, kind, "m", ["8", "15", "22", "full"]) for kind in list(soak.KINDS) * 20]

    assert specs(1) == specs(1)
    for spec in specs(2):
        if spec.kind in ("disconnect", "timeout", "stream_timeout"):
            assert spec.body["extra_body"]["ignore_eos"] and spec.body["max_tokens"] >= 200
            assert spec.kind == "disconnect" or soak.EXIT_HEADER in spec.headers  # the abort's label is known
        assert spec.choices == spec.body["n"] * (len(spec.body["prompt"]) if isinstance(spec.body.get("prompt"), list)
                                                 else 1)


def test_write_doc_places_the_section_after_the_load_test_and_replaces_it(soak, tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- load-test:begin -->\nold\n<!-- load-test:end -->\n\n## Next\n\ntext\n")
    soak.write_doc(doc, "first", "python bench/soak.py")
    soak.write_doc(doc, "second", "python bench/soak.py --duration-s 600")
    text = doc.read_text()
    assert text.count("<!-- soak:begin -->") == 1 and "first" not in text
    order = [text.index(s) for s in ("<!-- load-test:end -->", soak.HEADING, "second", "## Next")]
    assert order == sorted(order)
    assert "`python bench/soak.py --duration-s 600`" in text
