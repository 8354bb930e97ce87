"""A whole deployment of real processes for fault tests: its own PostgreSQL database, broker and data folder, the
API under uvicorn, Celery workers and beat schedulers, each a subprocess; plus private PostgreSQL and Redis servers
a test may stop and start."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.service.processes import ROOT, free_port, start, start_api, stop, wait_until


class Deployment:
    def __init__(self, root: Path, database_url: str, broker_url: str, **settings: object) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url
        self.env = {
            "UNLEARND_DATABASE_URL": database_url,
            "UNLEARND_BROKER_URL": broker_url,
            "UNLEARND_DATA_DIR": str(root / "data"),
            **{f"UNLEARND_{name.upper()}": str(value) for name, value in settings.items()},
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.api = ""

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", *args],
            cwd=ROOT,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def admin_key(self) -> str:
        return self.cli("keys", "create", "--name", "fault-test", "--scope", "admin").strip().splitlines()[-1]

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen:
        process = start(list(args), self.log(name), {**self.env, **env})
        self.processes[name] = process
        return process

    def start_api(self) -> str:
        self.processes["api"], self.api = start_api(self.log("api"), self.env)
        return self.api

    def start_worker(self, name: str, queues: str = "gpu,default") -> subprocess.Popen:
        process = self.start(name, "worker", "--hostname", f"{name}@%h", "--queues", queues)
        log = self.log(name)
        wait_until(lambda: b"ready." in log.read_bytes() or process.poll() is not None, 90, f"worker {name}")
        assert process.poll() is None, log.read_text()[-3000:]
        return process

    def start_beat(self, name: str) -> subprocess.Popen:
        # each scheduler keeps its own schedule file
        return self.start(name, "beat", UNLEARND_DATA_DIR=str(self.root / name))

    def kill(self, name: str) -> None:
        """SIGKILL: no cleanup, no acknowledgement, as when a machine dies."""
        process = self.processes.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self, name: str) -> None:
        stop(self.processes.pop(name))

    def close(self) -> None:
        for name in list(self.processes):
            self.stop(name)


class PrivateRedis:
    """A redis-server of the test's own, to stop and start without touching anyone else's."""

    def __init__(self, root: Path) -> None:
        self.port, self.root, self.process = free_port(), root, None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.root)],
            stdout=(self.root / "redis.log").open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(lambda: subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout
                   == b"PONG\n", 30, "redis")  # fmt: skip

    def stop(self) -> None:
        stop(self.process)


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb), to stop and start. PostgreSQL refuses to run as root, so
    as root it runs as the `postgres` system user."""

    def __init__(self) -> None:
        # not under pytest's tmp_path: the postgres user cannot enter root's private folders
        self.root = Path(tempfile.mkdtemp(prefix="unlearnd-pg-"))
        self.port, self.data = free_port(), self.root / "pgdata"
        bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        self.bin = Path(bindirs[-1]) if bindirs else Path(shutil.which("pg_ctl")).parent
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.data / "server.log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
