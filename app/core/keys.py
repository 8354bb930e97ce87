"""Key material: the master key that wraps request data keys, and the key that signs forget certificates.

Each comes from the settings (a value or a file). When neither is set, as under `make run`, it is generated once
and kept under `data_dir/keys` with 0600 permissions, so the embedded default needs no configuration; every process
sharing that data_dir shares the key. Production sets both (processes on different hosts must share them).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import secrets
import uuid
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import SecretStr

from app.core.config import Settings

log = logging.getLogger(__name__)

MASTER_KEY_BYTES = 32  # AES-256
MASTER_KEY_FILE = "master.key"
SIGNING_KEY_FILE = "certificate-signing.pem"


class KeyConfigurationError(RuntimeError):
    """A configured key cannot be read or has the wrong form."""


def _configured(value: SecretStr | None, file: Path | None) -> bytes | None:
    if value is not None:
        return value.get_secret_value().encode()
    if file is not None:
        try:
            return file.read_bytes()
        except OSError as error:
            raise KeyConfigurationError(f"cannot read key file {file}: {error.strerror}") from None
    return None


def _generated_once(path: Path, generate: Callable[[], bytes]) -> bytes:
    """The key stored at `path`, created there first if absent. Concurrent first uses agree on one key: each writes
    a private temporary file and hard-links it into place, which fails for all but the first."""
    if path.is_file():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as f:
            f.write(generate())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
            log.warning("generated %s; production must configure this key instead", path)
        except FileExistsError:
            pass  # another process created it first: use theirs
    finally:
        temporary.unlink(missing_ok=True)
    return path.read_bytes()


def master_key(settings: Settings) -> bytes:
    """The 32-byte key that wraps every request's data key."""
    raw = _configured(settings.master_key, settings.master_key_file)
    if raw is None:
        raw = _generated_once(
            settings.keys_dir / MASTER_KEY_FILE, lambda: base64.b64encode(secrets.token_bytes(MASTER_KEY_BYTES))
        )
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except binascii.Error:
        raise KeyConfigurationError("the master key must be base64") from None
    if len(key) != MASTER_KEY_BYTES:
        raise KeyConfigurationError(f"the master key must be {MASTER_KEY_BYTES} bytes, got {len(key)}")
    return key


def _new_signing_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def signing_key(settings: Settings) -> Ed25519PrivateKey:
    """The Ed25519 key that signs forget certificates."""
    pem = _configured(settings.signing_key, settings.signing_key_file)
    if pem is None:
        pem = _generated_once(settings.keys_dir / SIGNING_KEY_FILE, _new_signing_pem)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise KeyConfigurationError("the signing key must be an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyConfigurationError("the signing key must be an Ed25519 key")
    return key


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key_pem(pem: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise KeyConfigurationError("not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyConfigurationError("the public key must be an Ed25519 key")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the start of the sha256 of its raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]
