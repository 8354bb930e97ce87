"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against the API under uvicorn, with a
real Celery worker training a real tiny model. Every page's screenshot goes to this run's temporary folder."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import API_LOG, DATA_DIR, auth, make_key, register_demo_model
from tests.service.processes import candidates, start_worker, stop
from tests.service.rows import published_versions

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
JOB_SECONDS = 600


@pytest.fixture(scope="module")
def chromium() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dashboard-screenshots")


@pytest.fixture
def browse(chromium, live_api) -> Iterator:
    """New browser contexts (each its own cookies) that may only talk to the API's origin: any other request is
    refused and remembered, and the test fails if there was one, or if a script of the page failed."""
    contexts, foreign, errors = [], [], []

    def open_page():
        context = chromium.new_context(base_url=live_api, viewport={"width": 1360, "height": 900})

        def only_our_origin(route) -> None:
            if route.request.url.startswith(live_api):
                route.continue_()
            else:
                foreign.append(route.request.url)
                route.abort()

        context.route("**/*", only_our_origin)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert foreign == [], f"the dashboard asked other hosts for {foreign}"
    assert errors == [], f"the dashboard's scripts failed: {errors}"


def sign_in(page, key: str) -> None:
    page.goto("/ui/")
    assert page.url.endswith("/ui/sign-in?next=/ui/")
    page.fill("#api-key", key)
    page.click("#sign-in")
    page.wait_for_url("**/ui/")


def confirm(page) -> None:
    """Accept the dashboard's confirmation dialog."""
    page.wait_for_selector("dialog#confirm[open]")
    page.click("#confirm-ok")


def shoot(page, folder: Path, name: str) -> None:
    page.screenshot(path=folder / f"{name}.png", full_page=True)


@pytest.fixture(scope="module")
def api(live_api, admin_key) -> httpx.Client:
    return httpx.Client(base_url=live_api, headers=auth(admin_key), timeout=30)


@pytest.fixture
def worker_later(database) -> Iterator:
    """Starts a Celery worker when the test says so (so a job can be seen queued first); stops it afterwards."""
    started = []

    def start() -> None:
        started.append(start_worker(DATA_DIR / "worker-dashboard.log", f"ui-{uuid.uuid4().hex[:6]}"))

    yield start
    for process in started:
        stop(process)


def submit(api: httpx.Client, model: str, items: list[dict], key: str | None = None) -> dict:
    headers = auth(key) if key else None
    body = {"subject_request_id": f"dsr-{uuid.uuid4().hex[:12]}", "model": model, "items": items}
    response = api.post("/v1/forget-requests", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def test_sign_in_shows_the_overview_and_the_key_stays_out_of_the_page(browse, admin_key, screenshots):
    page = browse()
    page.goto("/ui/sign-in")
    shoot(page, screenshots, "sign-in")
    sign_in(page, admin_key)
    assert page.locator("h1").inner_text() == "Overview"
    for section in ("#requests-by-status", "#gdpr-clock", "#queue", "#health", "#running-jobs", "#latest-versions"):
        assert page.locator(section).count() == 1, section
    assert "database: ok" in page.locator("#health").inner_text()
    assert page.evaluate("document.cookie") == ""  # the session cookie is HttpOnly
    assert admin_key not in page.content()
    shoot(page, screenshots, "overview")
    assert admin_key not in API_LOG.read_text()


def test_a_job_goes_from_queued_to_running_to_succeeded_live_and_its_curve_is_plotted(
    browse, api, tiny_demo_model, admin_key, worker_later, screenshots
):
    model = register_demo_model(api, tiny_demo_model)
    request = submit(api, model, candidates(tiny_demo_model)[:2])
    page = browse()
    sign_in(page, admin_key)
    page.click("#batch-now")
    confirm(page)
    page.wait_for_url("**/ui/jobs?done=batched*")
    (job_id,) = [job["id"] for job in api.get("/v1/jobs", params={"model": model}).json()["items"]]
    page.click(f"a[href='/ui/jobs/{job_id}']")
    assert page.locator("#job-status").inner_text() == "queued"
    # Record every status the live fragment shows, and mark the page: a reload would lose the mark.
    page.evaluate(
        """() => { window.seen = [document.querySelector('#job-status').innerText]; window.unreloaded = true;
        new MutationObserver(() => { const s = document.querySelector('#job-status');
          if (s && window.seen[window.seen.length - 1] !== s.innerText) window.seen.push(s.innerText); })
        .observe(document.body, {subtree: true, childList: true, characterData: true}); }"""
    )
    worker_later()
    page.wait_for_function("() => window.seen.includes('running')", timeout=JOB_SECONDS * 1000)
    page.wait_for_function("() => Number(document.querySelector('#job-live progress')?.value) > 0",
                           timeout=JOB_SECONDS * 1000)  # fmt: skip
    shoot(page, screenshots, "job-running")
    overview = page.context.new_page()
    overview.goto("/ui/")
    overview.wait_for_selector(f"#running-jobs a[href='/ui/jobs/{job_id}']")
    shoot(overview, screenshots, "overview-running")
    overview.close()
    page.wait_for_function("() => ['succeeded', 'failed'].includes(window.seen.at(-1))", timeout=JOB_SECONDS * 1000)
    seen = page.evaluate("window.seen")
    assert seen[-1] == "succeeded", seen
    assert [s for s in seen if s in ("queued", "running", "succeeded")] == ["queued", "running", "succeeded"], seen
    assert page.evaluate("window.unreloaded") is True  # the page updated itself

    page.wait_for_selector("#curve .plot canvas")
    curve = page.locator("#curve").inner_text()
    for label in ("forget MA", "target MA", "forget EL", "retain perplexity", "limit"):
        assert label in curve, label
    plotted = json.loads(page.locator(f"#job-{job_id}-forget").get_attribute("data-spec"))
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert plotted["x"][-1] == job["progress"]["step"]  # the curve runs to the last step the job trained
    assert "passed" in page.locator("#verification").inner_text()
    shoot(page, screenshots, "job")

    page.click(f"a[href='/ui/requests/{request['id']}']")
    assert page.locator("#certificate-result").inner_text() == "Signature valid"
    assert page.locator("#items tbody tr").count() == 2
    for item in candidates(tiny_demo_model)[:2]:  # metrics and hashes only, never the texts
        assert next(iter(item.values()))[:30] not in page.content()
    with page.expect_download() as download:
        page.click("#certificate-download")
    assert json.loads(Path(download.value.path()).read_text())["payload"]["request_id"] == request["id"]
    shoot(page, screenshots, "request")
    page.goto(f"/ui/models/{model}")
    page.wait_for_selector("#version-plots .plot canvas")
    shoot(page, screenshots, "model")
    page.goto("/ui/jobs")
    shoot(page, screenshots, "jobs")


@pytest.fixture
def two_versions(api, tiny_demo_model, settings, tmp_path) -> str:
    """A model with versions 1 and 2 published through the real store, `current` on 2."""
    name = register_demo_model(api, tiny_demo_model)
    published_versions(settings, name, tmp_path)
    return name


def test_rolling_the_alias_back_in_the_dashboard_moves_it_for_the_api_too(browse, api, admin_key, two_versions):
    page = browse()
    sign_in(page, admin_key)
    page.goto(f"/ui/models/{two_versions}")
    assert page.locator("#current-version").inner_text() == "v2"
    page.click("tr[data-version='1'] button[data-action='make-current']")
    confirm(page)
    page.wait_for_url(f"**/ui/models/{two_versions}?done=alias*")
    assert page.locator("#current-version").inner_text() == "v1"
    assert "now points at version 1" in page.locator(".notice").inner_text()
    models = {m["name"]: m for m in api.get("/v1/models").json()}
    assert models[two_versions]["current_version"] == 1
    pointer = json.loads((DATA_DIR / "artifacts" / two_versions / "aliases" / "current.json").read_text())
    assert pointer["version"] == 1
    page.goto("/ui/audit?action=adapter.alias_moved&entity_id=")
    assert "version=1" in page.locator("table").first.inner_text()


def test_a_tenant_key_cannot_see_another_tenants_request(browse, api, registered_model, screenshots):
    theirs = submit(api, registered_model, [{"text": "Ana Lima lives at 4 Rua Verde."}],
                    make_key(["requests:write", "requests:read"], "ui-acme", tenant="acme"))  # fmt: skip
    mine = submit(api, registered_model, [{"text": "Bo Jensen was born in 1970."}],
                  make_key(["requests:write", "requests:read"], "ui-globex-writer", tenant="globex"))  # fmt: skip
    page = browse()
    sign_in(page, make_key(["requests:read"], "ui-globex", tenant="globex"))
    page.goto("/ui/requests")
    listed = page.locator("#request-rows").inner_text()
    assert mine["subject_request_id"] in listed and theirs["subject_request_id"] not in listed
    shoot(page, screenshots, "requests")
    answer = page.goto(f"/ui/requests/{theirs['id']}")
    assert answer.status == 404
    assert page.locator("h1").inner_text() == "Not found"
    shoot(page, screenshots, "not-found")
    page.goto(f"/ui/requests?q={theirs['subject_request_id']}")
    assert "No request matches" in page.content()
    assert page.locator("a[href='/ui/audit']").count() == 0  # no audit log for a tenant


def test_a_post_without_the_csrf_token_is_refused(browse, api, admin_key, registered_model):
    page = browse()
    sign_in(page, admin_key)
    before = {m["name"]: m for m in api.get("/v1/models").json()}[registered_model]["batching"]
    refused = page.request.post(f"/ui/models/{registered_model}/batching", form={"max_items": "3"})
    assert refused.status == 403 and "CSRF" in refused.text()
    assert {m["name"]: m for m in api.get("/v1/models").json()}[registered_model]["batching"] == before


def test_signing_out_ends_the_session_on_the_server(browse, admin_key, screenshots):
    page = browse()
    sign_in(page, admin_key)
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "unlearnd_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    page.goto("/ui/audit")
    shoot(page, screenshots, "audit")
    page.click("#sign-out")
    page.wait_for_url("**/ui/sign-in")
    page.context.add_cookies([cookie])  # the old token, replayed
    page.goto("/ui/")
    assert re.search(r"/ui/sign-in\?next=", page.url)
