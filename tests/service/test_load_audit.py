"""The load benchmark's audit (bench/load.py): lost and duplicated requests, on rows the API really stored."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from bench.load import Answer, Audit, StoredRequest, answer_of, audit, request_body, stored_requests
from tests.service.conftest import auth, make_key


@pytest.fixture
def submitted(client, registered_model) -> tuple[list[Answer], int]:
    """Three requests submitted by a key of their own, and one replayed: the answers and the key's id."""
    from sqlalchemy import select

    from app.auth.models import ApiKey
    from app.auth.service import hash_key
    from app.core.db import session_scope

    key = make_key(["requests:write"], "load audit")
    run = uuid.uuid4().hex[:8]  # subject ids are unique per tenant, and every test here uses the default tenant
    bodies = [request_body(registered_model, f"audit-{run}-{i}", items=2) for i in range(3)]
    answers = [answer_of(b, client.post("/v1/forget-requests", headers=auth(key), json=b)) for b in bodies]
    answers.append(answer_of(bodies[0], client.post("/v1/forget-requests", headers=auth(key), json=bodies[0])))
    with session_scope() as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(key)))
    return answers, key_id


def rows_of(key_id: int) -> list[StoredRequest]:
    from app.core.db import session_scope

    with session_scope() as session:
        return stored_requests(session, key_id)


def test_every_answered_request_stored_once_is_neither_lost_nor_duplicated(submitted):
    answers, key_id = submitted
    assert [a.created for a in answers] == [True, True, True, False]
    assert answers[3].request_id == answers[0].request_id
    assert audit(answers, rows_of(key_id)) == Audit(lost=0, duplicates=0, unacknowledged=0, checked=3)


def test_an_answered_id_missing_from_the_database_is_lost(submitted):
    answers, key_id = submitted
    missing = Answer("audit-never-stored", uuid.uuid4(), answers[0].body_sha256, created=True)
    assert audit([*answers, missing], rows_of(key_id)).lost == 1


def test_a_201_whose_row_holds_another_body_is_lost(submitted):
    answers, key_id = submitted
    wrong_body = replace(answers[1], body_sha256="0" * 64)
    result = audit([answers[0], wrong_body, answers[2]], rows_of(key_id))
    assert (result.lost, result.duplicates) == (1, 0)


def test_a_second_request_id_for_one_subject_is_a_duplicate(submitted):
    answers, key_id = submitted
    # a replay of audit-0 answered with audit-1's request: two ids for one subject, and an id under the wrong subject
    wrong_replay = replace(answers[3], request_id=answers[1].request_id)
    result = audit([*answers[:3], wrong_replay], rows_of(key_id))
    assert (result.duplicates, result.lost) == (1, 1)


def test_a_stored_request_without_an_answer_is_unacknowledged_not_lost(submitted):
    answers, key_id = submitted
    result = audit([answers[0], answers[1]], rows_of(key_id))
    assert result == Audit(lost=0, duplicates=0, unacknowledged=1, checked=2)
