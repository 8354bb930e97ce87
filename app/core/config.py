"""The one configuration object. Every value can be set from the environment with the UNLEARND_ prefix."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
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

    # Batching and jobs.
    batch_interval_seconds: float = Field(default=30.0, gt=0)
    max_request_attempts: int = Field(default=3, gt=0)
    progress_interval_seconds: float = Field(default=2.0, ge=0)
    job_defaults: dict = Field(default_factory=dict)  # engine config overrides for every job (JSON)

    # Legal deadline for a deletion request (GDPR Art. 12(3): one month from receipt).
    deadline_months: int = Field(default=1, gt=0)

    # Access control: per-key token bucket (Redis when the broker is Redis, else per process), key rotation.
    rate_limit_per_minute: float = Field(default=600.0, gt=0)
    rate_limit_burst: int = Field(default=100, gt=0)
    key_rotation_grace_hours: float = Field(default=24.0, ge=0)

    # Status callbacks: signed POSTs to allowlisted hosts only; non-public addresses need an explicit allowance.
    callback_secret: str = ""  # HMAC-SHA256 key for X-Unlearnd-Signature; callbacks are refused while unset
    callback_allowed_hosts: list[str] = Field(default_factory=list)  # host names, "*.example.com" or "*"
    callback_allowed_networks: list[str] = Field(default_factory=list)  # IPs/CIDRs allowed although not public
    callback_allow_private: bool = False  # allow every private, loopback, link-local... address
    callback_timeout_seconds: float = Field(default=10.0, gt=0)
    callback_max_attempts: int = Field(default=10, gt=0)
    callback_retry_base_seconds: float = Field(default=30.0, gt=0)  # doubled after each failed attempt
    callback_retry_max_seconds: float = Field(default=3600.0, gt=0)
    callback_sweep_interval_seconds: float = Field(default=60.0, gt=0)  # re-sends due deliveries a lost message left

    log_level: str = "INFO"

    @field_validator("callback_allowed_networks")
    @classmethod
    def _valid_networks(cls, networks: list[str]) -> list[str]:
        for network in networks:
            ipaddress.ip_network(network, strict=False)  # a typo fails at startup, not at the first callback
        return networks

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
