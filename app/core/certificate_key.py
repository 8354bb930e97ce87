"""The key that signs forget certificates, and names for its public half.

It comes from the settings (a value or a file). When neither is set, as under `make run`, it is generated once and
kept under `data_dir/keys` with 0600 permissions, so the embedded default needs no configuration; every process
sharing that data_dir shares the key. Production sets it (processes on different hosts must share it).
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from app.core.config import Settings
from app.core.key_files import KeyConfigurationError, configured, generated_once

SIGNING_KEY_FILE = "certificate-signing.pem"


def _new_signing_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def signing_key(settings: Settings) -> Ed25519PrivateKey:
    """The Ed25519 key that signs forget certificates."""
    pem = configured(settings.signing_key, settings.signing_key_file)
    if pem is None:
        pem = generated_once(settings.keys_dir / SIGNING_KEY_FILE, _new_signing_pem)
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
