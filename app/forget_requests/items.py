"""A request's items at rest: sealed under a data key of the request's own (envelope encryption), with only their
sha256s in clear. Shredding destroys the data key: the texts are gone, the hashes and metrics remain."""

from __future__ import annotations

import hashlib
import json

from app.core.canonical import canonical_json
from app.core.config import Settings
from app.core.db import utcnow
from app.core.envelope import Envelope, open_envelope, seal
from app.core.errors import Conflict
from app.core.keys import master_key
from app.forget_requests.models import ForgetRequest


class ItemsShredded(Conflict):
    """The request's data key was destroyed: its items can no longer be read."""


def item_sha256(item: dict) -> str:
    """sha256 of the item's canonical JSON (its fields as submitted, without empty ones)."""
    return hashlib.sha256(canonical_json(item)).hexdigest()


def seal_items(request: ForgetRequest, items: list[dict], settings: Settings) -> None:
    """Encrypt `items` into the request (whose id must be set: it binds the ciphertext to this row)."""
    envelope = seal(canonical_json(items), master_key(settings), request.id.bytes)
    request.items_ciphertext, request.items_nonce = envelope.ciphertext, envelope.nonce
    request.wrapped_key = envelope.wrapped_key
    request.item_sha256s = [item_sha256(item) for item in items]


def open_items(request: ForgetRequest, settings: Settings) -> list[dict]:
    """The request's items in clear; only the worker needs them, to train and verify."""
    if request.shredded_at is not None or request.wrapped_key is None:
        raise ItemsShredded(f"the items of request {request.id} were shredded", {"request_id": str(request.id)})
    envelope = Envelope(request.items_ciphertext, request.items_nonce, request.wrapped_key)
    return json.loads(open_envelope(envelope, master_key(settings), request.id.bytes))


def shred_items(request: ForgetRequest) -> None:
    """Crypto-shredding: without the wrapped data key no copy of the ciphertext can be opened again."""
    request.items_ciphertext = request.items_nonce = request.wrapped_key = None
    request.shredded_at = utcnow()
