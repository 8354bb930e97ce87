"""The artifact store: published adapter versions as immutable folders of files plus a verified manifest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from app.core.config import Settings
from app.core.errors import Conflict, NotFound

MANIFEST = "manifest.json"
CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class CorruptArtifact(RuntimeError):
    """A published file does not match the size or sha256 its manifest records."""


class LocalArtifactStore:
    """Versions live at <root>/<model>/<version>/. Publishing never overwrites and is atomic: files and the
    manifest are written to a staging folder, which is renamed into place only once complete."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def uri(self, model: str, version: int) -> str:
        return (self.root / model / str(version)).as_uri()

    def publish(self, model: str, version: int, source: Path, manifest: dict) -> dict:
        """Copy every file of `source` into version `version`; returns the manifest as read back and verified."""
        final = self.root / model / str(version)
        if final.exists():
            raise Conflict(f"{model} version {version} is already published")
        staging = self.root / model / f".staging-{version}-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            files = {}
            for path in sorted(p for p in source.iterdir() if p.is_file() and p.name != MANIFEST):
                shutil.copyfile(path, staging / path.name)
                files[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(staging / path.name)}
            (staging / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2, sort_keys=True))
            for path in staging.iterdir():
                with path.open("rb") as f:
                    os.fsync(f.fileno())
            os.rename(staging, final)  # atomic; fails if another publisher took the version
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.verify(model, version)

    def quarantine(self, model: str, version: int) -> None:
        """Move aside a version folder that no database row refers to (left by a publish that crashed before
        its row was committed), so the version number can be published again."""
        final = self.root / model / str(version)
        if final.exists():
            os.rename(final, self.root / model / f".orphan-{version}-{uuid.uuid4().hex}")

    def read_manifest(self, model: str, version: int) -> dict:
        path = self.root / model / str(version) / MANIFEST
        if not path.is_file():
            raise NotFound(f"{model} version {version} has no manifest")
        return json.loads(path.read_text())

    def verify(self, model: str, version: int) -> dict:
        manifest = self.read_manifest(model, version)
        folder = self.root / model / str(version)
        for name, meta in manifest["files"].items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != meta["size"] or file_sha256(path) != meta["sha256"]:
                raise CorruptArtifact(f"{model} version {version}: {name} does not match its manifest")
        return manifest

    def open_file(self, model: str, version: int, name: str) -> Iterator[bytes]:
        manifest = self.read_manifest(model, version)
        if name != MANIFEST and name not in manifest["files"]:
            raise NotFound(f"{model} version {version} has no file '{name}'", {"files": sorted(manifest["files"])})
        path = self.root / model / str(version) / name

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk

        return chunks()


def artifact_store(settings: Settings) -> LocalArtifactStore:
    return LocalArtifactStore(settings.artifact_dir)
