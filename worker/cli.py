"""The `unlearnd` command: run the API, the worker and the scheduler, migrate, build the demo model, manage keys."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from app.core.config import get_settings
from app.core.logging import logging_config

cli = typer.Typer(
    help="unlearnd: make a language model forget data on request.", no_args_is_help=True, pretty_exceptions_enable=False
)
keys = typer.Typer(help="Create, list, rotate and revoke API keys.", no_args_is_help=True)
callback_secrets = typer.Typer(help="Per-tenant secrets that sign status callbacks.", no_args_is_help=True)
cli.add_typer(keys, name="keys")
cli.add_typer(callback_secrets, name="callback-secrets")

DEMO_MODEL_NAME = "demo"


@cli.command()
def migrate() -> None:
    """Upgrade the database schema to the latest migration."""
    from app.migrate import upgrade

    upgrade(get_settings().database_url)
    typer.echo("database is at the latest schema")


@cli.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[int, typer.Option(help="API worker processes.")] = 1,
) -> None:
    """Run the HTTP API (uvicorn)."""
    import uvicorn

    level = get_settings().log_level
    # uvicorn applies the config in every worker process; its access log is replaced by app.api.request_ids'.
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=logging_config(level),
        log_level=level.lower(),
        access_log=False,
    )


@cli.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume.")] = "gpu,default",
    hostname: Annotated[str | None, typer.Option(help="Celery node name.")] = None,
) -> None:
    """Run a Celery worker. One process per GPU: the solo pool never forks after CUDA is initialised."""
    from worker.celery_app import celery_app

    argv = ["worker", "--pool", "solo", "--queues", queues, "--loglevel", get_settings().log_level]
    if hostname:
        argv += ["--hostname", hostname]
    celery_app.worker_main(argv)


@cli.command()
def beat() -> None:
    """Run the scheduler that batches pending requests into jobs at the configured interval."""
    from worker.celery_app import celery_app

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    celery_app.start(["beat", "--loglevel", settings.log_level, "--schedule", str(settings.beat_schedule_file)])


def _register_demo(name: str, demo) -> None:
    from app.base_models.schemas import BaseModelCreate
    from app.base_models.service import register
    from app.core.db import session_scope
    from app.core.errors import Conflict

    body = BaseModelCreate(
        name=name,
        path=str(demo.model_dir),
        retain_corpus=str(demo.retain_corpus),
        holdout_corpus=str(demo.holdout_corpus),
    )
    with session_scope() as session:
        try:
            register(session, body, actor="cli")
            session.commit()
            typer.echo(f"registered model '{name}'")
        except Conflict:
            typer.echo(f"model '{name}' is already registered")


@cli.command("demo-model")
def demo_model(
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <data_dir>/demo-model).")] = None,
    size: Annotated[str, typer.Option(help="'demo' (a minute or two) or 'tiny' (seconds, for tests).")] = "demo",
    name: Annotated[str, typer.Option(help="Name to register the model under.")] = DEMO_MODEL_NAME,
    register: Annotated[bool, typer.Option(help="Register the model in the database.")] = True,
    seed: int = 0,
) -> None:
    """Build a small Llama-style model that memorised the shipped corpus of fictitious people (no downloads)."""
    from worker.demo_model import build_demo_model

    out = out or get_settings().data_dir / "demo-model"
    demo = build_demo_model(out, size=size, seed=seed, log=typer.echo)
    typer.echo(f"model: {demo.model_dir}\nforget candidates: {demo.forget_candidates}")
    if register:
        _register_demo(name, demo)


@cli.command("verify-certificate")
def verify_certificate(
    file: Annotated[Path, typer.Argument(help="A certificate as served by GET /v1/forget-requests/{id}/certificate.")],
    public_key: Annotated[
        Path | None,
        typer.Option(help="PEM public key from GET /v1/keys/certificate-signing (default: this installation's)."),
    ] = None,
) -> None:
    """Check a forget certificate offline: exit 0 if its signature matches its payload and the key, 1 if not."""

    from app.core.canonical import strict_loads
    from app.core.certificate_key import KeyConfigurationError, load_public_key_pem, signing_key
    from app.evidence.signing import InvalidCertificate, verify

    try:
        key = load_public_key_pem(public_key.read_bytes()) if public_key else signing_key(get_settings()).public_key()
        payload = verify(strict_loads(file.read_bytes()), key)
    except (OSError, ValueError, InvalidCertificate, KeyConfigurationError) as error:
        typer.echo(f"INVALID: {error}", err=True)
        raise typer.Exit(code=1) from None
    versions = [payload["first_version"]["version"], *(v["version"] for v in payload["verified_by"])]
    typer.echo(
        f"valid: request {payload['request_id']} ({payload['subject_request_id']}), {len(payload['items'])} items, "
        f"model {payload['base_model']['name']}, covered by versions {versions}"
    )


@cli.command("export-merged")
def export_merged(
    model: Annotated[str, typer.Argument(help="A registered model's name.")],
    out: Annotated[Path, typer.Argument(help="The folder to write the checkpoint into (empty or new).")],
    version: Annotated[int | None, typer.Option(help="The adapter version (default: `current`).")] = None,
    dtype: Annotated[str, typer.Option(help="'bfloat16' or 'base' (the base weights' dtype).")] = "bfloat16",
) -> None:
    """Write base + the version's fused delta as a full Hugging Face checkpoint (safetensors shards) with a manifest
    linking it to the version; refused if the gate's metrics recomputed on it drift from the adapter's."""
    if dtype not in ("bfloat16", "base"):
        raise typer.BadParameter("dtype must be 'bfloat16' or 'base'")
    if out.exists() and any(out.iterdir()):
        raise typer.BadParameter(f"{out} is not empty")
    from app.core.errors import DomainError
    from worker.merged_export import MergeMismatch, export_to_folder

    try:
        manifest = export_to_folder(model, version, out, dtype, get_settings())
    except (DomainError, MergeMismatch) as error:
        typer.echo(f"not exported: {error}", err=True)
        raise typer.Exit(code=1) from None
    drift = manifest["metrics"]["drift"]
    typer.echo(
        f"wrote {model} version {manifest['version']} merged ({manifest['dtype']}) to {out}: "
        f"{len(manifest['files'])} files; metric drift {drift} within {manifest['metrics']['tolerance']}"
    )


@keys.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who the key is for.")],
    scope: Annotated[list[str], typer.Option(help="requests:write, requests:read or admin (repeatable).")],
    tenant: Annotated[str, typer.Option(help="The tenant whose requests and jobs the key sees.")] = "default",
    expires_in_days: Annotated[float | None, typer.Option(help="Lifetime; the key never expires if unset.")] = None,
) -> None:
    """Create a key and print it once: only its hash is stored."""
    from datetime import timedelta

    from app.auth.service import create_key
    from app.core.db import session_scope

    lifetime = timedelta(days=expires_in_days) if expires_in_days is not None else None
    with session_scope() as session:
        key, secret = create_key(session, name, scope, tenant=tenant, expires_in=lifetime)
        session.commit()
        typer.echo(_describe(key))
        typer.echo(secret)


def _describe(key) -> str:
    from app.auth.service import key_state

    expires = key.expires_at.isoformat(timespec="seconds") if key.expires_at else "never"
    return (
        f"id={key.id} name={key.name} tenant={key.tenant} scopes={','.join(key.scopes)} expires={expires} "
        f"state={key_state(key)}"
    )


@keys.command("list")
def keys_list() -> None:
    """List keys (never their secrets)."""
    from app.auth.service import list_keys
    from app.core.db import session_scope

    with session_scope() as session:
        for key in list_keys(session):
            typer.echo(f"{key.prefix}…\t{_describe(key)}")


@keys.command("rotate")
def keys_rotate(
    key_id: int,
    grace_hours: Annotated[
        float | None,
        typer.Option(help="How long the old key keeps working (default: UNLEARND_KEY_ROTATION_GRACE_HOURS)."),
    ] = None,
) -> None:
    """Create a replacement key (same name, tenant, scopes and lifetime), print it once, and let the old one expire
    after a grace period."""
    from datetime import timedelta

    from app.auth.service import rotate_key
    from app.core.db import session_scope

    hours = get_settings().key_rotation_grace_hours if grace_hours is None else grace_hours
    with session_scope() as session:
        new, secret = rotate_key(session, key_id, timedelta(hours=hours))
        session.commit()
        typer.echo(_describe(new))
        typer.echo(secret)


@keys.command("revoke")
def keys_revoke(key_id: int) -> None:
    """Revoke a key; requests with it are refused from now on."""
    from app.auth.service import revoke_key
    from app.core.db import session_scope

    with session_scope() as session:
        revoke_key(session, key_id)
        session.commit()
    typer.echo(f"revoked key {key_id}")


@callback_secrets.command("rotate")
def callback_secrets_rotate(
    tenant: Annotated[str, typer.Option(help="The tenant whose callbacks the secret signs.")] = "default",
) -> None:
    """Create the tenant's callback secret, or replace it (the previous one keeps signing for
    UNLEARND_KEY_ROTATION_GRACE_HOURS), and print it once."""
    from app.callbacks.secrets import rotate
    from app.core.db import session_scope

    with session_scope() as session:
        row, secret = rotate(session, tenant, get_settings(), actor="cli")
        session.commit()
        typer.echo(f"tenant={row.tenant} generation={row.generation}")
        typer.echo(secret)


def _stop_children(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@cli.command()
def up(port: int = 8000, demo_size: str = "demo") -> None:
    """Everything on the embedded defaults: migrate, build and register the demo model if missing, create an
    admin key, then run the API, one worker and the scheduler until interrupted."""
    migrate()
    from sqlalchemy import select

    from app.base_models.models import RegisteredModel
    from app.core.db import session_scope

    with session_scope() as session:
        registered = session.scalar(select(RegisteredModel.path).where(RegisteredModel.name == DEMO_MODEL_NAME))
    if registered is None or not Path(registered).is_dir():
        demo_model(out=None, size=demo_size, name=DEMO_MODEL_NAME, register=True, seed=0)
    from app.auth.service import create_key

    with session_scope() as session:
        _, secret = create_key(session, "admin (unlearnd up)", ["admin"])
        session.commit()
    typer.echo(
        f"\nadmin API key (shown once): {secret}\nAPI: http://127.0.0.1:{port}  docs: /docs\n"
        f"dashboard: http://127.0.0.1:{port}/ui/  (sign in with the admin key)\n"
    )
    exe = [sys.executable, "-m", "worker.cli"]
    for stop_signal in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, or a process manager stopping us
        signal.signal(stop_signal, _stop_children)
    processes = [
        subprocess.Popen([*exe, "serve", "--port", str(port)]),
        subprocess.Popen([*exe, "worker"]),
        subprocess.Popen([*exe, "beat"]),
    ]
    try:
        while all(p.poll() is None for p in processes):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for p in processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in processes:
            p.wait(timeout=60)
    failed = [p.args[3] for p in processes if p.returncode not in (0, -signal.SIGTERM)]
    if failed:
        raise typer.Exit(code=1)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli()


if __name__ == "__main__":
    main()
