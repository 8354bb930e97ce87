"""Real processes for integration tests: the API under uvicorn and a Celery worker, each a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_SECONDS = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Run `unlearnd <args>` in the background with output to `log`."""
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL after `timeout`: the SIGKILL to the whole process group when the process leads one (as
    `start`'s do), so no child it started (uvicorn's worker processes) is left behind."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
        process.wait()


def start_api(log: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`unlearnd serve` on a free port, once it answers /healthz; returns the process and its base URL."""
    port = free_port()
    process = start(["serve", "--port", str(port)], log, env)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, 60, "the API")
    return process, base


def start_worker(log: Path, name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    process = start(["worker", "--hostname", f"{name}@%h"], log, env)
    wait_until(lambda: b"ready." in log.read_bytes() or process.poll() is not None, 90, "the Celery worker")
    if process.poll() is not None:
        raise RuntimeError(f"worker exited early:\n{log.read_text()[-3000:]}")
    return process


def wait_for_job(api: httpx.Client, job_id: int, timeout: float = JOB_TIMEOUT_SECONDS) -> dict:
    """Poll a job over the API until it is succeeded, failed or cancelled."""
    job: dict = {}

    def finished() -> bool:
        nonlocal job
        job = api.get(f"/v1/jobs/{job_id}").json()
        return job["status"] in ("succeeded", "failed", "cancelled")

    wait_until(finished, timeout, f"job {job_id}", interval=0.5)
    return job


def candidates(demo) -> list[dict]:
    """Records the demo model memorised, to ask it to forget."""
    return [json.loads(line) for line in demo.forget_candidates.read_text().splitlines()]


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    """moto's standalone server (S3, KMS, ...) on a free local port, once it answers; returns it and its endpoint."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    handle = log.open("ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=handle, stderr=handle
    )

    def answers() -> bool:
        try:
            return httpx.get(f"{endpoint}/moto-api/", timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    wait_until(lambda: answers() or server.poll() is not None, 20, "moto_server")
    if server.poll() is not None:
        raise RuntimeError(f"moto_server exited early:\n{log.read_text()[-3000:]}")
    return server, endpoint
