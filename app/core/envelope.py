"""Envelope encryption with AES-256-GCM: each sealed value has a data key of its own, stored only wrapped by the
master key. Destroying the wrapped data key makes that value unrecoverable (crypto-shredding), whatever copies of
its ciphertext remain."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12  # GCM's standard nonce; random nonces are safe here because each data key seals one value
DATA_KEY_BITS = 256


class EnvelopeError(ValueError):
    """The envelope cannot be opened: wrong master key, wrong context, or tampered bytes."""


@dataclass(frozen=True)
class Envelope:
    ciphertext: bytes
    nonce: bytes
    wrapped_key: bytes  # the wrapping nonce followed by the data key encrypted under the master key


def seal(plaintext: bytes, master_key: bytes, context: bytes) -> Envelope:
    """Encrypt under a fresh data key; `context` (e.g. the owning row's id) is authenticated, so an envelope moved
    to another row does not open."""
    data_key = AESGCM.generate_key(bit_length=DATA_KEY_BITS)
    nonce, wrap_nonce = secrets.token_bytes(NONCE_BYTES), secrets.token_bytes(NONCE_BYTES)
    return Envelope(
        ciphertext=AESGCM(data_key).encrypt(nonce, plaintext, context),
        nonce=nonce,
        wrapped_key=wrap_nonce + AESGCM(master_key).encrypt(wrap_nonce, data_key, context),
    )


def open_envelope(envelope: Envelope, master_key: bytes, context: bytes) -> bytes:
    wrap_nonce, wrapped = envelope.wrapped_key[:NONCE_BYTES], envelope.wrapped_key[NONCE_BYTES:]
    try:
        data_key = AESGCM(master_key).decrypt(wrap_nonce, wrapped, context)
        return AESGCM(data_key).decrypt(envelope.nonce, envelope.ciphertext, context)
    except InvalidTag:
        raise EnvelopeError("the envelope does not open with this key and context") from None
