"""A request's legal due date: one calendar month (GDPR Art. 12(3)), clamped to the end of a shorter month."""

from __future__ import annotations

from datetime import UTC, datetime


def test_calendar_month_deadline_clamps_to_the_end_of_the_month():
    from app.forget_requests.service import add_calendar_months

    assert add_calendar_months(datetime(2027, 1, 31, 9, tzinfo=UTC), 1) == datetime(2027, 2, 28, 9, tzinfo=UTC)
    assert add_calendar_months(datetime(2028, 1, 31, tzinfo=UTC), 1) == datetime(2028, 2, 29, tzinfo=UTC)
    assert add_calendar_months(datetime(2027, 12, 15, tzinfo=UTC), 1) == datetime(2028, 1, 15, tzinfo=UTC)
