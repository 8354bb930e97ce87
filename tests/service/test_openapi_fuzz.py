"""Schemathesis against the live OpenAPI spec, with a real admin key and real PostgreSQL: no operation answers 5xx,
and every response (status, content type, headers, body) is the one the spec documents."""

from __future__ import annotations

import secrets

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from app.main import create_app

# Enough examples per operation to reach every validation branch, few enough to keep the file well under two minutes.
EXAMPLES_PER_OPERATION = 25
# The spec is loaded at collection, before the database exists, so the admin key's secret is chosen now and its row
# stored by the fixture below.
ADMIN_SECRET = "unl_" + secrets.token_urlsafe(32)

CONFIG = SchemathesisConfig.from_dict(
    {
        # Applied as the spec's HTTPBearer scheme, so Schemathesis knows which cases deliberately leave it out.
        "auth": {"openapi": {"HTTPBearer": {"bearer": ADMIN_SECRET}}},
        # A schema-valid request may still name a model directory that does not exist on the server, or a cursor
        # the server never issued: the API rightly answers 422, which no JSON Schema can foresee. Every other check
        # keeps its defaults.
        "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "409", "422"]}},
    }
)
# The spec needs no database; conftest has set the environment by the time this module is collected.
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(), config=CONFIG)


@pytest.fixture(scope="module", autouse=True)
def admin_key_row(database) -> None:
    from app.auth.models import ApiKey
    from app.auth.service import hash_key
    from app.core.db import session_scope

    with session_scope() as session:
        session.add(
            ApiKey(name="schemathesis", key_hash=hash_key(ADMIN_SECRET), prefix=ADMIN_SECRET[:12], scopes=["admin"])
        )
        session.commit()


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_its_spec_documents(case, registered_model):
    case.call_and_validate()


def test_method_not_allowed_names_every_method_the_path_serves(client):
    response = client.request("PATCH", "/v1/forget-requests/e3e70682-c209-1cac-a29f-6fbed82c07cd")
    assert response.status_code == 405
    assert response.headers["Allow"] == "DELETE, GET, HEAD"
    assert response.json()["error"]["code"] == "method_not_allowed"
