"""The one configuration object. Every value can be set from the environment with the UNLEARND_ prefix."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The longest duration a setting or a model's policy takes (ten years): datetime arithmetic on it cannot overflow.
MAX_DURATION_SECONDS = 10 * 366 * 86400
_UNIT_SECONDS = {"_seconds": 1, "_hours": 3600, "_days": 86400}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNLEARND_", env_file=".env", extra="ignore")

    # Storage. Defaults are embedded (no server needed); production sets URLs from the environment.
    data_dir: Path = Path("var")
    database_url: str = ""  # default: sqlite under data_dir
    sqlite_busy_timeout_seconds: float = Field(default=5.0, gt=0, le=60)  # a locked write waits this long, then 503
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

    # Batching policy; a model's `batching` overrides the first three. A model's pending requests become a job when
    # their items reach batch_max_items, the oldest has waited batch_max_wait_seconds (or, for a model with a
    # `schedule`, at its next cron time instead), or one is within batch_deadline_margin_seconds of its due date.
    batch_max_items: int = Field(default=64, gt=0)
    batch_max_wait_seconds: float = Field(default=3600.0, ge=0)
    batch_deadline_margin_seconds: float = Field(default=3 * 86400.0, ge=0)
    batch_interval_seconds: float = Field(default=30.0, gt=0)  # how often the scheduler checks the policy
    batch_cron: str = ""  # instead of the interval: a crontab ("*/5 * * * *"), UTC

    # Jobs: retries, heartbeats, checkpoints, reconciliation with the broker.
    max_request_attempts: int = Field(default=3, gt=0)
    job_max_attempts: int = Field(default=3, gt=0)
    job_retry_backoff_seconds: float = Field(default=60.0, ge=0)  # doubles with each attempt
    job_retry_backoff_max_seconds: float = Field(default=3600.0, ge=0)
    progress_interval_seconds: float = Field(default=2.0, ge=0)
    heartbeat_interval_seconds: float = Field(default=10.0, gt=0)
    job_lost_after_seconds: float = Field(default=300.0, gt=0)  # a running job with an older heartbeat is lost
    checkpoint_every_steps: int = Field(default=20, ge=0)  # 0: no checkpoints (a retried job restarts)
    reconcile_interval_seconds: float = Field(default=30.0, gt=0)
    job_defaults: dict = Field(default_factory=dict)  # engine config overrides for every job (JSON)

    # Celery with Redis redelivers an unacknowledged job after the visibility timeout: it must exceed the longest job.
    broker_visibility_timeout_seconds: int = Field(default=86400, gt=0)
    broker_connect_timeout_seconds: float = Field(default=3.0, gt=0)  # the API never hangs on a broker that is down
    worker_soft_shutdown_seconds: float = Field(default=60.0, ge=0)  # grace for a stopping worker's job

    # Legal deadline for a deletion request (GDPR Art. 12(3): one month from receipt).
    deadline_months: int = Field(default=1, gt=0, le=120)

    # Key custody (app/core/key_store.py): epoch keys that wrap each request's data key, outside the database.
    key_store: Literal["local", "kms"] = "local"
    key_store_dir: Path | None = None  # local store: one file per epoch; default data_dir/keys
    kms_region: str = "us-east-1"  # kms store: one AWS KMS key per epoch, under the aliases below
    kms_endpoint_url: str | None = None
    kms_access_key_id: str | None = None
    kms_secret_access_key: SecretStr | None = None
    kms_alias_prefix: str = Field(default="unlearnd", pattern=r"^[A-Za-z0-9/_-]{1,200}$")
    kms_deletion_window_days: int = Field(default=7, ge=7, le=30)  # KMS's own bounds; the key is disabled at once
    # Legacy (before key epochs): base64 of 32 bytes that wrapped data keys; read only to re-wrap them.
    master_key: SecretStr | None = None
    master_key_file: Path | None = None
    # Item digest key: HMAC key of the item digests kept after shredding (base64 of 32 bytes; app/core/digest_key.py).
    item_digest_key: SecretStr | None = None
    item_digest_key_file: Path | None = None
    # Certificate signing key. Unset: generated once under data_dir/keys (embedded default only; production sets it).
    signing_key: SecretStr | None = None  # PEM (PKCS#8) Ed25519 private key that signs forget certificates
    signing_key_file: Path | None = None  # a file holding that PEM

    # Retention: a request's texts are crypto-shredded once it is covered by a published version re-verified by the
    # next `retention_versions` versions, and `retention_days` have passed since it completed, whichever is later.
    retention_versions: int = Field(default=2, ge=0)
    retention_days: float = Field(default=30.0, ge=0)
    shred_interval_seconds: float = Field(default=3600.0, gt=0)

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

    # Deployments: serving stacks a model's `current` version is pushed to when it moves, with the callbacks' checks,
    # signature, timeout and retries. "deployed": a request completes only once its version reached every target.
    completion_mode: Literal["published", "deployed"] = "published"  # a model's own completion_mode overrides it
    deployment_api_keys: dict[str, SecretStr] = Field(default_factory=dict)  # name -> bearer key a target names
    public_url: str = ""  # this API's base URL as webhook receivers reach it, for the manifest URL of an event

    log_level: str = "INFO"
    metrics_require_key: bool | None = None  # /metrics needs a requests:read key; unset: except in the embedded mode

    # The dashboard at /ui: a signed-in browser's session ends after this long, or after this long unused.
    dashboard_session_hours: float = Field(default=8.0, gt=0)
    dashboard_idle_minutes: float = Field(default=60.0, gt=0)

    @field_validator("callback_allowed_networks")
    @classmethod
    def _valid_networks(cls, networks: list[str]) -> list[str]:
        for network in networks:
            ipaddress.ip_network(network, strict=False)  # a typo fails at startup, not at the first callback
        return networks

    @model_validator(mode="after")
    def _bounded_durations(self) -> Settings:
        for name in type(self).model_fields:
            for suffix, unit in _UNIT_SECONDS.items():
                if name.endswith(suffix) and getattr(self, name) * unit > MAX_DURATION_SECONDS:
                    raise ValueError(f"{name} must be at most {MAX_DURATION_SECONDS // unit} (ten years)")
        return self

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        if self.job_lost_after_seconds <= 2 * self.heartbeat_interval_seconds:
            raise ValueError("job_lost_after_seconds must exceed twice heartbeat_interval_seconds")
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

    @property
    def embedded(self) -> bool:
        """The `make run` mode: SQLite and the filesystem broker, everything on one machine."""
        return self.database_url.startswith("sqlite") and self.broker_url.startswith("filesystem")

    @property
    def metrics_key_required(self) -> bool:
        return not self.embedded if self.metrics_require_key is None else self.metrics_require_key

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"


@lru_cache
def get_settings() -> Settings:
    return Settings()
