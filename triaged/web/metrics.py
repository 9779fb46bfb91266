"""Prometheus metrics computed from the database at scrape time.

Counting in the database instead of in process memory is what makes every ``serve``
and ``worker`` process sharing one PostgreSQL report the same numbers, and makes the
numbers survive restarts. The latency histograms are built with one aggregate query
each (a ``count`` per bucket bound), so a scrape costs a handful of queries however large
the worklist is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Engine, Float, case, func, literal_column, select
from sqlalchemy import cast as sa_cast
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from triaged.worklist.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Study,
    StudyState,
)
from triaged.worklist.web_models import Feedback

SCORING_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
END_TO_END_BUCKETS = (5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def seconds_between(engine: Engine, start: Any, end: Any) -> ColumnElement[float]:
    """``end - start`` in seconds, in the SQL of the engine's dialect."""
    if engine.dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * literal_column("86400.0")
    return sa_cast(func.extract("epoch", end - start), Float)


def _histogram(
    session: Session,
    duration: ColumnElement[float],
    where: Sequence[Any],
    bounds: Sequence[float],
) -> tuple[list[tuple[str, float]], float]:
    cols = [func.sum(case((duration <= b, 1), else_=0)) for b in bounds]
    row = session.execute(
        select(func.count(), func.coalesce(func.sum(duration), 0.0), *cols).where(*where)
    ).one()
    count, total = int(row[0] or 0), float(row[1] or 0.0)
    buckets = [(_fmt(b), float(n or 0)) for b, n in zip(bounds, row[2:], strict=True)]
    return [*buckets, ("+Inf", float(count))], total


def _fmt(b: float) -> str:
    return repr(float(b))


class DatabaseCollector(Collector):
    """Collects worklist metrics from the database (and the process status, if given)."""

    def __init__(
        self, engine: Engine, status: Callable[[], Mapping[str, object]] | None = None
    ) -> None:
        self.engine = engine
        self.status = status

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        with Session(e) as s:
            received = int(s.scalar(select(func.count()).select_from(Instance)) or 0)
            yield CounterMetricFamily(
                "triaged_instances_received", "DICOM instances received and stored", value=received
            )

            by_state = dict(
                s.execute(select(Study.state, func.count()).group_by(Study.state)).all()
            )
            g = GaugeMetricFamily("triaged_studies", "Studies by state", labels=["state"])
            for st in StudyState:
                g.add_metric([st.value], float(by_state.get(st.value, 0)))
            yield g

            flagged = int(s.scalar(select(func.count()).where(Study.flag.is_(True))) or 0)
            yield GaugeMetricFamily(
                "triaged_studies_flagged", "Studies flagged as likely COVID-19", value=flagged
            )

            depth = dict(
                s.execute(
                    select(Job.kind, func.count())
                    .where(Job.state == JobState.QUEUED)
                    .group_by(Job.kind)
                ).all()
            )
            q = GaugeMetricFamily(
                "triaged_queue_depth", "Jobs waiting for a worker", labels=["kind"]
            )
            for kind in sorted({"score", *depth}):
                q.add_metric([kind], float(depth.get(kind, 0)))
            yield q

            running = int(s.scalar(select(func.count()).where(Job.state == JobState.RUNNING)) or 0)
            yield GaugeMetricFamily(
                "triaged_jobs_running", "Jobs leased by a worker", value=running
            )

            deliveries = dict(
                s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
            )
            d = GaugeMetricFamily(
                "triaged_deliveries", "Result deliveries by state", labels=["state"]
            )
            for ds in DeliveryState:
                d.add_metric([ds.value], float(deliveries.get(ds.value, 0)))
            yield d
            yield CounterMetricFamily(
                "triaged_delivery_failures",
                "Deliveries that exhausted their retries (dead)",
                value=float(deliveries.get(DeliveryState.DEAD.value, 0)),
            )

            fb = dict(
                s.execute(select(Feedback.verdict, func.count()).group_by(Feedback.verdict)).all()
            )
            f = CounterMetricFamily("triaged_feedback", "Radiologist verdicts", labels=["verdict"])
            for v in ("confirm", "refute"):
                f.add_metric([v], float(fb.get(v, 0)))
            yield f

            scoring = seconds_between(e, Job.started_at, Job.finished_at)
            buckets, total = _histogram(
                s,
                scoring,
                [
                    Job.kind == "score",
                    Job.state == JobState.DONE,
                    Job.started_at.is_not(None),
                    Job.finished_at.is_not(None),
                ],
                SCORING_BUCKETS,
            )
            yield HistogramMetricFamily(
                "triaged_scoring_seconds",
                "Scoring time of a study (job start to finish)",
                buckets=buckets,
                sum_value=total,
            )

            e2e = seconds_between(e, Study.last_received_at, Study.delivered_at)
            buckets, total = _histogram(
                s, e2e, [Study.delivered_at.is_not(None)], END_TO_END_BUCKETS
            )
            yield HistogramMetricFamily(
                "triaged_end_to_end_seconds",
                "Last instance received to all results delivered",
                buckets=buckets,
                sum_value=total,
            )
        yield from self._status()

    def _status(self) -> Iterator[Metric]:
        if self.status is None:
            return
        try:
            st = dict(self.status())
        except Exception:  # a broken status source must not break the scrape
            return
        for key, help_text in (
            ("scp_listening", "DICOM listener accepting associations"),
            ("scheduler_running", "Scheduler running"),
        ):
            if key in st:
                yield GaugeMetricFamily(f"triaged_{key}", help_text, value=float(bool(st[key])))
        free = st.get("spool_free_mb")
        if isinstance(free, (int, float)):
            yield GaugeMetricFamily(
                "triaged_spool_free_bytes",
                "Free space on the spool disk",
                value=float(free) * 1024 * 1024,
            )
        live = st.get("live_model")
        g = GaugeMetricFamily(
            "triaged_live_model", "The live model (1 when loaded)", labels=["model"]
        )
        if live:
            g.add_metric([str(live)], 1.0)
        yield g


def render(engine: Engine, status: Callable[[], Mapping[str, object]] | None = None) -> bytes:
    """The Prometheus text exposition of every metric."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(engine, status))
    return generate_latest(registry)
