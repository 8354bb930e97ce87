from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import Field, HttpUrl, model_validator

from app.core.schemas import Schema, VisibleText

MAX_CALLBACK_URLS = 5


class ForgetItem(Schema):
    """Either a free text, or a prompt with the completion the model must stop producing."""

    text: VisibleText | None = None
    prompt: VisibleText | None = None
    completion: VisibleText | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> ForgetItem:
        if (self.text is None) == (self.prompt is None and self.completion is None):
            raise ValueError("an item is either {'text'} or {'prompt', 'completion'}")
        if self.text is None and (self.prompt is None or self.completion is None):
            raise ValueError("a prompt item needs both 'prompt' and 'completion'")
        return self


class ForgetRequestCreate(Schema):
    subject_request_id: VisibleText = Field(max_length=200, description="The client's idempotency key.")
    model: str = Field(min_length=1, max_length=100, description="Name of the registered base model.")
    items: list[ForgetItem] = Field(min_length=1)
    status_callback_urls: list[HttpUrl] | None = Field(
        default=None,
        max_length=MAX_CALLBACK_URLS,
        description="Each status change is POSTed here, signed (X-Unlearnd-Signature); hosts must be allowlisted.",
    )


class ItemMetrics(Schema):
    model_config = {"extra": "allow"}
    before: dict[str, float]
    after: dict[str, float]


class ForgetRequestOut(Schema):
    id: uuid.UUID
    subject_request_id: str
    model: str
    status: str
    item_count: int
    received_at: datetime
    due_at: datetime
    completed_at: datetime | None
    failure_reason: str | None
    attempts: int
    item_metrics: list[ItemMetrics] | None
    shredded_at: datetime | None = Field(description="When the items' data key was destroyed; hashes and metrics stay.")
    status_callback_urls: list[str]


class ForgetRequestPage(Schema):
    items: list[ForgetRequestOut]
    next_cursor: str | None
