"""One attempt at POSTing a status change: claim the row, re-check the target, sign the body, record the outcome."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.callbacks.models import CallbackDelivery
from app.callbacks.secrets import signing_secrets
from app.callbacks.targets import check_callback_url
from app.core.config import Settings
from app.core.db import session_scope, utcnow
from app.core.errors import InvalidInput

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Unlearnd-Signature"


def sign(secrets: list[str], timestamp: int, url: str, body: bytes) -> str:
    """`t=<unix time>,v2=<hex HMAC-SHA256 of "<t>.<url>.<body>">`, one v2 per signing secret of the tenant (two
    while a rotated one is in its grace); receivers recompute it with their URL and refuse old timestamps. The URL
    is signed, so a body signed for one receiver is refused by another."""
    signed = f"{timestamp}.{url}.".encode() + body
    digests = [hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest() for secret in secrets]
    return ",".join([f"t={timestamp}", *(f"v2={digest}" for digest in digests)])


def payload(delivery: CallbackDelivery) -> bytes:
    # Ids and the status only: never the items' texts.
    return json.dumps(
        {
            "id": delivery.id,
            "request_id": str(delivery.request_id),
            "subject_request_id": delivery.request.subject_request_id,
            "status": delivery.status,
            "timestamp": delivery.occurred_at.isoformat(),
        },
        separators=(",", ":"),
    ).encode()


def backoff(attempts: int, settings: Settings) -> float:
    return min(settings.callback_retry_max_seconds, settings.callback_retry_base_seconds * 2 ** (attempts - 1))


def claim(session: Session, delivery_id: int, settings: Settings) -> bool:
    """Take the row for one attempt if it is due, pushing its next attempt past this one's longest duration, so a
    duplicate message (sweep, redelivery) finds it not due and sends nothing."""
    now = utcnow()
    lease = now + timedelta(seconds=3 * settings.callback_timeout_seconds)
    claimed = session.execute(
        update(CallbackDelivery)
        .where(
            CallbackDelivery.id == delivery_id,
            CallbackDelivery.delivered_at.is_(None),
            CallbackDelivery.next_attempt_at <= now,
        )
        .values(next_attempt_at=lease, attempts=CallbackDelivery.attempts + 1)
    )
    return claimed.rowcount == 1


def post(url: str, body: bytes, secrets: list[str], settings: Settings) -> str | None:
    """POST the signed body to the checked address of the URL's host; None when the receiver answered 2xx, else
    why not."""
    if not secrets:
        return "refused: the request's tenant has no callback secret"
    try:
        target = check_callback_url(url, settings)
    except InvalidInput as exc:
        return f"refused: {exc.message}"
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "unlearnd-callbacks",
        "Host": urlsplit(url).netloc,
        SIGNATURE_HEADER: sign(secrets, int(time.time()), url, body),
    }
    pinned = httpx.URL(url).copy_with(host=str(target.address))
    try:
        # trust_env=False: a proxy from the environment would connect to the host name, not the checked address.
        with httpx.Client(timeout=settings.callback_timeout_seconds, follow_redirects=False, trust_env=False) as client:
            response = client.post(pinned, content=body, headers=headers, extensions={"sni_hostname": target.host})
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:500]
    return None if response.is_success else f"HTTP {response.status_code}"


def deliver(delivery_id: int, settings: Settings) -> float | None:
    """One attempt; returns the seconds until the next one, or None when delivered, given up or not due."""
    with session_scope() as session:
        claimed = claim(session, delivery_id, settings)
        session.commit()  # the claim must hold before the POST goes out
        if not claimed:
            return None
        delivery = session.get(CallbackDelivery, delivery_id)
        url, body = delivery.url, payload(delivery)
        secrets = signing_secrets(session, delivery.request.tenant, settings)
    error = post(url, body, secrets, settings)
    with session_scope() as session:
        delivery = session.get(CallbackDelivery, delivery_id)
        delay = None
        if error is None:
            delivery.delivered_at = utcnow()
            delivery.next_attempt_at = None
        elif delivery.attempts >= settings.callback_max_attempts:
            delivery.next_attempt_at = None
            log.warning("callback delivery %s gave up after %s attempts: %s", delivery_id, delivery.attempts, error)
        else:
            delay = backoff(delivery.attempts, settings)
            delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
        delivery.last_error = error
        session.commit()
        return delay
