"""Envelope encryption with AES-256-GCM: each sealed value has a data key of its own, stored only wrapped by the key
store's current epoch key. Destroying the wrapped data key, or every epoch key that could unwrap it, makes the value
unrecoverable (crypto-shredding), whatever copies of its ciphertext remain."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.core.key_store import KeyStore, KeyUnavailable

NONCE_BYTES = 12  # GCM's standard nonce; random nonces are safe here because each data key seals one value
DATA_KEY_BITS = 256


class EnvelopeError(ValueError):
    """The envelope cannot be opened: its epoch key is gone, the context is wrong, or the bytes were tampered with."""


@dataclass(frozen=True)
class Envelope:
    ciphertext: bytes
    nonce: bytes
    wrapped_key: bytes  # the data key wrapped by the key of `key_epoch` in the key store
    key_epoch: int


def seal(plaintext: bytes, keys: KeyStore, context: bytes) -> Envelope:
    """Encrypt under a fresh data key; `context` (e.g. the owning row's id) is authenticated, so an envelope moved
    to another row does not open."""
    data_key = AESGCM.generate_key(bit_length=DATA_KEY_BITS)
    nonce = secrets.token_bytes(NONCE_BYTES)
    epoch, wrapped = keys.wrap(data_key, context)
    return Envelope(AESGCM(data_key).encrypt(nonce, plaintext, context), nonce, wrapped, epoch)


def _data_key(envelope: Envelope, keys: KeyStore, context: bytes) -> bytes:
    try:
        return keys.unwrap(envelope.key_epoch, envelope.wrapped_key, context)
    except KeyUnavailable as error:
        raise EnvelopeError(str(error)) from None


def open_envelope(envelope: Envelope, keys: KeyStore, context: bytes) -> bytes:
    try:
        return AESGCM(_data_key(envelope, keys, context)).decrypt(envelope.nonce, envelope.ciphertext, context)
    except InvalidTag:
        raise EnvelopeError("the envelope does not open with this key and context") from None


def rewrap(envelope: Envelope, keys: KeyStore, context: bytes) -> Envelope:
    """The same ciphertext with its data key wrapped under the current epoch."""
    epoch, wrapped = keys.wrap(_data_key(envelope, keys, context), context)
    return Envelope(envelope.ciphertext, envelope.nonce, wrapped, epoch)
