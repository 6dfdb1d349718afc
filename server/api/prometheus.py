"""GET /metrics in the Prometheus text format.

Each app gets its own CollectorRegistry, so several apps in one process (tests) never share
series. Gauges (jobs by state, queue depth, event subscribers) are read from the services at
scrape time. Counters and the duration histogram are fed by a job-engine listener when a job
ends; an exporter attached after jobs already ended first replays the jobs the engine still
retains, so nothing within the retention window goes uncounted.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from quart import Response

from ..jobs.record import Job
from ..jobs.states import JobKind, JobState

logger = logging.getLogger(__name__)

# Job run times span milliseconds (a forward on the tiny model) to hours (an SFT run).
DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                      float("inf"))

_END_EVENTS = frozenset(f"job.{state.value}" for state in JobState
                        if state not in (JobState.QUEUED, JobState.RUNNING))

# One exporter per job engine, that is per app; the weak keys let a stopped app's exporter go.
_exporters: weakref.WeakKeyDictionary[Any, PrometheusExporter] = weakref.WeakKeyDictionary()


class _LiveState(Collector):
    """Gauges computed from the services at each scrape."""

    def __init__(self, services) -> None:
        # A weak reference: the exporter is the value of a weak-keyed map keyed by services.jobs,
        # and a strong path back to that key would keep every app's services alive.
        self._services = weakref.ref(services)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        services = self._services()
        if services is None:
            return
        jobs = GaugeMetricFamily("trainpulse_jobs", "Jobs in the engine (queued, running, or ended within "
                                 "the retention window), by state.", labels=["state"])
        for state, count in services.jobs.counts_by_state().items():
            jobs.add_metric([state], count)
        yield jobs

        depth = GaugeMetricFamily("trainpulse_queue_depth",
                                  "Jobs queued in a model's seq_id lane, waiting to run.", labels=["model_id"])
        for model_id, count in sorted(services.jobs.queued_by_model().items()):
            depth.add_metric([model_id], count)
        yield depth

        subscribers = GaugeMetricFamily("trainpulse_event_subscribers",
                                        "Open event-stream subscriptions (SSE and WebSocket).")
        subscribers.add_metric([], services.hub.subscriber_count)
        yield subscribers


class PrometheusExporter:
    def __init__(self, services) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_LiveState(services))
        self.jobs_ended = Counter("trainpulse_jobs_ended", "Jobs that reached a terminal state.",
                                  ["kind", "state"], registry=self.registry)
        self.job_duration = Histogram("trainpulse_job_duration_seconds",
                                      "Time a job spent running, from its start to its end; jobs that "
                                      "ended while queued are not observed.",
                                      ["kind", "state"], buckets=DURATION_BUCKETS_S, registry=self.registry)
        self.training_steps = Counter("trainpulse_training_steps", "Optimizer steps applied (optim_step "
                                      "jobs that succeeded).", registry=self.registry)
        self.tokens_trained = Counter("trainpulse_tokens_trained", "Input tokens of forward_backward jobs "
                                      "that succeeded.", registry=self.registry)

    def observe_event(self, event_type: str, job: Job, data: dict[str, Any]) -> None:
        if event_type in _END_EVENTS:
            self.observe_end(job)

    def observe_end(self, job: Job) -> None:
        self.jobs_ended.labels(job.kind, job.state.value).inc()
        if job.started_at is not None and job.finished_at is not None:
            self.job_duration.labels(job.kind, job.state.value).observe(max(0.0, job.finished_at - job.started_at))
        if job.state is not JobState.SUCCEEDED:
            return
        if job.kind == JobKind.OPTIM_STEP.value:
            self.training_steps.inc()
        elif job.kind == JobKind.FORWARD_BACKWARD.value:
            self.tokens_trained.inc(_tokens_of(job))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _tokens_of(job: Job) -> float:
    """Tokens of a finished forward_backward job, from the metrics its work published.

    An exact `tokens` metric is used when the work publishes one. Otherwise the count is
    estimated as tokens_per_s times the job's run time.
    """
    # NOTE: the model service publishes only tokens_per_s, measured over the backend call alone,
    # so the estimate is somewhat high: the run time also covers batch conversion and presenting.
    if "tokens" in job.metrics:
        return max(0.0, float(job.metrics["tokens"]))
    rate = job.metrics.get("tokens_per_s")
    if rate is None or job.started_at is None or job.finished_at is None:
        return 0.0
    return max(0.0, round(float(rate) * (job.finished_at - job.started_at)))


def exporter_for(services) -> PrometheusExporter:
    """Return the exporter of this app, attaching it to the job engine on first use."""
    exporter = _exporters.get(services.jobs)
    if exporter is not None:
        return exporter
    exporter = PrometheusExporter(services)
    # Replay and attach run in one event-loop step, so no job can end between the two.
    for job in services.jobs.list_jobs():
        if job.is_terminal:
            exporter.observe_end(job)
    services.jobs.add_listener(exporter.observe_event)
    _exporters[services.jobs] = exporter
    logger.info("Prometheus exporter attached to the job engine")
    return exporter


async def metrics(services, body) -> Response:
    return Response(exporter_for(services).render(), status=200, content_type=CONTENT_TYPE_LATEST)
