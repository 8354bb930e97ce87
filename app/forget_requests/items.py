"""A request's items at rest: sealed under a data key of the request's own (envelope encryption), wrapped by an
epoch key of the key store, with only their keyed digests in clear (stored in `item_sha256s`). Shredding destroys the
data key: the texts are gone, the digests and metrics remain."""

from __future__ import annotations

import hashlib
import hmac
import json

from app.core.canonical import canonical_json
from app.core.config import Settings
from app.core.db import utcnow
from app.core.digest_key import item_digest_key
from app.core.envelope import Envelope, open_envelope, rewrap, seal
from app.core.errors import Conflict
from app.core.key_store import key_store
from app.forget_requests.models import ForgetRequest


class ItemsShredded(Conflict):
    """The request's data key was destroyed: its items can no longer be read."""


def item_sha256(item: dict) -> bytes:
    """sha256 of the item's canonical JSON (its fields as submitted, without empty ones)."""
    return hashlib.sha256(canonical_json(item)).digest()


def item_digest(item: dict, settings: Settings) -> str:
    """HMAC-SHA256 of the item's sha256 under the item digest key: without the key it confirms no guessed text."""
    return hmac.new(item_digest_key(settings), item_sha256(item), hashlib.sha256).hexdigest()


def seal_items(request: ForgetRequest, items: list[dict], settings: Settings) -> None:
    """Encrypt `items` into the request under the current key epoch; the id binds the ciphertext to the row. A new
    row is sealed before it is written, in the same INSERT, then checked by reseal_if_epoch_moved()."""
    _store(request, seal(canonical_json(items), key_store(settings), request.id.bytes))


def reseal_if_epoch_moved(request: ForgetRequest, items: list[dict], settings: Settings) -> None:
    """Once the new request's row is written, and so locked until commit: seal it again if the key epoch advanced
    since it was sealed. An advance that began earlier may have re-wrapped every row and destroyed the old keys
    before this row existed; one that begins later waits for this transaction, then re-wraps the row itself
    (app/retention/epochs.py)."""
    if key_store(settings).current_epoch() != request.key_epoch:
        seal_items(request, items, settings)


def open_items(request: ForgetRequest, settings: Settings) -> list[dict]:
    """The request's items in clear; only the worker needs them, to train and verify."""
    if request.shredded_at is not None or request.wrapped_key is None:
        raise ItemsShredded(f"the items of request {request.id} were shredded", {"request_id": str(request.id)})
    return json.loads(open_envelope(_envelope(request), key_store(settings), request.id.bytes))


def rewrap_items(request: ForgetRequest, settings: Settings) -> None:
    """Wrap the request's data key under the key store's current epoch (the ciphertext stays as it is)."""
    _store(request, rewrap(_envelope(request), key_store(settings), request.id.bytes))


def _envelope(request: ForgetRequest) -> Envelope:
    return Envelope(request.items_ciphertext, request.items_nonce, request.wrapped_key, request.key_epoch)


def _store(request: ForgetRequest, envelope: Envelope) -> None:
    request.items_ciphertext, request.items_nonce = envelope.ciphertext, envelope.nonce
    request.wrapped_key, request.key_epoch = envelope.wrapped_key, envelope.key_epoch


def shred_items(request: ForgetRequest) -> None:
    """Crypto-shredding: without the wrapped data key no copy of the ciphertext can be opened again."""
    request.items_ciphertext = request.items_nonce = request.wrapped_key = None
    request.shredded_at = utcnow()
