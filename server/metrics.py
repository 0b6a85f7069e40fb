"""Prometheus metrics, vLLM's names and buckets where they fit, under the prefix ``balcony:``.

Each server owns its registry (no process-global collectors), so tests can run several apps.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from server.loop_histogram import HistogramSeries, LoopHistogram

# vLLM's buckets for the same quantities.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ERROR_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class ExitSeries:
    """One exit's labelled series, looked up once per exit: ``labels()`` builds a key (and, for a
    counter, takes a lock) on every call, and the output loop records a latency for every token of
    every stream."""

    ttft: HistogramSeries
    itl: HistogramSeries
    e2e: HistogramSeries
    queue_time: HistogramSeries
    prediction_error: HistogramSeries
    prompt_tokens: Counter
    generation_tokens: Counter


class ServerMetrics:
    def __init__(self) -> None:
        self._exits: dict[str, ExitSeries] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        # Histograms observed on the event loop, per token for the first two (server/loop_histogram.py).
        self.ttft = LoopHistogram("balcony:time_to_first_token_seconds", "Time to first token.",
                                  ["exit"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = LoopHistogram("balcony:inter_token_latency_seconds", "Time between output tokens.",
                                 ["exit"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = LoopHistogram("balcony:e2e_request_latency_seconds", "End-to-end request latency.",
                                 ["exit"], buckets=REQUEST_BUCKETS, registry=r)
        self.queue_time = LoopHistogram("balcony:request_queue_time_seconds", "Time waiting before first run.",
                                        ["exit"], buckets=REQUEST_BUCKETS, registry=r)
        self.prediction_error = LoopHistogram(
            "balcony:router_prediction_error_seconds",
            "Absolute error of the router's predicted end-to-end latency.",
            ["exit"], buckets=ERROR_BUCKETS, registry=r,
        )
        self.running = Gauge("balcony:num_requests_running", "Requests running.", registry=r)
        self.waiting = Gauge("balcony:num_requests_waiting", "Requests waiting.", registry=r)
        self.kv_usage = Gauge("balcony:kv_cache_usage_perc", "KV-cache usage, 0 to 1.", registry=r)
        self.cpu_threads = Gauge("balcony:cpu_threads", "Threads a CPU step runs on (fewer while other "
                                 "processes hold cores).", registry=r)
        self.prompt_tokens = Counter("balcony:prompt_tokens", "Prompt tokens processed.", ["exit"], registry=r)
        self.generation_tokens = Counter("balcony:generation_tokens", "Tokens generated.", ["exit"], registry=r)
        self.request_success = Counter("balcony:request_success", "Finished requests.",
                                       ["exit", "finished_reason"], registry=r)
        self.budget_requests = Counter("balcony:budget_requests", "Requests by budget outcome.",
                                       ["exit", "outcome"], registry=r)

    def of_exit(self, label: str) -> ExitSeries:
        """The series labelled ``exit=label`` (the same objects on every call)."""
        series = self._exits.get(label)
        if series is None:
            series = self._exits[label] = ExitSeries(
                self.ttft.labels(label), self.itl.labels(label), self.e2e.labels(label),
                self.queue_time.labels(label), self.prediction_error.labels(label),
                self.prompt_tokens.labels(label), self.generation_tokens.labels(label))
        return series

    def render(self) -> bytes:
        return generate_latest(self.registry)
