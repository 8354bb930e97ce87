"""Signing and verifying forget certificates: Ed25519 over the payload's canonical JSON, checkable offline."""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from app.core.canonical import canonical_json, finite
from app.core.certificate_key import key_id

ALGORITHM = "Ed25519"


class InvalidCertificate(ValueError):
    """The document is not a certificate signed by the given key, or its payload was changed after signing."""


def sign(payload: dict, key: Ed25519PrivateKey) -> dict:
    """The served document: the payload (non-finite numbers as null, as JSON serves them), and next to it the
    signature over its canonical JSON and the key's id."""
    payload = finite(payload)
    signature = key.sign(canonical_json(payload))
    return {
        "payload": payload,
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(signature).decode(),
    }


def verify(document: dict, public_key: Ed25519PublicKey) -> dict:
    """The payload of a genuine certificate; InvalidCertificate otherwise."""
    if not isinstance(document, dict) or not {"payload", "algorithm", "key_id", "signature"} <= set(document):
        raise InvalidCertificate("not a certificate: it needs payload, algorithm, key_id and signature")
    if document["algorithm"] != ALGORITHM:
        raise InvalidCertificate(f"unsupported algorithm {document['algorithm']!r}")
    if document["key_id"] != key_id(public_key):
        raise InvalidCertificate(f"signed by key {document['key_id']}, not by {key_id(public_key)}")
    try:
        public_key.verify(base64.b64decode(document["signature"], validate=True), canonical_json(document["payload"]))
    except (InvalidSignature, binascii.Error, TypeError, ValueError):
        raise InvalidCertificate("the signature does not match the payload") from None
    return document["payload"]
