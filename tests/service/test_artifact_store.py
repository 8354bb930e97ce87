"""The artifact store keeps the same promises on the local filesystem and on S3 (moto's standalone server)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from app.adapters.store import (
    MANIFEST,
    ArtifactStore,
    CorruptArtifact,
    LocalArtifactStore,
    S3ArtifactStore,
    artifact_store,
)
from app.core.config import Settings
from app.core.errors import Conflict, NotFound
from tests.service.processes import start_moto, stop

BUCKET = "unlearnd-artifacts"
CREDENTIALS = {"s3_access_key_id": "testing", "s3_secret_access_key": "testing"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-protocol server (moto) on a free local port, with the artifact bucket created."""
    server, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        stop(server, timeout=5)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return artifact_store(Settings(data_dir=tmp_path, s3_bucket=""))
    settings = Settings(
        data_dir=tmp_path,
        s3_bucket=BUCKET,
        s3_prefix=f"test-{uuid.uuid4().hex[:8]}",  # a fresh store per test in the shared bucket
        s3_endpoint_url=request.getfixturevalue("s3_endpoint"),
        **CREDENTIALS,
    )
    return artifact_store(settings)


def adapter_files(folder: Path, seed: str, big: bool = False) -> dict[str, bytes]:
    """Write a version's worth of files; `big` makes one span several read chunks."""
    files = {
        "adapter_config.json": f'{{"r": 8, "seed": "{seed}"}}'.encode(),
        "adapter_model.safetensors": (seed.encode() * 1000) if not big else (seed.encode() * (3 << 20)),
        "fusion_state.safetensors": f"fusion-{seed}".encode(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def read_all(store: ArtifactStore, model: str, version: int, name: str) -> bytes:
    return b"".join(store.open_file(model, version, name))


def crash(*args: object) -> None:
    raise RuntimeError("process killed")


def test_artifact_store_uses_s3_only_when_a_bucket_is_set(tmp_path: Path) -> None:
    assert isinstance(artifact_store(Settings(data_dir=tmp_path, s3_bucket="")), LocalArtifactStore)
    s3 = artifact_store(Settings(data_dir=tmp_path, s3_bucket=BUCKET, s3_prefix="/team/", **CREDENTIALS))
    assert isinstance(s3, S3ArtifactStore)
    assert s3.uri("demo", 3) == f"s3://{BUCKET}/team/demo/3/"


def test_published_version_round_trips_with_its_sha256(store: ArtifactStore, tmp_path: Path) -> None:
    files = adapter_files(tmp_path / "src", "a", big=True)

    published = store.publish("demo", 1, tmp_path / "src", {"parent_version": None, "job_id": 7})

    assert published == store.read_manifest("demo", 1) == store.verify("demo", 1)
    assert published["job_id"] == 7
    assert published["files"] == {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
    }
    for name, data in files.items():
        assert read_all(store, "demo", 1, name) == data
    downloaded = store.download("demo", 1, tmp_path / "dest")
    assert sorted(p.name for p in downloaded.iterdir()) == sorted([*files, MANIFEST])
    for name, data in files.items():
        assert (downloaded / name).read_bytes() == data


def test_publishing_a_visible_version_again_is_a_conflict(store: ArtifactStore, tmp_path: Path) -> None:
    first = adapter_files(tmp_path / "first", "first")
    adapter_files(tmp_path / "second", "second")
    store.publish("demo", 1, tmp_path / "first", {})

    with pytest.raises(Conflict):
        store.publish("demo", 1, tmp_path / "second", {})

    store.verify("demo", 1)
    assert read_all(store, "demo", 1, "adapter_model.safetensors") == first["adapter_model.safetensors"]


def test_crash_between_files_and_manifest_leaves_no_visible_version(
    store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter_files(tmp_path / "crashed", "crashed")
    with monkeypatch.context() as patch:
        patch.setattr(store, "_put_manifest", crash)
        with pytest.raises(RuntimeError, match="process killed"):
            store.publish("demo", 1, tmp_path / "crashed", {})

    with pytest.raises(NotFound):
        store.read_manifest("demo", 1)
    with pytest.raises(NotFound):
        store.open_file("demo", 1, "adapter_model.safetensors")

    files = adapter_files(tmp_path / "retry", "retry")
    store.publish("demo", 1, tmp_path / "retry", {})
    assert read_all(store, "demo", 1, "adapter_model.safetensors") == files["adapter_model.safetensors"]


def test_republishing_after_a_crash_keeps_no_file_of_the_crashed_attempt(
    store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter_files(tmp_path / "crashed", "crashed")
    (tmp_path / "crashed" / "extra.bin").write_bytes(b"only in the crashed attempt")
    with monkeypatch.context() as patch:
        patch.setattr(store, "_put_manifest", crash)
        with pytest.raises(RuntimeError):
            store.publish("demo", 1, tmp_path / "crashed", {})

    adapter_files(tmp_path / "retry", "retry")
    store.publish("demo", 1, tmp_path / "retry", {})

    with pytest.raises(FileNotFoundError):
        store._read("demo/1/extra.bin")


def test_version_without_a_row_is_quarantined_and_published_again(store: ArtifactStore, tmp_path: Path) -> None:
    adapter_files(tmp_path / "orphan", "orphan")
    store.publish("demo", 1, tmp_path / "orphan", {})  # the worker crashed before committing its row

    store.quarantine("demo", 1)

    with pytest.raises(NotFound):
        store.read_manifest("demo", 1)
    files = adapter_files(tmp_path / "again", "again")
    store.publish("demo", 1, tmp_path / "again", {})
    assert store.verify("demo", 1)["files"]["fusion_state.safetensors"]["size"] == len(
        files["fusion_state.safetensors"]
    )
    assert read_all(store, "demo", 1, "adapter_model.safetensors") == files["adapter_model.safetensors"]


def test_quarantining_a_version_that_does_not_exist_does_nothing(store: ArtifactStore) -> None:
    store.quarantine("demo", 5)

    with pytest.raises(NotFound):
        store.read_manifest("demo", 5)


def test_corrupted_file_fails_verification_and_download(store: ArtifactStore, tmp_path: Path) -> None:
    adapter_files(tmp_path / "src", "a")
    store.publish("demo", 1, tmp_path / "src", {})
    store._write_atomic("demo/1/adapter_model.safetensors", b"flipped bits")

    with pytest.raises(CorruptArtifact):
        store.verify("demo", 1)
    with pytest.raises(CorruptArtifact):
        store.download("demo", 1, tmp_path / "dest")
    assert not (tmp_path / "dest" / "adapter_model.safetensors").exists()


def test_unknown_file_or_version_is_not_found(store: ArtifactStore, tmp_path: Path) -> None:
    adapter_files(tmp_path / "src", "a")
    store.publish("demo", 1, tmp_path / "src", {})

    with pytest.raises(NotFound):
        store.open_file("demo", 1, "secrets.txt")
    with pytest.raises(NotFound):
        store.open_file("demo", 2, "adapter_config.json")
    with pytest.raises(NotFound):
        store.download("demo", 2, tmp_path / "dest")
    assert b'"files"' in read_all(store, "demo", 1, MANIFEST)


def test_alias_points_at_a_published_version_and_moves(store: ArtifactStore, tmp_path: Path) -> None:
    adapter_files(tmp_path / "src", "a")
    store.publish("demo", 1, tmp_path / "src", {})
    store.publish("demo", 2, tmp_path / "src", {})
    assert store.get_alias("demo", "current") is None

    store.set_alias("demo", "current", 2)
    assert store.get_alias("demo", "current") == 2
    store.set_alias("demo", "current", 1)  # roll back
    assert store.get_alias("demo", "current") == 1

    with pytest.raises(NotFound):
        store.set_alias("demo", "current", 3)
    assert store.get_alias("demo", "current") == 1
    assert store.get_alias("other", "current") is None


def test_scratch_files_are_stored_fetched_and_deleted_by_prefix(store: ArtifactStore, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint.safetensors"
    checkpoint.write_bytes(b"step 10")
    store.scratch_put("job-1/checkpoint.safetensors", checkpoint)
    store.scratch_put("job-12/checkpoint.safetensors", checkpoint)
    checkpoint.write_bytes(b"step 20")
    store.scratch_put("job-1/checkpoint.safetensors", checkpoint)  # replaces the earlier checkpoint

    assert store.scratch_get("job-1/checkpoint.safetensors", tmp_path / "got" / "1")
    assert (tmp_path / "got" / "1").read_bytes() == b"step 20"
    assert not store.scratch_get("job-1/missing", tmp_path / "got" / "missing")

    store.scratch_delete("job-1/")

    assert not store.scratch_get("job-1/checkpoint.safetensors", tmp_path / "got" / "2")
    assert store.scratch_get("job-12/checkpoint.safetensors", tmp_path / "got" / "12")
    assert (tmp_path / "got" / "12").read_bytes() == b"step 10"


def test_scratch_keys_stay_inside_the_scratch_area(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        store.scratch_get("../demo/1/manifest.json", tmp_path / "x")


def test_s3_manifest_is_put_only_if_absent(s3_endpoint: str, tmp_path: Path) -> None:
    """The conditional put is what lets exactly one of two racing publishers make a version visible."""
    settings = Settings(
        data_dir=tmp_path, s3_bucket=BUCKET, s3_prefix="race", s3_endpoint_url=s3_endpoint, **CREDENTIALS
    )
    store = artifact_store(settings)
    adapter_files(tmp_path / "src", "a")
    store.publish("demo", 1, tmp_path / "src", {"winner": True})

    with pytest.raises(Conflict):
        store._put_manifest("race/demo/1/", b'{"files": {}}')

    assert store.verify("demo", 1)["winner"] is True
