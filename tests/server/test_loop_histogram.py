"""LoopHistogram exposes what prometheus_client's own Histogram exposes for the same observations."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.loop_histogram import LoopHistogram
from server.metrics import ITL_BUCKETS


def samples(registry: CollectorRegistry) -> dict:
    """(sample name, labels) -> value, without prometheus_client's _created samples."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_the_same_observations_give_the_same_exposition_as_prometheus_client():
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = LoopHistogram("t:latency_seconds", "Latency.", ["exit"], ITL_BUCKETS, ours_registry)
    theirs = Histogram("t:latency_seconds", "Latency.", ["exit"], buckets=ITL_BUCKETS, registry=theirs_registry)
    rng = random.Random(0)
    # values on bucket bounds exactly (le is inclusive), between them, below the first, past the last
    values = list(ITL_BUCKETS) + [0.0, 1e-6, 1e3] + [rng.expovariate(10) for _ in range(500)]
    for label in ("full", "22"):
        for v in values if label == "full" else values[:7]:
            ours.labels(label).observe(v)
            theirs.labels(label).observe(v)
    ours.labels("8")  # looked up, nothing observed: shown with zero counts, as prometheus_client does
    theirs.labels("8")
    mine, reference = samples(ours_registry), samples(theirs_registry)
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        assert mine[key] == pytest.approx(value, rel=1e-12), key
    assert ours.labels("full").count == len(values)
    text = generate_latest(ours_registry).decode()
    assert "# TYPE t:latency_seconds histogram" in text and 't:latency_seconds_bucket{exit="full",le="+Inf"}' in text


def test_labels_are_checked_and_series_are_kept():
    h = LoopHistogram("t:x_seconds", "X.", ["exit"], (0.1, 1.0), CollectorRegistry())
    assert h.labels("a") is h.labels("a")
    with pytest.raises(ValueError):
        h.labels("a", "b")
    with pytest.raises(ValueError):
        LoopHistogram("t:y_seconds", "Y.", ["exit"], (1.0, 1.0), CollectorRegistry())
