"""Jinja2 templates of the dashboard and the filters they format values with."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from app.core.db import utcnow
from app.ui.models import DashboardSession

HERE = Path(__file__).parent
MINUTE, HOUR, DAY = 60, 3600, 86400


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = abs(seconds)
    if seconds < MINUTE:
        return f"{seconds:.0f} s"
    if seconds < HOUR:
        return f"{seconds // MINUTE:.0f} min {seconds % MINUTE:.0f} s"
    if seconds < 2 * DAY:
        return f"{seconds // HOUR:.0f} h {seconds % HOUR // MINUTE:.0f} min"
    return f"{seconds / DAY:.1f} days"


def moment(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "–"


def relative(value: datetime | None) -> str:
    """'in 3.0 days' or '5 min ago'."""
    if value is None:
        return "–"
    seconds = (value - utcnow()).total_seconds()
    return f"in {duration(seconds)}" if seconds >= 0 else f"{duration(seconds)} ago"


def number(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "–" if value is None else str(value)
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def base_path(request: Request) -> dict[str, str]:
    # The mount's path as the browser sees it (with a proxy's root path in front, if any).
    return {"ui": request.scope.get("root_path", "").rstrip("/")}


# What a page says after a form redirected to it (?done=...): fixed texts, so nothing submitted is ever echoed.
NOTICES = {
    "batched": "Batched pending requests into {count} new job(s).",
    "cancelled": "The job is cancelled, or will stop at its next training step.",
    "shredded": "The request's items are shredded: their texts can no longer be decrypted.",
    "alias": "The current alias now points at version {version}.",
    "unmerge": "An unmerge job is queued: it publishes a new version without that job.",
    "batching": "The batching policy is saved.",
}


def notice(request: Request) -> dict[str, str | None]:
    template = NOTICES.get(request.query_params.get("done", ""))
    numbers = {name: request.query_params.get(name, "") for name in ("count", "version")}
    numbers = {name: value if value.isdigit() and len(value) < 12 else "?" for name, value in numbers.items()}
    return {"notice": template.format(**numbers) if template else None}


templates = Jinja2Templates(directory=HERE / "templates", context_processors=[base_path, notice])
templates.env.filters.update(duration=duration, moment=moment, relative=relative, number=number)


def page(
    request: Request, name: str, viewer: DashboardSession | None, status_code: int = 200, **context: Any
) -> HTMLResponse:
    """A rendered page; `viewer` (the signed-in session) gives the layout its key and the forms their CSRF token."""
    return templates.TemplateResponse(request, name, {"viewer": viewer, **context}, status_code=status_code)
