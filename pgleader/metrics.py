"""An election's figures for Prometheus (prometheus-client), read at scrape time.

`ElectionCollector(elector, jobs)` turns what the Elector and the JobRunner already
count in memory into metric families when Prometheus scrapes: no query, no lock,
nothing on the election's path but a counter increment and `Histogram.observe`.
Register it on the application's own registry:

    registry = CollectorRegistry()
    registry.register(ElectionCollector(elector, runner))

Names follow Prometheus' conventions (base units, `_total` for counters); the
README's metrics table lists them with what an operator reads in each.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["ElectionCollector", "Histogram", "histogram_family"]

# Leadership transitions this instance went through, by kind.
TRANSITION_KINDS = ("elected", "demoted", "resigned")


class Histogram:
    """Durations in seconds counted into fixed buckets: an observation is a bisect
    and two additions (no lock: one event loop writes it), read at scrape time."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at most that long), ending with (inf, all)."""
        total, out = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


def histogram_family(
    name: str, documentation: str, histograms: dict[tuple[str, ...], Histogram],
    labels: Sequence[str] = (),
) -> HistogramMetricFamily:  # fmt: skip
    """One histogram family from `Histogram`s by label values."""
    family = HistogramMetricFamily(name, documentation, labels=list(labels))
    for values, hist in sorted(histograms.items()):
        buckets = [(_le(bound), float(n)) for bound, n in hist.cumulative()]
        family.add_metric(list(values), buckets, hist.sum)
    return family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class _Elector(Protocol):
    """What the collector reads of a pgleader.Elector (which imports this module)."""

    election: str
    stats: dict[str, int]
    heartbeat_seconds: Histogram
    last_heartbeat_ok: float | None

    @property
    def is_leader(self) -> bool: ...
    @property
    def epoch(self) -> int | None: ...


class _Jobs(Protocol):
    def stats(self) -> dict[str, dict[str, Any]]: ...


class ElectionCollector(Collector):
    """The pgleader_* families of one Elector (and its JobRunner, if any)."""

    def __init__(self, elector: _Elector, jobs: _Jobs | None = None) -> None:
        self.elector, self.jobs = elector, jobs

    def collect(self) -> Iterator[Metric]:
        e = self.elector
        stats = e.stats
        labels = {"election": e.election}
        yield _gauge("pgleader_is_leader", "1 while this instance leads (holds the lock and"
                     " its lease has not run out), else 0", int(e.is_leader), labels)  # fmt: skip
        yield _gauge("pgleader_epoch", "The fencing epoch this instance leads under (0: it"
                     " does not lead)", e.epoch or 0, labels)  # fmt: skip
        transitions = CounterMetricFamily(
            "pgleader_leadership_transitions",
            "Leadership transitions of this instance by kind (elected, demoted: lost its"
            " lease or session, resigned: gave it up)",
            labels=["election", "kind"],
        )
        for kind in TRANSITION_KINDS:
            transitions.add_metric([e.election, kind], stats[kind])
        yield transitions
        beats = CounterMetricFamily(
            "pgleader_heartbeats",
            "Heartbeats (the leader's lease renewals, a follower's registry beats) by result",
            labels=["election", "result"],
        )
        beats.add_metric([e.election, "ok"], stats["heartbeats_ok"])
        beats.add_metric([e.election, "failed"], stats["heartbeats_failed"])
        yield beats
        yield histogram_family(
            "pgleader_heartbeat_duration_seconds",
            "Round trip of a heartbeat that succeeded",
            {(e.election,): e.heartbeat_seconds},
            ["election"],
        )
        if e.last_heartbeat_ok is not None:
            yield _gauge(
                "pgleader_seconds_since_heartbeat",
                "Seconds since this instance's last heartbeat succeeded",
                round(time.monotonic() - e.last_heartbeat_ok, 3),
                labels,
            )
        evictions = CounterMetricFamily(
            "pgleader_evictions",
            "Hung leaders, and waiters granted the lock that stopped before leading, whose"
            " session this instance terminated (their beat older than evict_after)",
            labels=["election"],
        )
        evictions.add_metric([e.election], stats["evictions"])
        yield evictions
        if self.jobs is not None:
            yield from self._jobs()

    def _jobs(self) -> Iterator[Metric]:
        assert self.jobs is not None
        stats = sorted(self.jobs.stats().items())
        runs = CounterMetricFamily(
            "pgleader_job_runs",
            "Runs of the leader's jobs by this instance, by outcome",
            labels=["job", "outcome"],
        )
        duration = GaugeMetricFamily(
            "pgleader_job_last_duration_seconds",
            "How long the job's last run by this instance took",
            labels=["job"],
        )
        since = GaugeMetricFamily(
            "pgleader_job_seconds_since_success",
            "Seconds since the job last succeeded, by the database's record (whoever ran"
            " it); no sample: never",
            labels=["job"],
        )
        for job, figures in stats:
            for outcome, n in sorted(figures["runs"].items()):
                runs.add_metric([job, outcome], n)
            if figures["last_duration"] is not None:
                duration.add_metric([job], figures["last_duration"])
            if figures["since_success"] is not None:
                since.add_metric([job], round(figures["since_success"], 3))
        yield from (runs, duration, since)


def _gauge(name: str, documentation: str, value: float, labels: dict[str, str]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family
