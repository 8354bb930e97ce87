from __future__ import annotations

from datetime import datetime

from app.core.schemas import Schema


class CallbackSecretOut(Schema):
    tenant: str
    generation: int
    secret: str
    previous_valid_until: datetime | None
