"""The artifact store: published adapter versions as immutable folders of files plus a verified manifest.

One interface, two backends: the local filesystem (default) and S3-compatible object storage (when `s3_bucket` is
set). Both keep the same layout and promises:

    <model>/<version>/{adapter files..., manifest.json}   a version is visible only once its manifest exists
    <model>/aliases/<alias>.json                           {"version": N, "updated_at": ...}, replaced atomically
    _scratch/<key>                                         job checkpoints, not part of any version

Publishing writes the files first and the manifest last, never overwrites a visible version, and reads the manifest
back and verifies every file before returning, so a crash at any point leaves no half version visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import boto3
from botocore.client import BaseClient
from botocore.exceptions import ClientError

from app.core.config import Settings
from app.core.errors import Conflict, NotFound

MANIFEST = "manifest.json"
SCRATCH = "_scratch/"  # model names start with a letter or digit, so this never clashes with a model
CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class CorruptArtifact(RuntimeError):
    """A published file is missing or does not match the size or sha256 its manifest records."""


def _scratch_key(key: str) -> str:
    """A caller's scratch key must stay inside the scratch area: relative, with no '.' or '..' segments."""
    if key.startswith("/") or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"not a relative scratch key: {key!r}")
    return SCRATCH + key


def _alias_key(model: str, alias: str) -> str:
    if not alias or "/" in alias or alias.startswith("."):
        raise ValueError(f"not an alias name: {alias!r}")
    return f"{model}/aliases/{alias}.json"


class ArtifactStore(ABC):
    """Everything above the storage primitives is shared, so both backends read, verify and download alike.

    Keys are relative '/'-separated paths such as 'demo/3/manifest.json'; a missing object is FileNotFoundError.
    """

    @abstractmethod
    def uri(self, model: str, version: int) -> str: ...

    @abstractmethod
    def quarantine(self, model: str, version: int) -> None:
        """Move aside whatever is stored under `version` (a visible version no database row refers to, or the
        invisible files of a crashed publish), so the version number can be published again."""

    @abstractmethod
    def _write_version(self, model: str, version: int, files: list[Path], manifest: bytes) -> None:
        """Store `files` and then the manifest; raise Conflict if the version is already visible."""

    @abstractmethod
    def _read(self, key: str) -> Iterator[bytes]:
        """Chunks of one object; raises FileNotFoundError before the first chunk if it does not exist."""

    @abstractmethod
    def _write_atomic(self, key: str, data: bytes | Path) -> None:
        """Create or replace one object so that readers see either the old or the new content, never a mix."""

    @abstractmethod
    def _delete_prefix(self, prefix: str) -> None: ...

    def publish(self, model: str, version: int, source: Path, manifest: dict) -> dict:
        """Copy every file of `source` into version `version`; returns the manifest as read back and verified."""
        files = sorted(p for p in source.iterdir() if p.is_file() and p.name != MANIFEST)
        listed = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
        body = json.dumps({**manifest, "files": listed}, indent=2, sort_keys=True).encode()
        self._write_version(model, version, files, body)
        return self.verify(model, version)

    def read_manifest(self, model: str, version: int) -> dict:
        try:
            return json.loads(b"".join(self._read(f"{model}/{version}/{MANIFEST}")))
        except FileNotFoundError:
            raise NotFound(f"{model} version {version} has no manifest") from None

    def verify(self, model: str, version: int) -> dict:
        manifest = self.read_manifest(model, version)
        for name, meta in manifest["files"].items():
            self._fetch(model, version, name, meta)
        return manifest

    def open_file(self, model: str, version: int, name: str) -> Iterator[bytes]:
        manifest = self.read_manifest(model, version)
        if name != MANIFEST and name not in manifest["files"]:
            raise NotFound(f"{model} version {version} has no file '{name}'", {"files": sorted(manifest["files"])})
        try:
            return self._read(f"{model}/{version}/{name}")
        except FileNotFoundError:
            raise CorruptArtifact(f"{model} version {version}: {name} is missing") from None

    def download(self, model: str, version: int, dest_dir: Path) -> Path:
        """Fetch every file of a version and its manifest into `dest_dir`, each verified against the manifest."""
        manifest = self.read_manifest(model, version)
        dest_dir.mkdir(parents=True, exist_ok=True)
        for name, meta in manifest["files"].items():
            partial = dest_dir / f".{name}.part"  # a file that fails verification never appears under its name
            try:
                with partial.open("wb") as sink:
                    self._fetch(model, version, name, meta, sink)
                os.replace(partial, dest_dir / name)
            finally:
                partial.unlink(missing_ok=True)
        (dest_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return dest_dir

    def set_alias(self, model: str, alias: str, version: int) -> None:
        """Point `alias` at a visible version; the caller moves it only after the version's row is committed."""
        self.read_manifest(model, version)
        pointer = {"version": version, "updated_at": datetime.now(UTC).isoformat()}
        self._write_atomic(_alias_key(model, alias), json.dumps(pointer).encode())

    def get_alias(self, model: str, alias: str) -> int | None:
        try:
            pointer = json.loads(b"".join(self._read(_alias_key(model, alias))))
        except FileNotFoundError:
            return None
        return int(pointer["version"])

    def scratch_put(self, key: str, source: Path) -> None:
        """Store one file (a job checkpoint) under `key`, replacing any earlier one atomically."""
        self._write_atomic(_scratch_key(key), source)

    def scratch_get(self, key: str, dest: Path) -> bool:
        """Copy the file stored under `key` to `dest`; False if there is none."""
        try:
            chunks = self._read(_scratch_key(key))
        except FileNotFoundError:
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        with dest.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
        return True

    def scratch_delete(self, prefix: str) -> None:
        """Delete every scratch file whose key starts with `prefix` (e.g. 'job-42/')."""
        self._delete_prefix(_scratch_key(prefix))

    def _fetch(self, model: str, version: int, name: str, meta: dict, sink: BinaryIO | None = None) -> None:
        """Stream one listed file (into `sink` when given); CorruptArtifact unless it matches its manifest entry."""
        digest, size = hashlib.sha256(), 0
        try:
            for chunk in self._read(f"{model}/{version}/{name}"):
                digest.update(chunk)
                size += len(chunk)
                if sink is not None:
                    sink.write(chunk)
        except FileNotFoundError:
            raise CorruptArtifact(f"{model} version {version}: {name} is missing") from None
        if size != meta["size"] or digest.hexdigest() != meta["sha256"]:
            raise CorruptArtifact(f"{model} version {version}: {name} does not match its manifest")


class LocalArtifactStore(ArtifactStore):
    """Versions live at <root>/<model>/<version>/. Files and the manifest are written to a staging folder, which is
    renamed into place only once complete, so the version appears whole or not at all."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        # Owner-only, so nothing below it (adapters, checkpoints) is readable by other users; group access stays.
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if (mode := stat.S_IMODE(self.root.stat().st_mode)) & 0o007:
            self.root.chmod(mode & 0o770)

    def uri(self, model: str, version: int) -> str:
        return (self.root / model / str(version)).as_uri()

    def quarantine(self, model: str, version: int) -> None:
        final = self.root / model / str(version)
        if final.exists():
            os.rename(final, self.root / model / f".orphan-{version}-{uuid.uuid4().hex}")

    def _write_version(self, model: str, version: int, files: list[Path], manifest: bytes) -> None:
        final = self.root / model / str(version)
        if final.exists():
            raise Conflict(f"{model} version {version} is already published")
        staging = self.root / model / f".staging-{version}-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            for path in files:
                shutil.copyfile(path, staging / path.name)
            self._put_manifest(staging, manifest)
            for path in staging.iterdir():
                with path.open("rb") as f:
                    os.fsync(f.fileno())
            try:
                os.rename(staging, final)  # atomic; fails if another publisher took the version meanwhile
            except OSError as error:
                if final.exists():
                    raise Conflict(f"{model} version {version} is already published") from error
                raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _put_manifest(self, folder: Path, manifest: bytes) -> None:
        (folder / MANIFEST).write_bytes(manifest)

    def _read(self, key: str) -> Iterator[bytes]:
        path = self.root / key
        if not path.is_file():
            raise FileNotFoundError(key)

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk

        return chunks()

    def _write_atomic(self, key: str, data: bytes | Path) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            if isinstance(data, Path):
                shutil.copyfile(data, temporary)
            else:
                temporary.write_bytes(data)
            with temporary.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    def _delete_prefix(self, prefix: str) -> None:
        base = self.root / prefix.rpartition("/")[0]  # the deepest folder the prefix names in full
        if not base.is_dir():
            return
        for path in sorted([base, *base.rglob("*")], reverse=True):  # a folder's contents sort after it: go first
            if path.is_dir():
                if f"{path.relative_to(self.root).as_posix()}/".startswith(prefix) and not any(path.iterdir()):
                    path.rmdir()
            elif path.relative_to(self.root).as_posix().startswith(prefix):
                path.unlink()


class S3ArtifactStore(ArtifactStore):
    """Versions live at s3://<bucket>/<prefix><model>/<version>/. Objects cannot be renamed, so visibility hangs on
    the manifest alone: it is put last, and only if absent (`If-None-Match: *`). Files without a manifest are the
    invisible leftovers of a crashed publish; the next publish of that number deletes them and starts over.

    A publisher checks for the manifest before uploading files, so two publishers racing for one number could
    interleave their file uploads; the conditional manifest put lets only one of them win, the winner's read-back
    verification catches mixed files, and the database's unique (model, version) constraint admits one row."""

    def __init__(self, client: BaseClient, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""

    def uri(self, model: str, version: int) -> str:
        return f"s3://{self.bucket}/{self.prefix}{model}/{version}/"

    def quarantine(self, model: str, version: int) -> None:
        folder = f"{self.prefix}{model}/{version}/"
        keys = self._list(folder)
        if not keys:
            return
        orphan = f"{self.prefix}{model}/.orphan-{version}-{uuid.uuid4().hex}/"
        for key in keys:
            self.client.copy({"Bucket": self.bucket, "Key": key}, self.bucket, orphan + key.removeprefix(folder))
        if folder + MANIFEST in keys:
            self.client.delete_object(Bucket=self.bucket, Key=folder + MANIFEST)  # invisible from here on
        self._delete(keys)

    def _write_version(self, model: str, version: int, files: list[Path], manifest: bytes) -> None:
        folder = f"{self.prefix}{model}/{version}/"
        leftovers = self._list(folder)
        if folder + MANIFEST in leftovers:
            raise Conflict(f"{model} version {version} is already published")
        self._delete(leftovers)
        for path in files:
            self.client.upload_file(str(path), self.bucket, folder + path.name)
        self._put_manifest(folder, manifest)

    def _put_manifest(self, folder: str, manifest: bytes) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=folder + MANIFEST,
                Body=manifest,
                ContentType="application/json",
                IfNoneMatch="*",
            )
        except ClientError as error:
            if error.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise Conflict(f"{folder.removeprefix(self.prefix)} is already published") from error
            raise

    def _read(self, key: str) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
        except ClientError as error:
            if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise FileNotFoundError(key) from error
            raise

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return chunks()

    def _write_atomic(self, key: str, data: bytes | Path) -> None:
        if isinstance(data, Path):
            self.client.upload_file(str(data), self.bucket, self.prefix + key)
        else:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def _delete_prefix(self, prefix: str) -> None:
        self._delete(self._list(self.prefix + prefix))

    def _list(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


def artifact_store(settings: Settings) -> ArtifactStore:
    if not settings.s3_bucket:
        return LocalArtifactStore(settings.artifact_dir)
    client = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=settings.s3_secret_access_key,
    )
    return S3ArtifactStore(client, settings.s3_bucket, settings.s3_prefix)
