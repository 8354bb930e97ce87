"""The series the dashboard plots, read from what the worker recorded: a job's training curve (in its published
version's metrics, or in the evaluation of a job that failed) and a model's metrics over its versions."""

from __future__ import annotations

from typing import Any

from app.adapters.models import AdapterVersion
from app.jobs.models import UnlearningJob


def job_metrics(job: UnlearningJob, version: AdapterVersion | None) -> dict[str, Any]:
    """The metrics a job left: its version's, or for a job that published nothing, its evaluation."""
    return version.metrics if version is not None else job.evaluation or {}


def _plot(plot_id: str, title: str, x_label: str, x: list, lines: list[dict]) -> dict[str, Any]:
    """One chart for static/dashboard.js: x values and lines (label, values, colour index, dashed for a bound)."""
    return {"id": plot_id, "title": title, "x_label": x_label, "x": x, "lines": [line for line in lines if line]}


def _line(label: str, values: list, color: int, dashed: bool = False) -> dict[str, Any]:
    return {"label": label, "values": values, "color": color, "dashed": dashed}


def _bound(label: str, value: float | None, x: list, color: int) -> dict[str, Any] | None:
    return _line(label, [value] * len(x), color, dashed=True) if isinstance(value, int | float) else None


def job_plots(job: UnlearningJob, version: AdapterVersion | None) -> list[dict[str, Any]]:
    """The training curve per step: forget MA and EL against the holdout target, retain perplexity against its limit
    (tolerance times the original model's), and kept_extractable where the curve has it; [] without a curve."""
    metrics = job_metrics(job, version)
    training = metrics.get("job", metrics)  # a missed target's evaluation holds the curve itself
    curve = training.get("curve") or []
    if not curve:
        return []
    steps = [point["step"] for point in curve]
    target = training.get("target", {})
    tolerance = metrics.get("retain_ppl_tolerance") or job.config.get("retain_ppl_tolerance")
    limit = metrics.get("verification", {}).get("retain_ppl_limit")
    if limit is None and tolerance and curve[0].get("retain_ppl"):
        limit = tolerance * curve[0]["retain_ppl"]  # step 0 is the original model

    def series(name: str) -> list:
        return [point.get(name) for point in curve]

    plots = [
        _plot(f"job-{job.id}-forget", "Forget set vs holdout target", "step", steps, [
            _line("forget MA", series("forget_ma"), 0), _bound("target MA", target.get("forget_ma"), steps, 0),
            _line("forget EL", series("forget_el"), 1), _bound("target EL", target.get("forget_el"), steps, 1),
        ]),
        _plot(f"job-{job.id}-retain", "Retain perplexity vs tolerance", "step", steps, [
            _line("retain perplexity", series("retain_ppl"), 2), _bound("limit", limit, steps, 2),
        ]),
    ]  # fmt: skip
    if any("kept_extractable" in point for point in curve):
        plots.append(
            _plot(f"job-{job.id}-kept", "Items still extractable", "step", steps,
                  [_line("kept extractable", series("kept_extractable"), 3)])
        )  # fmt: skip
    return plots


def _worst(sets: dict[str, dict], name: str) -> float | None:
    values = [s[name] for s in sets.values() if isinstance(s.get(name), int | float)]
    return max(values) if values else None


def version_rows(versions: list[AdapterVersion]) -> list[dict[str, Any]]:
    """Per version, side by side: the worst held set's forget MA and EL, the target, retain perplexity and limit."""
    rows = []
    for version in versions:
        verification = version.metrics.get("verification", {})
        sets = verification.get("sets", {})
        target = verification.get("target", {})
        rows.append(
            {
                "version": version.version,
                "job_id": version.job_id,
                "created_at": version.created_at,
                "jobs": version.manifest.get("jobs", []),
                "requests": len(version.manifest.get("request_ids", [])),
                "forget_ma": _worst(sets, "forget_ma"),
                "forget_el": _worst(sets, "forget_el"),
                "target_ma": target.get("forget_ma"),
                "target_el": target.get("forget_el"),
                "retain_ppl": verification.get("retain_ppl"),
                "retain_ppl_limit": verification.get("retain_ppl_limit"),
                "passed": verification.get("passed"),
                "repaired": version.metrics.get("fusion", {}).get("repaired"),
            }
        )
    return rows


def version_plots(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Forget and utility metrics over versions, each against its bound."""
    x = [row["version"] for row in rows]

    def series(name: str) -> list:
        return [row[name] for row in rows]

    return [
        _plot("versions-forget", "Worst held set vs holdout target", "version", x, [
            _line("forget MA", series("forget_ma"), 0), _line("target MA", series("target_ma"), 0, dashed=True),
            _line("forget EL", series("forget_el"), 1), _line("target EL", series("target_el"), 1, dashed=True),
        ]),
        _plot("versions-retain", "Retain perplexity vs limit", "version", x, [
            _line("retain perplexity", series("retain_ppl"), 2), _line("limit", series("retain_ppl_limit"), 2, True),
        ]),
    ]  # fmt: skip
