"""The batching policy's decision, on requests in memory: when pending requests become a job, and how big it is."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

import app.models  # noqa: F401  (maps every table, so a request can be built without a database)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def pending(items: int, received: datetime, due: datetime | None = None):
    from app.forget_requests.models import ForgetRequest

    return ForgetRequest(
        item_sha256s=[f"{i:064x}" for i in range(items)],
        received_at=received,
        due_at=due or received + timedelta(days=30),
    )


def policy(**overrides):
    from app.jobs.batching import Policy

    values = {"max_items": 10, "max_wait": timedelta(hours=1), "deadline_margin": timedelta(days=3), "schedule": None}
    return Policy(**(values | overrides))


@pytest.mark.parametrize(
    ("rule", "requests", "overrides", "expected"),
    [
        ("nothing pending", [], {}, None),
        ("below every threshold", [(3, 10)], {}, None),
        ("items reach max_items", [(6, 10), (4, 5)], {}, "size"),
        ("oldest waited max_wait", [(1, 61)], {}, "wait"),
        ("a due date within the margin", [(1, 1, timedelta(days=2))], {}, "deadline"),
        ("a scheduled time passed since the oldest arrived", [(1, 150)], {"schedule": "0 10 * * *"}, "schedule"),
        ("the schedule replaces the wait", [(1, 90)], {"schedule": "0 10 * * *"}, None),
        ("the deadline beats the schedule", [(1, 5, timedelta(hours=1))], {"schedule": "0 2 * * *"}, "deadline"),
    ],
)
def test_policy_trigger(rule, requests, overrides, expected):
    rows = [pending(r[0], NOW - timedelta(minutes=r[1]), NOW + r[2] if len(r) > 2 else None) for r in requests]
    assert policy(**overrides).trigger(rows, NOW) == expected, rule


def test_a_job_takes_whole_requests_oldest_first_up_to_max_items():
    rows = [pending(4, NOW), pending(5, NOW), pending(2, NOW)]
    assert policy(max_items=10).take(rows) == rows[:2]
    assert policy(max_items=3).take(rows) == rows[:1]  # a larger request still goes, alone
