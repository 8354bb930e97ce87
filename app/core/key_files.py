"""Keys kept as files: read from the settings, generated once, kept in an owner-only folder, overwritten when
destroyed."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr

log = logging.getLogger(__name__)


class KeyConfigurationError(RuntimeError):
    """A configured key cannot be read or has the wrong form, or its folder is open to others."""


def configured(value: SecretStr | None, file: Path | None) -> bytes | None:
    if value is not None:
        return value.get_secret_value().encode()
    if file is not None:
        try:
            return file.read_bytes()
        except OSError as error:
            raise KeyConfigurationError(f"cannot read key file {file}: {error.strerror}") from None
    return None


def base64_key(raw: bytes, name: str, size: int = 32) -> bytes:
    """The `size` bytes a configured or stored key holds in base64; KeyConfigurationError naming `name` otherwise."""
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except binascii.Error:
        raise KeyConfigurationError(f"the {name} must be base64") from None
    if len(key) != size:
        raise KeyConfigurationError(f"the {name} must be {size} bytes, got {len(key)}")
    return key


def private_folder(path: Path) -> Path:
    """`path`, created with mode 0700 if absent; an existing folder that others may read or enter is refused."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyConfigurationError(f"key folder {path} has mode {mode:o}; it must be 0700 (chmod 700 {path})")
    return path


def create_once(path: Path, content: bytes) -> bool:
    """Write `content` to `path` (mode 0600) unless it exists; concurrent creators agree on one file, since each
    writes a private temporary file and hard-links it into place, which fails for all but the first."""
    private_folder(path.parent)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
            return True
        except FileExistsError:
            return False  # another process created it first: theirs stands
    finally:
        temporary.unlink(missing_ok=True)


def generated_once(path: Path, generate: Callable[[], bytes]) -> bytes:
    """The key stored at `path`, generated there first if absent."""
    private_folder(path.parent)
    if not path.is_file() and create_once(path, generate()):
        log.warning("generated %s; production must configure this key instead", path)
    return path.read_bytes()


def destroy_file(path: Path) -> None:
    """Overwrite the file with random bytes, flush them to disk, then remove it, so the key is not left in the
    file's old blocks (on storage that overwrites in place; copy-on-write and SSD remapping may keep old blocks)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    with path.open("r+b") as f:
        f.write(secrets.token_bytes(size))
        f.flush()
        os.fsync(f.fileno())
    path.unlink()
