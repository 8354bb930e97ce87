"""Publishing a fused version is all-or-nothing: a crash between the files and the manifest, or between the manifest
and the database row, leaves no version visible, and the next publish of that number succeeds."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import select

from tests.service.conftest import auth


@pytest.fixture(scope="module")
def corpora(tiny_demo_model) -> dict[str, list[dict]]:
    from worker.job.claim import read_items

    return {
        "forget": read_items(str(tiny_demo_model.forget_candidates))[:2],
        "retain": read_items(str(tiny_demo_model.retain_corpus)),
        "holdout": read_items(str(tiny_demo_model.holdout_corpus)),
    }


@pytest.fixture(scope="module")
def fused(registered_model, tiny_demo_model, corpora):
    """A real tiny-model unlearning run of a succeeded job, fused into a publishable version."""
    from app.jobs.models import job_key
    from worker.engine import FusionSettings, ItemSets, UnlearnConfig, adapter_init, fuse_job, load_causal_lm, unlearn

    config = UnlearnConfig()
    base, tokenizer = load_causal_lm(tiny_demo_model.model_dir)
    items = ItemSets(corpora["forget"], corpora["retain"], corpora["holdout"])
    result = unlearn(base, tokenizer, items, config, adapter_init(config.adapter.init))
    assert result.stop_reason == "target_reached"
    trained_job, _ = job_row(registered_model, corpora["forget"], "succeeded")
    return fuse_job(result, tokenizer, job_key(trained_job), items, None, config, FusionSettings())


def job_row(model_name: str, forget: list[dict], status: str) -> tuple[int, str]:
    """A job with one request for `forget`, in PostgreSQL; returns (job id, request id)."""
    from app.auth.models import ApiKey
    from app.base_models.service import get_by_name
    from app.core.config import get_settings
    from app.core.db import session_scope
    from app.forget_requests.items import item_digest, seal_items
    from app.forget_requests.models import ForgetRequest
    from app.jobs.models import UnlearningJob

    with session_scope() as session:
        model = get_by_name(session, model_name)
        request = ForgetRequest(
            id=uuid.uuid4(),
            api_key_id=session.scalars(select(ApiKey.id)).first(),
            subject_request_id=f"dsr-{uuid.uuid4().hex}",
            base_model_id=model.id,
            body_sha256="0" * 64,
            status="running",
            due_at=model.created_at,
            item_sha256s=[item_digest(item, get_settings()) for item in forget],
        )
        seal_items(request, forget, get_settings())
        job = UnlearningJob(base_model_id=model.id, method="ihl", config={}, status=status, requests=[request])
        session.add(job)
        session.commit()
        return job.id, str(request.id)


@pytest.fixture
def job_inputs(registered_model, tiny_demo_model, corpora):
    """A job in `publishing` with its request, as the worker has it when it publishes."""
    from app.base_models.service import get_by_name
    from app.core.db import session_scope
    from worker.job.claim import JobInputs

    job_id, request_id = job_row(registered_model, corpora["forget"], "publishing")
    with session_scope() as session:
        model = get_by_name(session, registered_model)
        return JobInputs(
            job_id=job_id, attempt=0, method="ihl", model_name=model.name, model_path=model.path,
            tokenizer_path=model.tokenizer_path, weights_sha256=model.weights_sha256, config={},
            forget_items=corpora["forget"], items_per_request=[(request_id, 2)], retain_items=corpora["retain"],
            holdout_items=corpora["holdout"], held_sets={},
        )  # fmt: skip


def parent_version(name: str) -> int | None:
    from app.adapters.service import latest_version
    from app.base_models.service import get_by_name
    from app.core.db import session_scope

    with session_scope() as session:
        return latest_version(session, get_by_name(session, name))


def write(session, store, inputs, parent: int | None, fused, metrics: dict) -> int:
    """The version's files, manifest and row, as the worker publishes them, left for the caller to commit."""
    from app.adapters.publishing import write_version
    from worker.job.liveness import held_job
    from worker.job.publishing import release_of

    with release_of(inputs, fused, metrics, {}) as release:
        return write_version(session, store, held_job(session, inputs), parent, release, "test")


def visible_versions(client, admin_key, name: str) -> list[int]:
    return [v["version"] for v in client.get(f"/v1/models/{name}/adapters", headers=auth(admin_key)).json()]


def test_crash_between_files_and_manifest_then_crash_before_the_row_then_publish(
    fused, job_inputs, client, admin_key, settings, monkeypatch
):
    from app.adapters.models import AdapterVersion
    from app.adapters.store import artifact_store
    from app.core.db import session_scope
    from app.core.errors import NotFound

    inputs, store = job_inputs, artifact_store(settings)
    parent = parent_version(inputs.model_name)
    version = (parent or 0) + 1
    before = visible_versions(client, admin_key, inputs.model_name)

    def crash(*args, **kwargs):
        raise OSError("disk gone between the files and the manifest")

    # Kill point 1: files written, manifest not.
    with monkeypatch.context() as patch:
        patch.setattr(type(store), "_put_manifest", crash)
        with session_scope() as session, pytest.raises(OSError):
            write(session, store, inputs, parent, fused, {"m": 1})
    with pytest.raises(NotFound):
        store.read_manifest(inputs.model_name, version)
    assert visible_versions(client, admin_key, inputs.model_name) == before

    # Kill point 2: files and manifest written, the process dies before the row commits.
    with session_scope() as session:
        write(session, store, inputs, parent, fused, {"m": 2})
        session.rollback()
    assert store.read_manifest(inputs.model_name, version)["metrics"] == {"m": 2}  # an orphan: no row refers to it
    assert visible_versions(client, admin_key, inputs.model_name) == before

    # The next publish quarantines the orphan and commits the version exactly once.
    with session_scope() as session:
        published = write(session, store, inputs, parent, fused, {"m": 3})
        session.commit()
        rows = session.scalars(select(AdapterVersion).where(AdapterVersion.job_id == inputs.job_id)).all()
    assert published == version and len(rows) == 1
    assert visible_versions(client, admin_key, inputs.model_name) == [*before, version]
    manifest = store.verify(inputs.model_name, version)
    assert manifest["metrics"] == {"m": 3}
    assert rows[0].manifest == manifest
    assert {"adapter_config.json", "adapter_model.safetensors", "fusion_state.safetensors"} <= set(manifest["files"])


def test_published_files_downloaded_over_the_api_reproduce_the_recorded_item_metrics(
    fused, job_inputs, corpora, client, admin_key, settings, tiny_demo_model, tmp_path
):
    """A plain PeftModel.from_pretrained on the original base, from files fetched over HTTP, measures what the
    worker recorded."""
    from peft import PeftModel

    from app.adapters.store import artifact_store
    from app.core.db import session_scope
    from worker.engine import load_causal_lm
    from worker.engine.data import encode_items
    from worker.engine.evaluation import score_items

    inputs = job_inputs
    with session_scope() as session:
        version = write(session, artifact_store(settings), inputs, parent_version(inputs.model_name), fused, {})
        session.commit()
    detail = client.get(f"/v1/models/{inputs.model_name}/adapters/{version}", headers=auth(admin_key)).json()
    for name, meta in detail["manifest"]["files"].items():
        response = client.get(
            f"/v1/models/{inputs.model_name}/adapters/{version}/files/{name}", headers=auth(admin_key)
        )
        assert response.headers["x-content-sha256"] == meta["sha256"]
        (tmp_path / name).write_bytes(response.content)
    base, tokenizer = load_causal_lm(tiny_demo_model.model_dir)
    served = PeftModel.from_pretrained(base, tmp_path).eval()
    scores = score_items(served, encode_items(tokenizer, corpora["forget"], 256), batch_size=8)
    (recorded_items,) = fused.verification.items.values()
    recorded = [item["ma"] for item in recorded_items]
    assert scores.ma.tolist() == pytest.approx(recorded, abs=1e-4)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
