"""Process boundaries: the API never loads torch; every container runs a real `unlearnd` subcommand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_api_process_never_imports_torch(database, tmp_path):
    script = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from app.main import create_app\n"
        "client = TestClient(create_app())\n"
        "assert client.get('/healthz').status_code == 200\n"
        "client.post('/v1/forget-requests', json={})\n"
        "client.get('/openapi.json')\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def _cli_commands() -> set[str]:
    import typer.main

    from worker.cli import cli

    group = typer.main.get_command(cli)
    return set(group.commands)


def test_compose_services_run_real_subcommands_and_dockerfiles_exist():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    commands = _cli_commands()
    ours = {name: svc for name, svc in compose["services"].items() if "build" in svc}
    assert {"migrate", "api", "worker", "beat"} <= set(ours)
    for name, service in ours.items():
        command = service["command"]
        argv = command if isinstance(command, list) else command.split()
        assert argv[0] == "unlearnd", name
        assert argv[1] in commands, f"{name}: '{argv[1]}' is not an unlearnd subcommand"
        dockerfile = ROOT / service["build"].get("context", ".") / service["build"]["dockerfile"]
        assert dockerfile.is_file(), dockerfile
    assert compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


@pytest.mark.parametrize(
    ("pool_args", "starts"),
    [
        (["--pool", "prefork", "--concurrency", "1"], False),
        (["--pool", "prefork", "--concurrency", "1", "--max-tasks-per-child", "1"], True),
    ],
)
def test_a_worker_pool_that_would_fork_after_cuda_is_refused(database, tmp_path, pool_args, starts):
    from tests.service.processes import wait_until

    log = tmp_path / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO", "--queues",
               "nothing", *pool_args]  # fmt: skip
    with log.open("wb") as out:
        worker = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ)
    try:
        wait_until(lambda: worker.poll() is not None or b"ready." in log.read_bytes(), 120, "the worker")
        assert (worker.poll() is None) == starts, log.read_text()[-2000:]
        if not starts:
            assert "--max-tasks-per-child 1" in log.read_text()
    finally:
        worker.kill()
        worker.wait()
