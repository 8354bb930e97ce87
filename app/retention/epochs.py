"""Advancing the key epoch, so that no copy of the database taken before a shred can be decrypted after it.

Shredding deletes a request's wrapped data key from the live database, but copies (an SQLite file or WAL, PostgreSQL's
dead tuples and WAL, backups) still hold it, wrapped by an epoch key the service still has. Advancing creates a new
epoch key, re-wraps every live request's data key under it, and destroys every older epoch key: the copies' wrapped
keys then unwrap under no key in existence. Live requests keep working; shredded ones are gone from every copy.
"""

from __future__ import annotations

import logging

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import erase_freed_pages, lock_for_write
from app.core.key_store import LEGACY_EPOCH, key_store, legacy_master_key
from app.forget_requests.items import rewrap_items
from app.forget_requests.models import ForgetRequest

log = logging.getLogger(__name__)

REWRAP_BATCH = 500  # requests re-wrapped per transaction


def _rewrap_older(session: Session, settings: Settings, epoch: int) -> int:
    """Re-wrap up to a batch of requests still under an epoch older than `epoch`, rows locked so that a concurrent
    shred cannot be undone by writing a wrapped key back; returns how many."""
    lock_for_write(session)
    requests = session.scalars(
        select(ForgetRequest)
        .where(ForgetRequest.wrapped_key.is_not(None), ForgetRequest.key_epoch < epoch)
        .limit(REWRAP_BATCH)
        .with_for_update(of=ForgetRequest)  # not the eagerly joined model
    ).all()
    for request in requests:
        rewrap_items(request, settings)
    return len(requests)


def _lock_requests(session: Session) -> None:
    """Block every write to forget_requests until commit: a submission reads the current epoch again once its row
    is written (and seals anew if it moved), so once this holds, every row under an old epoch is visible here."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("LOCK TABLE forget_requests IN SHARE ROW EXCLUSIVE MODE"))
    else:
        lock_for_write(session)


def keys_awaiting_destruction(settings: Settings) -> bool:
    """Whether an older epoch key (or the legacy master key) still exists: an advance was cut short, or the service
    was upgraded from before key epochs."""
    return len(key_store(settings).epochs()) > 1 or legacy_master_key(settings) is not None


def advance_key_epoch(session: Session, settings: Settings) -> int:
    """Create the next epoch, re-wrap every live data key under it, destroy the older epoch keys; returns the new
    epoch. Commits as it goes."""
    keys = key_store(settings)
    epoch = keys.advance()
    while True:
        while _rewrap_older(session, settings, epoch):
            session.commit()
        _lock_requests(session)
        if not _rewrap_older(session, settings, epoch):
            break  # still locked: nothing under an old epoch can appear before the keys are gone
        session.commit()  # stragglers sealed just before the advance: re-wrapped, so lock and check again
    for old in keys.epochs():
        if old < epoch:
            keys.destroy(old)
    if legacy_master_key(settings) is not None:
        keys.destroy(LEGACY_EPOCH)
    session.commit()
    erase_freed_pages(session)
    log.info("advanced the key epoch to %s", epoch)
    return epoch
