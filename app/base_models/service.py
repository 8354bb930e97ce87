from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.service import record
from app.auth.models import ApiKey
from app.base_models.models import RegisteredModel
from app.base_models.schemas import BaseModelCreate, BaseModelOut, BaseModelUpdate
from app.core.errors import Conflict, InvalidInput, NotFound

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_sha256(model_dir: Path) -> str:
    """One digest over every weight file (name and content), identifying exactly which weights a model has."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _check_corpus(path: Path, field: str) -> None:
    if not path.is_file():
        raise InvalidInput(f"{field} is not a file", {"field": field, "path": str(path)})
    with path.open(errors="replace") as f:  # a binary file then fails as JSON, not as text
        first = f.readline()
    try:
        item = json.loads(first)
    except json.JSONDecodeError:
        item = None
    if not isinstance(item, dict) or not ({"text"} <= item.keys() or {"prompt", "completion"} <= item.keys()):
        raise InvalidInput(f"{field} must be JSONL of {{'text'}} or {{'prompt','completion'}} items", {"field": field})


def _checked_paths(data: BaseModelCreate) -> tuple[Path, Path, Path, Path]:
    """The model, tokenizer, retain and holdout paths, resolved, once each holds what a job will read."""
    model_dir = Path(data.path).resolve()
    tokenizer_dir = Path(data.tokenizer_path).resolve() if data.tokenizer_path else model_dir
    if not (model_dir / "config.json").is_file():
        raise InvalidInput("path is not a Hugging Face model directory (no config.json)", {"path": str(model_dir)})
    if not any(p.suffix in WEIGHT_SUFFIXES for p in model_dir.iterdir()):
        raise InvalidInput("no weight files (*.safetensors, *.bin) in the model directory", {"path": str(model_dir)})
    if not any((tokenizer_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise InvalidInput("no tokenizer files at tokenizer_path", {"tokenizer_path": str(tokenizer_dir)})
    retain, holdout = Path(data.retain_corpus).resolve(), Path(data.holdout_corpus).resolve()
    _check_corpus(retain, "retain_corpus")
    _check_corpus(holdout, "holdout_corpus")
    return model_dir, tokenizer_dir, retain, holdout


def register(session: Session, data: BaseModelCreate, actor: str) -> RegisteredModel:
    try:
        model_dir, tokenizer_dir, retain, holdout = _checked_paths(data)
    except (OSError, ValueError) as exc:  # a NUL character, a name too long for the filesystem, an unreadable folder
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)  # str(OSError) would repeat the path
        raise InvalidInput(f"cannot read the given paths: {reason}") from None
    if session.scalar(select(RegisteredModel.id).where(RegisteredModel.name == data.name)) is not None:
        raise Conflict(f"a model named '{data.name}' is already registered")
    model = RegisteredModel(
        name=data.name,
        path=str(model_dir),
        tokenizer_path=str(tokenizer_dir),
        weights_sha256=weights_sha256(model_dir),
        retain_corpus=str(retain),
        holdout_corpus=str(holdout),
        engine_config=data.engine_config,
        batching=data.batching.model_dump(exclude_none=True),
    )
    session.add(model)
    session.flush()
    record(session, actor, "base_model.registered", "base_model", model.id, name=model.name)
    return model


def list_models(session: Session) -> list[RegisteredModel]:
    return list(session.scalars(select(RegisteredModel).order_by(RegisteredModel.name)))


def get_by_name(session: Session, name: str) -> RegisteredModel:
    return found(session, name, session.scalar(select(RegisteredModel).where(RegisteredModel.name == name)))


def found(session: Session, name: str, model: RegisteredModel | None) -> RegisteredModel:
    """The model looked up under `name`, or 404 listing the known ones."""
    if model is None:
        known = [m.name for m in list_models(session)]
        raise NotFound(f"unknown model '{name}'", {"known_models": known})
    return model


def update_batching(session: Session, model: RegisteredModel, data: BaseModelUpdate, actor: str) -> RegisteredModel:
    previous, model.batching = model.batching, data.batching.model_dump(exclude_none=True)
    record(session, actor, "base_model.batching_changed", "base_model", model.id, previous=previous,
           batching=model.batching)  # fmt: skip
    return model


ADMIN_ONLY_FIELDS = ("path", "tokenizer_path", "retain_corpus", "holdout_corpus", "engine_config")


def to_out(model: RegisteredModel, key: ApiKey) -> BaseModelOut:
    """The model as `key` may see it: server paths and engine settings for admins only."""
    out = BaseModelOut.model_validate(model)
    return out if key.is_admin else out.model_copy(update=dict.fromkeys(ADMIN_ONLY_FIELDS))
