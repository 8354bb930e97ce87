"""The item digest key: the HMAC key of the digests that identify a request's items after their texts are shredded.

A plain hash of an item would let anyone holding the database confirm a guessed record (a phone number is quickly
guessed); a keyed digest confirms nothing without this key. The data controller holds it, to match a certificate's
digests to its own records: HMAC-SHA256(key, sha256(the item's canonical JSON)). It comes from the settings (a value
or a file); unset, it is generated once under `data_dir/keys` (mode 0600).
"""

from __future__ import annotations

import base64
import secrets

from app.core.config import Settings
from app.core.key_files import base64_key, configured, generated_once

DIGEST_KEY_FILE = "item-digest.key"
DIGEST_KEY_BYTES = 32


def item_digest_key(settings: Settings) -> bytes:
    raw = configured(settings.item_digest_key, settings.item_digest_key_file)
    if raw is None:
        raw = generated_once(
            settings.keys_dir / DIGEST_KEY_FILE, lambda: base64.b64encode(secrets.token_bytes(DIGEST_KEY_BYTES))
        )
    return base64_key(raw, "item digest key", DIGEST_KEY_BYTES)
