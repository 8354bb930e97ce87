"""Concurrent HTTP clients against `unlearnd serve` on PostgreSQL, then an audit of every answer in the database.

Many clients submit and poll for a fixed time, then every accepted request is checked in the database: one run, one
table, one row per number of API worker processes.

    python -m bench.load --workers 1,2 --clients 32 --duration 20

Each row gets a fresh database (migrated; an admin key and a load key; the tiny demo model, built once per run,
registered over the API), `unlearnd serve --workers N` on 127.0.0.1, and --jobs queued jobs (submitted and batched
over the API; no Celery worker runs, so they stay queued). Then --clients clients, one request at a time each, run for
--duration seconds:
- GET /v1/jobs/{id} of a random job (--get-fraction of the operations), expecting 200;
- otherwise POST /v1/forget-requests: a new subject_request_id (expects 201); a replay of an earlier accepted body
  (--replay-fraction of the POSTs, expects 200 and the original id); a used subject_request_id with another body
  (--conflict-fraction, expects 409); or a new one sent twice at once (--race-fraction, expects one 201 and one 200,
  same id).
Afterwards every request id the server answered must be in the database under its subject_request_id (and a 201's
row must hold the body sent), else it is lost; a subject_request_id with more than one request id, in answers or
rows, counts the extra ones as duplicates. The server is stopped and the database dropped, also on errors, Ctrl-C and
SIGTERM. Exit status 1 if anything was lost or duplicated. Each client's sequence of operations is seeded; timings
are not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

import app.models  # noqa: F401  (maps every table, so the sessions below can flush keys and audit events)
from app.auth.service import create_key
from app.core.db import make_engine
from app.forget_requests.models import ForgetRequest
from app.forget_requests.schemas import ForgetRequestCreate
from app.forget_requests.service import body_digest
from app.migrate import upgrade
from tests.service.databases import create_database, drop_database
from tests.service.processes import free_port, stop, wait_until
from worker.demo_model import DemoModel, build_demo_model

HOST = "127.0.0.1"
MODEL_NAME = "load-bench"
SERVER_START_SECONDS = 120.0
SERVER_STOP_SECONDS = 30.0
Log = Callable[[str], None]


# --- Accounting: what the clients were told against what the database holds ---------------------------------------


@dataclass(frozen=True)
class Answer:
    """A 200 or 201 to a POST: the request id the service gave for a subject_request_id and body."""

    subject_request_id: str
    request_id: uuid.UUID
    body_sha256: str
    created: bool  # 201


@dataclass(frozen=True)
class StoredRequest:
    request_id: uuid.UUID
    subject_request_id: str
    body_sha256: str


@dataclass(frozen=True)
class Audit:
    lost: int  # request ids answered but missing, or stored under another subject_request_id or body
    duplicates: int  # request ids beyond the first for one subject_request_id, in answers and rows together
    unacknowledged: int  # rows no answer mentions (their answer timed out or failed): stored, not lost
    checked: int  # distinct request ids answered


def answer_of(body: dict, response: httpx.Response) -> Answer | None:
    """What the answer to POST /v1/forget-requests with `body` told the client, if it named a request."""
    if response.status_code not in (200, 201):
        return None
    digest = body_digest(ForgetRequestCreate.model_validate(body))
    return Answer(body["subject_request_id"], uuid.UUID(response.json()["id"]), digest, response.status_code == 201)


def stored_requests(session: Session, api_key_id: int) -> list[StoredRequest]:
    rows = session.execute(
        select(ForgetRequest.id, ForgetRequest.subject_request_id, ForgetRequest.body_sha256).where(
            ForgetRequest.api_key_id == api_key_id
        )
    )
    return [StoredRequest(*row) for row in rows]


def _holds(row: StoredRequest | None, answer: Answer) -> bool:
    """The row is the request the answer named: same subject_request_id, and for a 201 the body that was sent."""
    if row is None or row.subject_request_id != answer.subject_request_id:
        return False
    return not answer.created or row.body_sha256 == answer.body_sha256


def audit(answers: Iterable[Answer], rows: Iterable[StoredRequest]) -> Audit:
    """Lost and duplicated requests of one API key (idempotency keys are scoped per key)."""
    answers, by_id = list(answers), {row.request_id: row for row in rows}
    lost = {a.request_id for a in answers if not _holds(by_id.get(a.request_id), a)}
    ids_per_subject: defaultdict[str, set[uuid.UUID]] = defaultdict(set)
    for a in answers:
        ids_per_subject[a.subject_request_id].add(a.request_id)
    answered_subjects = set(ids_per_subject)
    for row in by_id.values():
        ids_per_subject[row.subject_request_id].add(row.request_id)
    return Audit(
        lost=len(lost),
        duplicates=sum(len(ids) - 1 for ids in ids_per_subject.values()),
        unacknowledged=sum(row.subject_request_id not in answered_subjects for row in by_id.values()),
        checked=len({a.request_id for a in answers}),
    )


# --- The clients ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    get_fraction: float  # of operations
    replay_fraction: float  # of POSTs, and the next two as well
    conflict_fraction: float
    race_fraction: float
    items: int  # per submitted request


@dataclass
class Tally:
    """What the clients saw during one configuration."""

    measure_from: float  # monotonic; operations started earlier are warm-up, left out of the rates and latencies
    post_ms: list[float] = field(default_factory=list)
    get_ms: list[float] = field(default_factory=list)
    created: int = 0  # measured 201s
    answered: int = 0  # every answer, POST or GET, warm-up included
    answers: list[Answer] = field(default_factory=list)  # every 200/201 to a POST, warm-up included
    accepted: list[dict] = field(default_factory=list)  # bodies that got a 201, to replay
    errors: Counter[str] = field(default_factory=Counter)  # "what: status or exception" -> count
    statuses: Counter[str] = field(default_factory=Counter)  # "what status" -> count, for the log

    def timed(self, samples: list[float], started: float) -> None:
        self.answered += 1
        if started >= self.measure_from:
            samples.append((time.monotonic() - started) * 1000)


def request_body(model: str, subject: str, items: int, variant: str = "") -> dict:
    texts = (
        f"{subject}{variant} item {i}: Alex Example, 1 Sample Road, Testville, +00 000 {i:04d}" for i in range(items)
    )
    return {"subject_request_id": subject, "model": model, "items": [{"text": t} for t in texts]}


class Client:
    """One client: a seeded sequence of operations, one at a time, until the deadline."""

    def __init__(self, index: int, http: httpx.AsyncClient, jobs: list[int], mix: Mix, tally: Tally, seed: int) -> None:
        self.index, self.http, self.jobs, self.mix, self.tally = index, http, jobs, mix, tally
        # the kinds of operations and the jobs polled are seeded; which accepted body a replay picks depends on
        # what was accepted by then, so it draws from a generator of its own
        self.plan, self.pick = random.Random(f"{seed}-{index}"), random.Random(f"{seed}-{index}-pick")
        self.submitted = 0

    async def run(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            await self.step()

    async def step(self) -> None:
        m, accepted = self.mix, self.tally.accepted
        if self.plan.random() < m.get_fraction:
            return await self.get_job(self.plan.choice(self.jobs))
        r = self.plan.random()
        if r < m.replay_fraction + m.conflict_fraction and not accepted:
            return await self.submit_new()  # nothing accepted yet to re-send
        if r < m.replay_fraction:
            return await self.replay(self.pick.choice(accepted))
        if r < m.replay_fraction + m.conflict_fraction:
            return await self.conflict(self.pick.choice(accepted))
        if r < m.replay_fraction + m.conflict_fraction + m.race_fraction:
            return await self.race()
        return await self.submit_new()

    def new_body(self) -> dict:
        self.submitted += 1
        return request_body(MODEL_NAME, f"load-{self.index}-{self.submitted}", self.mix.items)

    async def post(self, what: str, body: dict) -> httpx.Response | None:
        started = time.monotonic()
        try:
            response = await self.http.post("/v1/forget-requests", json=body)
        except httpx.HTTPError as exc:
            self.tally.errors[f"{what}: {type(exc).__name__}"] += 1
            return None
        self.tally.timed(self.tally.post_ms, started)
        self.tally.statuses[f"{what} {response.status_code}"] += 1
        answer = answer_of(body, response)
        if answer is not None:
            self.tally.answers.append(answer)
            if answer.created:
                self.tally.accepted.append(body)
                self.tally.created += started >= self.tally.measure_from
        return response

    def expect(self, what: str, response: httpx.Response | None, status: int) -> None:
        if response is not None and response.status_code != status:
            self.tally.errors[f"{what}: {response.status_code}"] += 1

    async def submit_new(self) -> None:
        self.expect("new", await self.post("new", self.new_body()), 201)

    async def replay(self, body: dict) -> None:
        # a replay answered with another request id than the original's is counted by the audit, as a duplicate
        self.expect("replay", await self.post("replay", body), 200)

    async def conflict(self, body: dict) -> None:
        changed = request_body(MODEL_NAME, body["subject_request_id"], self.mix.items, variant=" (changed)")
        self.expect("conflict", await self.post("conflict", changed), 409)

    async def race(self) -> None:
        body = self.new_body()
        first, second = await asyncio.gather(self.post("race", body), self.post("race", body))
        answered = first is not None and second is not None
        if answered and sorted((first.status_code, second.status_code)) != [200, 201]:
            self.tally.errors[f"race: {first.status_code} and {second.status_code}"] += 1

    async def get_job(self, job_id: int) -> None:
        started = time.monotonic()
        try:
            response = await self.http.get(f"/v1/jobs/{job_id}")
        except httpx.HTTPError as exc:
            self.tally.errors[f"get job: {type(exc).__name__}"] += 1
            return
        self.tally.timed(self.tally.get_ms, started)
        if response.status_code != 200 or response.json()["id"] != job_id:
            self.tally.errors[f"get job: {response.status_code}"] += 1


async def run_clients(
    base_url: str, key: str, jobs: list[int], clients: int, duration: float, warmup: float, mix: Mix, seed: int,
    timeout: float,
) -> tuple[Tally, float]:  # fmt: skip
    """The tally and the measured window in seconds: from the end of the warm-up until the last answer."""
    limits = httpx.Limits(max_connections=2 * clients, max_keepalive_connections=2 * clients)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=timeout) as http:
        started = time.monotonic()
        tally = Tally(measure_from=started + warmup)
        deadline = started + warmup + duration
        await asyncio.gather(*(Client(i, http, jobs, mix, tally, seed).run(deadline) for i in range(clients)))
        return tally, time.monotonic() - tally.measure_from


# --- The system under test -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(admin_url: str, log: Log) -> Iterator[str]:
    """A new, migrated database; dropped on the way out."""
    url = create_database(admin_url, f"unlearnd_load_{uuid.uuid4().hex[:10]}")
    try:
        upgrade(url)
        log(f"database {make_url(url).database} created and migrated")
        yield url
    finally:
        drop_database(admin_url, url)
        log(f"database {make_url(url).database} dropped")


def create_keys(database_url: str) -> tuple[str, str, int]:
    """An admin key for the setup and a write+read key for the load: (admin secret, load secret, load key id)."""
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            _, admin = create_key(session, "load bench admin", ["admin"], actor="bench")
            key, load = create_key(session, "load bench clients", ["requests:write", "requests:read"], actor="bench")
            session.commit()
            return admin, load, key.id
    finally:
        engine.dispose()


def read_stored(database_url: str, api_key_id: int) -> list[StoredRequest]:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            return stored_requests(session, api_key_id)
    finally:
        engine.dispose()


@dataclass(frozen=True)
class Server:
    base_url: str
    process_group: int  # the supervisor and every API worker process

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the group's live processes so far (Linux /proc)."""
        ticks = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):  # a process that ended meanwhile
                fields = stat.read_text().rsplit(")", 1)[1].split()  # from field 3 (state) on; see proc(5)
                if int(fields[2]) == self.process_group:
                    ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def api_server(workers: int, port: int, env: dict[str, str], work_dir: Path, log: Log) -> Iterator[Server]:
    """`unlearnd serve --workers N` in its own process group, until every worker has started; stopped on the way
    out (SIGTERM to the group, SIGKILL after a grace period)."""
    port = port or free_port()
    with socket.socket() as probe:
        if probe.connect_ex((HOST, port)) == 0:
            raise SystemExit(f"something already listens on {HOST}:{port}; pick another --port")
    log_path = work_dir / f"serve-{workers}.log"
    with log_path.open("wb") as out:
        command = ["serve", "--host", HOST, "--port", str(port), "--workers", str(workers)]
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *command],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work_dir, start_new_session=True,
        )  # fmt: skip
    base_url = f"http://{HOST}:{port}"
    try:
        _wait_ready(process, base_url, workers, log_path)
        log(f"{workers} API worker process(es) ready on {base_url}")
        yield Server(base_url, process.pid)
    finally:
        stop(process, SERVER_STOP_SECONDS)
        log(f"server stopped (exit {process.returncode})")


def _wait_ready(process: subprocess.Popen, base_url: str, workers: int, log_path: Path) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        # uvicorn logs this once per worker process; /readyz alone would answer as soon as the first one is up
        if log_path.read_text().count("Application startup complete.") < workers:
            return False
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200
        return False

    wait_until(ready, SERVER_START_SECONDS, f"the server ({log_path})")


def queued_jobs(base_url: str, admin_key: str, demo: DemoModel, jobs: int) -> list[int]:
    """Register the demo model `jobs` times (the load's model first), then submit one request to each and batch it:
    that many queued jobs. A model has one unfinished job at a time, hence one model per job."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    ids = []
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as http:
        for j in range(jobs):
            name = MODEL_NAME if j == 0 else f"{MODEL_NAME}-{j}"
            model = {
                "name": name,
                "path": str(demo.model_dir),
                "retain_corpus": str(demo.retain_corpus),
                "holdout_corpus": str(demo.holdout_corpus),
            }
            http.post("/v1/models", json=model).raise_for_status()
            http.post("/v1/forget-requests", json=request_body(name, f"setup-{j}", 1)).raise_for_status()
            batch = http.post("/v1/admin/batches", params={"model": name})
            batch.raise_for_status()
            ids += [job["id"] for job in batch.json()["jobs"]]
    if len(ids) != jobs:
        raise RuntimeError(f"expected {jobs} queued jobs, got {len(ids)}")
    return ids


# --- One configuration, the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    workers: int
    tally: Tally
    seconds: float  # measured window
    wall: float  # seconds the clients ran, warm-up included
    server_cpu: float  # CPU seconds of the API processes meanwhile
    client_cpu: float  # CPU seconds of this bench meanwhile
    audit: Audit

    @property
    def posts(self) -> int:
        return len(self.tally.post_ms)

    @property
    def gets(self) -> int:
        return len(self.tally.get_ms)


def measure(workers: int, args: argparse.Namespace, demo: DemoModel, work_dir: Path, log: Log) -> Row:
    with fresh_database(args.admin_url, log) as database_url:
        admin_key, load_key, load_key_id = create_keys(database_url)
        data_dir = work_dir / f"data-{workers}"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("UNLEARND_")},
            "UNLEARND_DATABASE_URL": database_url,
            "UNLEARND_BROKER_URL": args.broker_url,
            "UNLEARND_DATA_DIR": str(data_dir),
            # the bench measures the API, not the per-key rate limit: one key sends everything
            "UNLEARND_RATE_LIMIT_PER_MINUTE": "1e9",
            "UNLEARND_RATE_LIMIT_BURST": "1000000",
        }
        with api_server(workers, args.port, env, work_dir, log) as server:
            jobs = queued_jobs(server.base_url, admin_key, demo, args.jobs)
            log(f"{len(jobs)} queued jobs; {args.clients} clients for {args.warmup:g}+{args.duration:g} s")
            mix = Mix(args.get_fraction, args.replay_fraction, args.conflict_fraction, args.race_fraction, args.items)
            client_cpu, server_cpu, started = time.process_time(), server.cpu_seconds(), time.monotonic()
            tally, seconds = asyncio.run(
                run_clients(
                    server.base_url, load_key, jobs, args.clients, args.duration, args.warmup, mix, args.seed,
                    args.timeout,
                )
            )  # fmt: skip
            wall = time.monotonic() - started
            server_cpu, client_cpu = server.cpu_seconds() - server_cpu, time.process_time() - client_cpu
        result = audit(tally.answers, read_stored(database_url, load_key_id))
    row = Row(workers, tally, seconds, wall, server_cpu, client_cpu, result)
    log(
        f"workers {workers}: {row.posts} POSTs, {row.gets} GETs measured in {seconds:.1f} s; "
        f"{result.checked} request ids checked, lost {result.lost}, duplicates {result.duplicates}, "
        f"{result.unacknowledged} stored without an answer; POST answers {dict(sorted(tally.statuses.items()))}; "
        f"errors {dict(tally.errors) or 0}"
    )
    return row


def _percentiles(samples: list[float]) -> tuple[str, str]:
    if len(samples) < 2:
        return "-", "-"
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return f"{cuts[49]:.1f}", f"{cuts[98]:.1f}"


COLUMNS = (
    "API workers", "POST/s", "accepted/s", "POST p50 ms", "POST p99 ms", "GET job/s", "GET p50 ms", "GET p99 ms",
    "errors", "lost", "duplicates", "API CPU", "API CPU ms/req", "client CPU",
)  # fmt: skip


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table, one row per number of API worker processes."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        post, get = _percentiles(r.tally.post_ms), _percentiles(r.tally.get_ms)
        cells = [
            str(r.workers),
            f"{r.posts / r.seconds:.0f}",
            f"{r.tally.created / r.seconds:.0f}",
            *post,
            f"{r.gets / r.seconds:.0f}",
            *get,
            str(sum(r.tally.errors.values())),
            str(r.audit.lost),
            str(r.audit.duplicates),
            f"{r.server_cpu / r.wall:.0%}",
            f"{1000 * r.server_cpu / r.tally.answered:.1f}",
            f"{r.client_cpu / r.wall:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _worker_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers, e.g. 1,2") from exc
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers, e.g. 1,2")
    return counts


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("a fraction between 0 and 1")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--workers", type=_worker_counts, default="1,2", help="API worker process counts, one row each")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients, each one request at a time")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per row")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring (still audited)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a client gives up on one answer")
    p.add_argument("--seed", type=int, default=0, help="seeds every client's sequence of operations")
    mix = p.add_argument_group("the operations")
    mix.add_argument("--get-fraction", type=_fraction, default=0.5, help="operations that GET /v1/jobs/{id}")
    mix.add_argument("--replay-fraction", type=_fraction, default=0.1, help="POSTs replaying an accepted body")
    mix.add_argument("--conflict-fraction", type=_fraction, default=0.02, help="POSTs reusing an id with a new body")
    mix.add_argument("--race-fraction", type=_fraction, default=0.02, help="new POSTs sent twice at once")
    mix.add_argument("--items", type=int, default=2, help="text items per submitted request")
    mix.add_argument("--jobs", type=int, default=4, help="queued jobs created before the load, for the GETs")
    system = p.add_argument_group("the system under test")
    system.add_argument(
        "--admin-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL URL allowed to create and drop databases; each row gets a fresh one",
    )
    system.add_argument(
        "--broker-url",
        default="filesystem://",
        help="the servers' Celery broker, used only to enqueue the --jobs setup jobs (default: files under the "
        "bench's temporary directory; a redis:// URL keeps those job messages in its `gpu` queue, so give one no "
        "worker consumes)",
    )
    system.add_argument("--port", type=int, default=0, help=f"the server's port on {HOST}; 0: a free one")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.warmup < 0 or args.jobs < 1 or args.items < 1:
        raise SystemExit("--clients, --jobs and --items must be at least 1, --duration positive, --warmup >= 0")
    if args.replay_fraction + args.conflict_fraction + args.race_fraction > 1:
        raise SystemExit("--replay-fraction + --conflict-fraction + --race-fraction must be at most 1")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    # Ctrl-C and SIGTERM unwind through the clean-ups that stop the server and drop the database; SIGTERM goes
    # through SIGINT because asyncio.run then cancels the clients' tasks instead of raising inside one of them.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    work_dir = Path(tempfile.mkdtemp(prefix="unlearnd-load-"))
    try:
        log("building the tiny demo model to register")
        demo = build_demo_model(work_dir / "demo", size="tiny", seed=0)
        rows = [measure(workers, args, demo, work_dir, log) for workers in args.workers]
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the server was stopped and the database dropped") from None
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    print(
        f"{args.clients} clients, {args.warmup:g} s warm-up + {args.duration:g} s per row; operations: "
        f"{args.get_fraction:.0%} GET /v1/jobs/{{id}} of {args.jobs} queued jobs, the rest POST /v1/forget-requests "
        f"({args.replay_fraction:.0%} replays, {args.conflict_fraction:.0%} conflicting bodies, "
        f"{args.race_fraction:.0%} sent twice at once, the rest new; {args.items} items each); seed {args.seed}."
    )
    print(
        "accepted/s counts 201s; POST/s and the POST latencies cover every POST answered; errors are answers "
        "other than expected or failed connections; lost and duplicates come from the database audit; API CPU and "
        "client CPU are the API processes' and this bench's CPU time over the run's wall time (100% = one core), "
        "API CPU ms/req the API processes' CPU time per answered request (PostgreSQL's own is not counted).\n"
    )
    print(format_table(rows))
    if any(r.audit.lost or r.audit.duplicates for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
