"""A labelled Prometheus histogram whose observation is a bisect and two additions.

The server records a latency for every token of every stream on the event loop (server/
async_engine.py, _dispatch). prometheus_client's Histogram takes a lock for the sum and another for
the bucket on each observation and finds the bucket by a linear scan: with hundreds of streams that
was a tenth of the event loop's time. Here the counts are plain per-bucket integers, turned into
Prometheus' cumulative buckets when scraped, with the same exposition (``_bucket``, ``_count``,
``_sum``; no ``_created``).

Observations come from one thread, the event loop. A scrape from another thread reads each bucket
once: ``_count`` is the total of the buckets it read, so the two always agree, and ``_sum`` may lag
by an observation.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class LoopHistogram(Collector):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry):
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be distinct numbers")
        if bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.bounds = tuple(bounds)
        self._les = [floatToGoString(b) for b in bounds]
        self._children: dict[tuple[str, ...], HistogramSeries] = {}
        registry.register(self)

    def labels(self, *values: str) -> "HistogramSeries":
        """The series of these label values (the same object on every call)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes {len(self.labelnames)} label values, got {len(values)}")
        key = tuple(str(v) for v in values)
        series = self._children.get(key)
        if series is None:
            series = self._children[key] = HistogramSeries(self.bounds)
        return series

    def describe(self) -> Iterable[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, series in list(self._children.items()):
            total, buckets = 0, []
            for le, count in zip(self._les, list(series.counts)):
                total += count
                buckets.append((le, float(total)))
            family.add_metric(list(key), buckets, series.sum)
        yield family


class HistogramSeries:
    """One label set's counts: ``counts[i]`` observations in (bounds[i-1], bounds[i]]."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # bisect_left: the first bound >= amount, the bucket le=bound (Prometheus buckets are <=).
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount

    @property
    def count(self) -> int:
        return sum(self.counts)
