"""The one configuration object. Every value can be set from the environment with the UNLEARND_ prefix."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNLEARND_", env_file=".env", extra="ignore")

    # Storage. Defaults are embedded (no server needed); production sets URLs from the environment.
    data_dir: Path = Path("var")
    database_url: str = ""  # default: sqlite under data_dir
    broker_url: str = "filesystem://"  # kombu's filesystem transport under data_dir; production: redis://...
    artifact_dir: Path | None = None  # local artifact store root; default: data_dir/artifacts
    # S3-compatible artifact store (MinIO, AWS S3, ...): used when s3_bucket is set.
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None

    # API limits: every one is answered with a clear 4xx.
    max_body_bytes: int = Field(default=1_000_000, gt=0)
    max_items_per_request: int = Field(default=100, gt=0)
    max_chars_per_item: int = Field(default=8_000, gt=0)
    max_page_size: int = Field(default=200, gt=0)
    max_json_depth: int = Field(default=32, gt=0)  # deeper bodies get 400 before they are parsed

    # Batching and jobs.
    batch_interval_seconds: float = Field(default=30.0, gt=0)
    max_request_attempts: int = Field(default=3, gt=0)
    progress_interval_seconds: float = Field(default=2.0, ge=0)
    job_defaults: dict = Field(default_factory=dict)  # engine config overrides for every job (JSON)

    # Legal deadline for a deletion request (GDPR Art. 12(3): one month from receipt).
    deadline_months: int = Field(default=1, gt=0)

    log_level: str = "INFO"
    metrics_require_key: bool = False  # /metrics is open by Prometheus convention; true: a requests:read key

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'unlearnd.sqlite'}"
        if self.artifact_dir is None:
            self.artifact_dir = self.data_dir / "artifacts"
        return self

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def beat_schedule_file(self) -> Path:
        return self.data_dir / "celerybeat-schedule"


@lru_cache
def get_settings() -> Settings:
    return Settings()
