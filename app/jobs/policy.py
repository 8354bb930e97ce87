"""A model's batching policy as the API accepts it: imported by the model registry (its schemas) and the batcher."""

from __future__ import annotations

from celery.schedules import crontab
from pydantic import Field, field_validator

from app.core.config import MAX_DURATION_SECONDS
from app.core.schemas import Schema


def parse_cron(expression: str) -> crontab:
    """A five-field crontab (minute hour day-of-month month day-of-week), evaluated in UTC."""
    if len(expression.split()) != 5:
        raise ValueError(f"a schedule is a five-field crontab, got {expression!r}")
    return crontab.from_string(expression)


class BatchingPolicy(Schema):
    """A model's overrides of the service's batching policy (unset fields keep the service's settings)."""

    max_items: int | None = Field(default=None, gt=0, le=100_000, description="Items that trigger a job, and cap it.")
    max_wait_seconds: float | None = Field(
        default=None, ge=0, le=MAX_DURATION_SECONDS, description="Oldest request's wait that triggers one."
    )
    deadline_margin_seconds: float | None = Field(
        default=None, ge=0, le=MAX_DURATION_SECONDS, description="Due-date margin that triggers one."
    )
    schedule: str | None = Field(
        default=None, max_length=100, description="Crontab (UTC), e.g. '0 2 * * *': batch at these times, not by wait."
    )

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None:
            parse_cron(value)
        return value
