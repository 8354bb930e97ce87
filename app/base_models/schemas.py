from __future__ import annotations

from datetime import datetime

from pydantic import Field

from app.core.schemas import Schema
from app.jobs.policy import BatchingPolicy


class BaseModelCreate(Schema):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    path: str = Field(min_length=1, max_length=1000, description="Local directory of a Hugging Face causal LM.")
    tokenizer_path: str | None = Field(default=None, max_length=1000, description="Defaults to `path`.")
    retain_corpus: str = Field(min_length=1, max_length=1000, description="JSONL of items the model must keep.")
    holdout_corpus: str = Field(min_length=1, max_length=1000, description="JSONL of items it never saw.")
    engine_config: dict = Field(default_factory=dict, description="Engine settings for this model's jobs.")
    batching: BatchingPolicy = Field(
        default_factory=BatchingPolicy, description="Overrides of the service's batching policy for this model."
    )


class BaseModelUpdate(Schema):
    batching: BatchingPolicy = Field(description="Replaces the model's batching overrides ({} for the defaults).")


ADMIN_ONLY = "Admin keys only (server paths and engine settings are not shown to tenants)."


class BaseModelOut(Schema):
    name: str
    path: str | None = Field(description=ADMIN_ONLY)
    tokenizer_path: str | None = Field(description=ADMIN_ONLY)
    weights_sha256: str
    retain_corpus: str | None = Field(description=ADMIN_ONLY)
    holdout_corpus: str | None = Field(description=ADMIN_ONLY)
    engine_config: dict | None = Field(description=ADMIN_ONLY)
    batching: dict
    current_version: int | None
    created_at: datetime
