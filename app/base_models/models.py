from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, utcnow


class RegisteredModel(Base):
    """A Hugging Face causal LM on local disk that deletion requests target."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    path: Mapped[str] = mapped_column(String(1000))
    tokenizer_path: Mapped[str] = mapped_column(String(1000))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    retain_corpus: Mapped[str] = mapped_column(String(1000))
    holdout_corpus: Mapped[str] = mapped_column(String(1000))
    engine_config: Mapped[dict] = mapped_column(default=dict)
    batching: Mapped[dict] = mapped_column(default=dict)  # overrides of the service's batching policy
    current_version: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
