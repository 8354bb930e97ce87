"""Key custody for items at rest: the epoch keys that wrap each request's data key, kept outside the database.

Data keys are wrapped by the current epoch's key. Advancing the epoch creates a new key, re-wraps every live data key
under it and destroys the old keys, so that a database copy or backup taken before a shred holds data keys no key
in existence can unwrap any more (app/retention/epochs.py). Two stores:

- local (the default): one 32-byte file per epoch in `key_store_dir` (default `data_dir/keys`, mode 0700), outside
  the database and its backups; a destroyed key's file is overwritten before it is removed.
- kms: one AWS KMS key per epoch, named by the alias `alias/<kms_alias_prefix>-epoch-<n>`; data keys are wrapped and
  unwrapped by KMS (the key material never leaves it); destroying an epoch deletes its alias, disables the key (KMS
  then refuses to decrypt with it) and schedules its deletion.

Epoch 0 is the legacy master key (`master_key`, `master_key_file` or `data_dir/keys/master.key`) that wrapped data
keys before epochs existed: it only unwraps, and the first epoch advance re-wraps its data keys and destroys it.
"""

from __future__ import annotations

import logging
import re
import secrets
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path

import boto3
from botocore.exceptions import BotoCoreError, ClientError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.core.config import Settings
from app.core.key_files import base64_key, configured, create_once, destroy_file, private_folder

log = logging.getLogger(__name__)

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
LEGACY_EPOCH = 0
LEGACY_MASTER_KEY_FILE = "master.key"


class KeyUnavailable(ValueError):
    """The data key cannot be unwrapped: its epoch's key was destroyed, or the wrapped key or context is wrong."""


def aes_wrap(key: bytes, data_key: bytes, context: bytes) -> bytes:
    """The wrapping nonce followed by the data key encrypted under `key` (AES-256-GCM, `context` authenticated)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, data_key, context)


def aes_unwrap(key: bytes, wrapped: bytes, context: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], context)
    except InvalidTag:
        raise KeyUnavailable("the data key does not unwrap with this key and context") from None


def _legacy_key_file(settings: Settings) -> Path:
    return settings.keys_dir / LEGACY_MASTER_KEY_FILE


def legacy_master_key(settings: Settings) -> bytes | None:
    """The pre-epoch master key if one is configured or was generated; never generated now."""
    raw = configured(settings.master_key, settings.master_key_file)
    if raw is None and _legacy_key_file(settings).is_file():
        raw = _legacy_key_file(settings).read_bytes()
    return None if raw is None else base64_key(raw, "master key", KEY_BYTES)


class KeyStore(ABC):
    """Epoch keys: wrap under the newest, unwrap under any that still exists, destroy old ones."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abstractmethod
    def epochs(self) -> list[int]:
        """The epochs (1, 2, ...) whose keys exist, in order."""

    @abstractmethod
    def create_epoch(self, epoch: int) -> None:
        """Create the key of `epoch`; if another process created it first, keep theirs."""

    @abstractmethod
    def _wrap(self, epoch: int, data_key: bytes, context: bytes) -> bytes: ...

    @abstractmethod
    def _unwrap(self, epoch: int, wrapped: bytes, context: bytes) -> bytes: ...

    @abstractmethod
    def _destroy(self, epoch: int) -> None: ...

    def current_epoch(self) -> int:
        """The newest epoch, created (epoch 1) on first use."""
        epochs = self.epochs()
        if not epochs:
            self.create_epoch(1)
            epochs = self.epochs()
        return epochs[-1]

    def advance(self) -> int:
        """Create the next epoch, which new wraps use from now on."""
        epoch = self.current_epoch() + 1
        self.create_epoch(epoch)
        return epoch

    def wrap(self, data_key: bytes, context: bytes) -> tuple[int, bytes]:
        epoch = self.current_epoch()
        return epoch, self._wrap(epoch, data_key, context)

    def unwrap(self, epoch: int, wrapped: bytes, context: bytes) -> bytes:
        if epoch == LEGACY_EPOCH:
            legacy = legacy_master_key(self.settings)
            if legacy is None:
                raise KeyUnavailable("the legacy master key was destroyed")
            return aes_unwrap(legacy, wrapped, context)
        return self._unwrap(epoch, wrapped, context)

    def destroy(self, epoch: int) -> None:
        """Destroy the key of `epoch`: nothing wrapped under it opens again."""
        if epoch != LEGACY_EPOCH:
            self._destroy(epoch)
        elif self.settings.master_key is not None or self.settings.master_key_file is not None:
            log.warning("the legacy master key is configured, so it cannot be destroyed here: remove it yourself")
        else:
            destroy_file(_legacy_key_file(self.settings))
        log.info("destroyed the key of epoch %s", epoch)


class LocalKeyStore(KeyStore):
    """One file of 32 random bytes per epoch, `epoch-<n>.key`, in an owner-only folder."""

    FILE = re.compile(r"epoch-(\d+)\.key")

    @property
    def folder(self) -> Path:
        return self.settings.key_store_dir or self.settings.keys_dir

    def _file(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch}.key"

    def epochs(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        private_folder(self.folder)
        return sorted(int(m[1]) for p in self.folder.iterdir() if (m := self.FILE.fullmatch(p.name)))

    def create_epoch(self, epoch: int) -> None:
        create_once(self._file(epoch), secrets.token_bytes(KEY_BYTES))

    def _key(self, epoch: int) -> bytes:
        try:
            return self._file(epoch).read_bytes()
        except FileNotFoundError:
            raise KeyUnavailable(f"the key of epoch {epoch} was destroyed") from None

    def _wrap(self, epoch: int, data_key: bytes, context: bytes) -> bytes:
        return aes_wrap(self._key(epoch), data_key, context)

    def _unwrap(self, epoch: int, wrapped: bytes, context: bytes) -> bytes:
        return aes_unwrap(self._key(epoch), wrapped, context)

    def _destroy(self, epoch: int) -> None:
        destroy_file(self._file(epoch))


@lru_cache
def _kms_client(endpoint_url: str | None, region: str, access_key_id: str | None, secret_access_key: str | None):
    return boto3.client(
        "kms",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
    )


class KmsKeyStore(KeyStore):
    """One AWS KMS symmetric key per epoch, found by its alias; KMS wraps and unwraps, with the context bound."""

    @property
    def client(self):
        s = self.settings
        secret = s.kms_secret_access_key.get_secret_value() if s.kms_secret_access_key else None
        return _kms_client(s.kms_endpoint_url, s.kms_region, s.kms_access_key_id, secret)

    def _alias(self, epoch: int) -> str:
        return f"alias/{self.settings.kms_alias_prefix}-epoch-{epoch}"

    def epochs(self) -> list[int]:
        pattern = re.compile(rf"alias/{re.escape(self.settings.kms_alias_prefix)}-epoch-(\d+)")
        found = []
        for page in self.client.get_paginator("list_aliases").paginate():
            found += [int(m[1]) for alias in page["Aliases"] if (m := pattern.fullmatch(alias["AliasName"]))]
        return sorted(found)

    def create_epoch(self, epoch: int) -> None:
        created = self.client.create_key(Description=f"unlearnd data-key wrapping: {self._alias(epoch)}")
        key_id = created["KeyMetadata"]["KeyId"]
        try:
            self.client.create_alias(AliasName=self._alias(epoch), TargetKeyId=key_id)
        except self.client.exceptions.AlreadyExistsException:
            self._retire(key_id)  # another process created this epoch first: theirs stands

    def _context(self, context: bytes) -> dict[str, str]:
        return {"unlearnd-request": context.hex()}

    def _wrap(self, epoch: int, data_key: bytes, context: bytes) -> bytes:
        answer = self.client.encrypt(
            KeyId=self._alias(epoch), Plaintext=data_key, EncryptionContext=self._context(context)
        )
        return answer["CiphertextBlob"]

    def _unwrap(self, epoch: int, wrapped: bytes, context: bytes) -> bytes:
        try:
            answer = self.client.decrypt(
                KeyId=self._alias(epoch), CiphertextBlob=wrapped, EncryptionContext=self._context(context)
            )
        except (ClientError, BotoCoreError) as error:
            raise KeyUnavailable(f"KMS does not unwrap this data key under epoch {epoch}: {error}") from None
        return answer["Plaintext"]

    def _retire(self, key_id: str) -> None:
        self.client.disable_key(KeyId=key_id)  # effective at once; the deletion itself waits out a window
        self.client.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=self.settings.kms_deletion_window_days)

    def _destroy(self, epoch: int) -> None:
        try:
            key_id = self.client.describe_key(KeyId=self._alias(epoch))["KeyMetadata"]["KeyId"]
        except self.client.exceptions.NotFoundException:
            return
        self.client.delete_alias(AliasName=self._alias(epoch))
        self._retire(key_id)


def key_store(settings: Settings) -> KeyStore:
    return KmsKeyStore(settings) if settings.key_store == "kms" else LocalKeyStore(settings)
