"""Prometheus metrics, read from the job store at scrape time.

All numbers live in the store (counters table, job rows, attempt records), so they are the same
whichever gunicorn or worker process answers, and survive restarts.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from webhook.backend import JobBackend

PREFIX = "obd_webhook"


class StoreCollector:
    def __init__(self, store: JobBackend) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        stats = self.store.stats()
        families = {
            "events_received": CounterMetricFamily(
                f"{PREFIX}_events_received", "Registry events received, by source.", labels=["source"]),
            "events_accepted": CounterMetricFamily(
                f"{PREFIX}_events_accepted", "Events that created a conversion job.", labels=["source"]),
            "events_ignored": CounterMetricFamily(
                f"{PREFIX}_events_ignored", "Events answered 2xx without a new job, by reason.",
                labels=["reason"]),
            "backfill_tags": CounterMetricFamily(
                f"{PREFIX}_backfill_tags", "Tags seen by backfills: listed, queued, skipped_<reason>.",
                labels=["outcome"]),
            "mirror_deletes": CounterMetricFamily(
                f"{PREFIX}_mirror_deletes", "Output tags handled by delete mirroring, by outcome "
                "(deleted, absent, not_ours, shared, source_exists).", labels=["outcome"]),
            "stale_found": CounterMetricFamily(
                f"{PREFIX}_stale_found", "Stale outputs found by stale reports (source_gone, source_moved).",
                labels=["reason"]),
        }
        scalars = {
            "retries": CounterMetricFamily(f"{PREFIX}_conversion_retries", "Attempts scheduled for a retry."),
            "manual_retries": CounterMetricFamily(f"{PREFIX}_manual_retries",
                                                  "Jobs re-queued through the API."),
            "conversion_bytes": CounterMetricFamily(f"{PREFIX}_conversion_bytes",
                                                    "Bytes written by successful conversions."),
        }
        totals = dict.fromkeys(scalars, 0)
        for (name, label), value in stats.counters.items():
            if name in families:
                families[name].add_metric([label], value)
            elif name in totals:
                totals[name] += value
        for name, family in scalars.items():
            family.add_metric([], totals[name])
        yield from families.values()
        yield from scalars.values()
        jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs by state.", labels=["state"])
        for state, count in stats.jobs_by_state.items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Jobs waiting to run (queued or awaiting retry).",
                                value=stats.queue_depth)
        buckets = [(repr(bound), count) for bound, count in stats.duration_buckets]
        buckets.append(("+Inf", stats.duration_count))
        yield HistogramMetricFamily(f"{PREFIX}_conversion_duration_seconds",
                                    "Duration of finished conversion attempts.",
                                    buckets=buckets, sum_value=stats.duration_sum)


def make_registry(store: JobBackend) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    return registry
