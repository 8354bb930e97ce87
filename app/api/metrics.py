"""Prometheus metrics: HTTP requests by route template and status (a middleware), and the service's state read from
the database at scrape time: requests and jobs by model and status, job durations, queue depth, and open requests
counted by how soon their legal due date comes (plus the soonest per model), so an alert can fire before a deadline
is missed. Labels hold model names, statuses and bucket bounds: never a request's id or submitted text."""

from __future__ import annotations

import time
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import SessionDep, SettingsDep, bearer
from app.auth.service import authenticate, require_scope
from app.base_models.models import RegisteredModel
from app.core.broker import broker_queue_lengths
from app.core.db import session_scope, utcnow
from app.core.errors import error_responses
from app.forget_requests.models import ForgetRequest, RequestStatus
from app.jobs.models import JobStatus, UnlearningJob

# Requests whose due date still matters: not yet completed, failed or cancelled.
OPEN_STATUSES = (RequestStatus.pending, RequestStatus.batched, RequestStatus.running)
FINISHED_JOB_STATUSES = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
JOB_DURATION_BUCKETS = (60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Due-date buckets (seconds from now): overdue, within a day, 3 days, a week, two weeks, a month, later.
DUE_BUCKETS = (0.0, 86400.0, 3 * 86400.0, 7 * 86400.0, 14 * 86400.0, 31 * 86400.0)


def _counts(session: Session, entity: type[ForgetRequest] | type[UnlearningJob]) -> Iterator[tuple[str, str, int]]:
    """(model name, status, rows) of a table whose rows belong to a model and have a status."""
    query = (
        select(RegisteredModel.name, entity.status, func.count())
        .join(RegisteredModel, entity.base_model_id == RegisteredModel.id)
        .group_by(RegisteredModel.name, entity.status)
    )
    yield from session.execute(query)


def _job_seconds(session: Session) -> ColumnElement[float]:
    started, finished = UnlearningJob.started_at, UnlearningJob.finished_at
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(finished) - func.julianday(started)) * 86400.0
    return func.extract("epoch", finished - started)


class ServiceState(Collector):
    """Reads counts and due dates from the database on every scrape, so every API process reports the same."""

    def collect(self) -> Iterator[Metric]:
        with session_scope() as session:
            yield self._requests(session)
            yield from self._jobs(session)
            yield from self._due_dates(session)
        yield from self._broker()

    def _requests(self, session: Session) -> Metric:
        family = GaugeMetricFamily(
            "unlearnd_forget_requests", "Forget requests by model and status.", labels=["model", "status"]
        )
        for model, status, count in _counts(session, ForgetRequest):
            family.add_metric([model, status], count)
        return family

    def _jobs(self, session: Session) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("unlearnd_jobs", "Unlearning jobs by model and status.", labels=["model", "status"])
        queued = GaugeMetricFamily(
            "unlearnd_queue_depth", "Jobs queued in the database, waiting for a worker, by model.", labels=["model"]
        )
        for model, status, count in _counts(session, UnlearningJob):
            jobs.add_metric([model, status], count)
            if status == JobStatus.queued:
                queued.add_metric([model], count)
        yield jobs
        yield queued
        yield self._durations(session)

    def _durations(self, session: Session) -> Metric:
        family = HistogramMetricFamily(
            "unlearnd_job_duration_seconds",
            "Wall time of finished jobs, from start to finish, by model and final status.",
            labels=["model", "status"],
        )
        seconds = _job_seconds(session)
        buckets = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in JOB_DURATION_BUCKETS]
        query = (
            select(RegisteredModel.name, UnlearningJob.status, func.count(), func.sum(seconds), *buckets)
            .join(RegisteredModel, UnlearningJob.base_model_id == RegisteredModel.id)
            .where(
                UnlearningJob.status.in_(FINISHED_JOB_STATUSES),
                UnlearningJob.started_at.is_not(None),
                UnlearningJob.finished_at.is_not(None),
            )
            .group_by(RegisteredModel.name, UnlearningJob.status)
        )
        for model, status, count, total, *cumulative in session.execute(query):
            counts = [(str(bound), int(n)) for bound, n in zip(JOB_DURATION_BUCKETS, cumulative, strict=True)]
            family.add_metric([model, status], buckets=[*counts, ("+Inf", count)], sum_value=float(total))
        return family

    def _due_dates(self, session: Session) -> Iterator[Metric]:
        due = GaugeMetricFamily(
            "unlearnd_open_requests_due_within_seconds",
            "Open (pending, batched or running) requests of a model whose legal due date is at most `le` seconds "
            "away (cumulative; le=0: overdue).",
            labels=["model", "le"],
        )
        soonest = GaugeMetricFamily(
            "unlearnd_min_seconds_until_due",
            "Seconds until the earliest due date among a model's open requests; negative once one is overdue.",
            labels=["model"],
        )
        now = utcnow()
        per_model: dict[str, list[float]] = {}
        query = (
            select(RegisteredModel.name, ForgetRequest.due_at)
            .join(RegisteredModel, ForgetRequest.base_model_id == RegisteredModel.id)
            .where(ForgetRequest.status.in_(OPEN_STATUSES))
        )
        for model, due_at in session.execute(query):
            per_model.setdefault(model, []).append((due_at - now).total_seconds())
        for model, lefts in per_model.items():
            for bound in DUE_BUCKETS:
                due.add_metric([model, str(bound)], sum(left <= bound for left in lefts))
            due.add_metric([model, "+Inf"], len(lefts))
            soonest.add_metric([model], min(lefts))
        yield due
        yield soonest

    def _broker(self) -> Iterator[Metric]:
        lengths = broker_queue_lengths()
        yield GaugeMetricFamily("unlearnd_broker_up", "1 if the broker answered the scrape.", value=lengths is not None)
        messages = GaugeMetricFamily(
            "unlearnd_broker_queue_messages", "Task messages waiting in a broker queue.", labels=["queue"]
        )
        for queue, length in (lengths or {}).items():
            messages.add_metric([queue], length)
        yield messages


class Metrics:
    """One app's registry: the HTTP instruments, fed by HttpMetrics, and the database-backed ServiceState."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "unlearnd_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "unlearnd_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template.",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(ServiceState())


class HttpMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        routes = scope["app"].state.routes  # read now: a mounted app (the dashboard) replaces scope["app"]

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            # The template, never the raw path, which would make a label per id.
            known = routes.match(scope["path"])
            route = known[0] if known else "unmatched"
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)


async def scraper_allowed(request: Request, session: SessionDep, settings: SettingsDep) -> None:
    """A key with `requests:read` is needed, except in the embedded mode (SQLite and the filesystem broker on one
    machine) unless UNLEARND_METRICS_REQUIRE_KEY says otherwise."""
    if settings.metrics_key_required:
        credentials = await bearer(request)
        require_scope(authenticate(session, credentials.credentials if credentials else None), "requests:read")


router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(scraper_allowed)],
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format."},
        **error_responses(401, 403, 503),
    },
)
def metrics(request: Request) -> Response:
    """Prometheus metrics. A `requests:read` key is required (401/403) except in the embedded mode; set
    `UNLEARND_METRICS_REQUIRE_KEY` to decide either way."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
