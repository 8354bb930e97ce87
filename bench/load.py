"""The API's intake under load: wrk (a compiled HTTP load generator, Debian's `wrk` package) against `unlearnd serve`
on PostgreSQL and Redis, for main's code and this tree's in one run, then an audit of every answer in the database.

    python -m bench.load                                # main vs this tree: 16 and 32 clients, about 3 minutes
    python -m bench.load --baseline-ref '' --duration 5 # this tree only, quickly

Each code tree (--baseline-ref, checked out into a temporary `git worktree`, then this one) gets a fresh database
(migrated by that tree), an admin key, `unlearnd serve --workers 1` run from that tree (PYTHONPATH), --job-models
models registered over the API with --requests-per-job requests each, batched into that many queued jobs (no Celery
worker runs), then, one after the other:
- for each --clients count, --warmup seconds of wrk and --duration measured seconds of POST /v1/forget-requests
  (bench/load.lua): new subject_request_ids (expect 201), --replay-fraction re-sends of an accepted body (expect 200
  and the original id) and --conflict-fraction accepted ids with another body (expect 409), with a write key of its
  own, audited afterwards: every request id answered must be stored under its subject_request_id (a 201's row
  holding the body sent), else it is lost; a subject_request_id with more than one request id, in answers or rows,
  counts the extra ones as duplicates;
- --get-clients connections polling GET /v1/jobs?limit=50, the dashboard's job list, for --duration seconds.
The API's CPU time (its process group, from /proc) is read before and after each measured window: API CPU ms per
request is the primary figure, since it does not depend on the load generator or the neighbours. wrk's own CPU is
reported too. The server is stopped, the database dropped and the worktree removed also on errors, Ctrl-C and
SIGTERM. Exit status 1 if anything was lost or duplicated.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
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
from tests.service.databases import create_database, drop_database
from tests.service.processes import free_port, stop, wait_until
from worker.demo_model import DemoModel, build_demo_model

HOST = "127.0.0.1"
MODEL_NAME = "load-bench"
JOBS_PATH = "/v1/jobs?limit=50"
SERVER_START_SECONDS = 120.0
SERVER_STOP_SECONDS = 30.0
ROOT = Path(__file__).resolve().parents[1]
LUA = Path(__file__).with_suffix(".lua")
EXPECTED = {"new": 201, "replay": 200, "conflict": 409}
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


def request_body(model: str, subject: str, items: int, variant: str = "") -> dict:
    """The body bench/load.lua sends for this subject (and variant, for a conflicting re-send)."""
    texts = (
        f"{subject}{variant} item {i}: Alex Example, 1 Sample Road, Testville, +00 000 {i:04d}" for i in range(items)
    )
    return {"subject_request_id": subject, "model": model, "items": [{"text": t} for t in texts]}


# --- wrk: one measured window ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    replay_fraction: float
    conflict_fraction: float
    items: int  # per submitted request


@dataclass
class Window:
    """What one wrk run saw, with the API's and wrk's CPU seconds meanwhile."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    socket_errors: int
    api_cpu: float
    client_cpu: float
    statuses: Counter[str]  # "kind status" -> answers (POST); "get status" is not recorded, see errors
    answers: list[Answer]
    errors: int  # answers other than expected, and socket errors

    @property
    def accepted(self) -> int:
        return self.statuses["new 201"]


_SUMMARY = re.compile(r"^BENCH (.*)$", re.MULTILINE)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrk(server: Server, lua_args: Sequence[str], clients: int, seconds: float) -> tuple[dict[str, int], float, float]:
    """Run wrk for `seconds` with `clients` connections; its BENCH summary, and the API's and wrk's CPU seconds."""
    command = [
        "wrk", "--threads", str(min(2, clients)), "--connections", str(clients),
        "--duration", f"{max(1, round(seconds))}s", "--timeout", "30s", "--script", str(LUA), server.base_url,
        "--", *lua_args,
    ]  # fmt: skip
    api_cpu, client_cpu = server.cpu_seconds(), _children_cpu()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    api_cpu, client_cpu = server.cpu_seconds() - api_cpu, _children_cpu() - client_cpu
    found = _SUMMARY.search(result.stdout)
    if found is None:
        raise RuntimeError(f"wrk printed no summary:\n{result.stdout}\n{result.stderr}")
    summary = {name: int(value) for name, value in (pair.split("=") for pair in found[1].split())}
    return summary, api_cpu, client_cpu


def read_answers(prefix: Path, mix: Mix) -> tuple[Counter[str], list[Answer]]:
    """The answers bench/load.lua's threads wrote: a count per kind and status, and the 200s and 201s to audit."""
    statuses: Counter[str] = Counter()
    answers = []
    for path in sorted(prefix.parent.glob(f"{prefix.name}-*.txt")):
        for line in path.read_text().splitlines():
            kind, status, subject, request_id = line.split(" ")
            statuses[f"{kind} {status}"] += 1
            if status in ("200", "201"):
                digest = body_digest(ForgetRequestCreate.model_validate(request_body(MODEL_NAME, subject, mix.items)))
                answers.append(Answer(subject, uuid.UUID(request_id), digest, status == "201"))
    return statuses, answers


def post_window(server: Server, key: str, clients: int, seconds: float, mix: Mix, out: Path, seed: int) -> Window:
    """POST /v1/forget-requests for `seconds` (subject_request_ids unique to `out`'s name)."""
    run = out.name
    lua_args = [
        "post", key, str(out), run, MODEL_NAME, str(mix.items), str(mix.replay_fraction), str(mix.conflict_fraction),
        str(seed),
    ]  # fmt: skip
    summary, api_cpu, client_cpu = wrk(server, lua_args, clients, seconds)
    statuses, answers = read_answers(out, mix)
    unexpected = sum(n for what, n in statuses.items() if int(what.split()[1]) != EXPECTED.get(what.split()[0]))
    return _window(summary, api_cpu, client_cpu, statuses, answers, unexpected)


def get_window(server: Server, key: str, clients: int, seconds: float, out: Path) -> Window:
    """GET /v1/jobs?limit=50 for `seconds`; non-2xx answers count as errors."""
    lua_args = ["get", key, str(out), "-", JOBS_PATH, "0", "0", "0", "0"]
    summary, api_cpu, client_cpu = wrk(server, lua_args, clients, seconds)
    return _window(summary, api_cpu, client_cpu, Counter(), [], summary["status"])


def _window(summary: dict[str, int], api_cpu: float, client_cpu: float, statuses: Counter[str],
            answers: list[Answer], unexpected: int) -> Window:  # fmt: skip
    socket_errors = sum(summary[k] for k in ("connect", "read", "write", "timeout"))
    return Window(
        requests=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        socket_errors=socket_errors,
        api_cpu=api_cpu,
        client_cpu=client_cpu,
        statuses=statuses,
        answers=answers,
        errors=unexpected + socket_errors,
    )


# --- The system under test ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeTree:
    label: str  # the git ref, or "this tree"
    root: Path  # the folder holding its app/, worker/ and migrations/


@contextlib.contextmanager
def code_trees(baseline_ref: str, work_dir: Path, log: Log) -> Iterator[list[CodeTree]]:
    """The baseline's tree (a temporary `git worktree` of `baseline_ref`, if one is given) and this one."""
    if not baseline_ref:
        yield [CodeTree("this tree", ROOT)]
        return
    checkout = work_dir / "baseline"
    git = ["git", "-C", str(ROOT)]
    subprocess.run([*git, "worktree", "add", "--detach", "--quiet", str(checkout), baseline_ref], check=True)
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", baseline_ref], capture_output=True, text=True).stdout
        log(f"baseline: {baseline_ref} ({commit.strip()}) checked out at {checkout}")
        yield [CodeTree(baseline_ref, checkout), CodeTree("this tree", ROOT)]
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(checkout)], check=False)


def tree_env(tree: CodeTree, settings: dict[str, str]) -> dict[str, str]:
    """The environment of a process that runs `tree`'s code: PYTHONPATH first, so it wins over this checkout's
    editable install, and only the given UNLEARND_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARND_")}
    return {**env, **settings, "PYTHONPATH": str(tree.root)}


@contextlib.contextmanager
def fresh_database(admin_url: str, tree: CodeTree, log: Log) -> Iterator[str]:
    """A new database migrated by `tree`'s own migrations; dropped on the way out."""
    url = create_database(admin_url, f"unlearnd_load_{uuid.uuid4().hex[:10]}")
    try:
        migrate = [sys.executable, "-m", "worker.cli", "migrate"]
        subprocess.run(migrate, env=tree_env(tree, {"UNLEARND_DATABASE_URL": url}), check=True, capture_output=True)
        log(f"database {make_url(url).database} created and migrated by {tree.label}")
        yield url
    finally:
        drop_database(admin_url, url)
        log(f"database {make_url(url).database} dropped")


def create_keys(database_url: str, writers: int) -> tuple[str, list[tuple[str, int]], str]:
    """An admin key for the setup, `writers` write+read keys (one per POST window, so each is audited alone: the
    secret and the key id) and a read key for the job polls."""
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            _, admin = create_key(session, "load bench admin", ["admin"], actor="bench")
            keys = [
                create_key(session, f"load bench writer {i}", ["requests:write", "requests:read"], actor="bench")
                for i in range(writers)
            ]
            _, reader = create_key(session, "load bench poller", ["requests:read"], actor="bench")
            session.commit()
            return admin, [(secret, key.id) for key, secret in keys], reader
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
    process_group: int  # the API process (uvicorn with one worker runs the app in its own process)

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
def api_server(env: dict[str, str], work_dir: Path, log: Log) -> Iterator[Server]:
    """`unlearnd serve` (one worker) in its own process group, until it has started; stopped on the way out."""
    port = free_port()
    with socket.socket() as probe:
        if probe.connect_ex((HOST, port)) == 0:
            raise SystemExit(f"something already listens on {HOST}:{port}")
    log_path = work_dir / "serve.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "serve", "--host", HOST, "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work_dir, start_new_session=True,
        )  # fmt: skip
    base_url = f"http://{HOST}:{port}"
    try:
        _wait_ready(process, base_url, log_path)
        yield Server(base_url, process.pid)
    finally:
        stop(process, SERVER_STOP_SECONDS)
        log(f"server stopped (exit {process.returncode})")


def _wait_ready(process: subprocess.Popen, base_url: str, log_path: Path) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200
        return False

    wait_until(ready, SERVER_START_SECONDS, f"the server ({log_path})")


def queued_jobs(base_url: str, admin_key: str, demo: DemoModel, models: int, requests_per_job: int) -> int:
    """Register the demo model `models` times (the load's model first), submit `requests_per_job` requests to each
    and batch them: one queued job per model (a model has one unfinished job at a time). Returns the jobs' count."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as http:
        for m in range(models):
            name = MODEL_NAME if m == 0 else f"{MODEL_NAME}-{m}"
            model = {
                "name": name,
                "path": str(demo.model_dir),
                "retain_corpus": str(demo.retain_corpus),
                "holdout_corpus": str(demo.holdout_corpus),
            }
            http.post("/v1/models", json=model).raise_for_status()
            for r in range(requests_per_job):
                body = request_body(name, f"setup-{m}-{r}", 1)
                if answer_of(body, http.post("/v1/forget-requests", json=body)) is None:
                    raise RuntimeError(f"setup request {body['subject_request_id']} was refused")
        batch = http.post("/v1/admin/batches")
        batch.raise_for_status()
    jobs = len(batch.json()["jobs"])
    if jobs != models:
        raise RuntimeError(f"expected {models} queued jobs, got {jobs}")
    return jobs


# --- One code tree, the table --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    tree: str
    load: str  # "POST" or the polled path
    clients: int
    window: Window
    audit: Audit | None  # POST windows only


def server_settings(database_url: str, broker_url: str, data_dir: Path) -> dict[str, str]:
    """The server's environment: its database, Redis and folder."""
    return {
        "UNLEARND_DATABASE_URL": database_url,
        "UNLEARND_BROKER_URL": broker_url,
        "UNLEARND_DATA_DIR": str(data_dir),
        # the bench measures the API, not the per-key rate limit (still checked in Redis on every request)
        "UNLEARND_RATE_LIMIT_PER_MINUTE": "1e9",
        "UNLEARND_RATE_LIMIT_BURST": "1000000",
    }


def measure(tree: CodeTree, args: argparse.Namespace, demo: DemoModel, work_dir: Path, log: Log) -> list[Row]:
    mix = Mix(args.replay_fraction, args.conflict_fraction, args.items)
    tree_dir = work_dir / re.sub(r"[^A-Za-z0-9]+", "-", tree.label)
    tree_dir.mkdir()
    with fresh_database(args.admin_url, tree, log) as database_url:
        admin_key, writers, reader_key = create_keys(database_url, len(args.clients))
        settings = server_settings(database_url, args.broker_url, tree_dir / "data")
        with api_server(tree_env(tree, settings), tree_dir, log) as server:
            jobs = queued_jobs(server.base_url, admin_key, demo, args.job_models, args.requests_per_job)
            log(f"{tree.label}: server on {server.base_url}, {jobs} queued jobs")
            rows = []
            for (key, key_id), clients in zip(writers, args.clients, strict=True):
                if args.warmup > 0:
                    post_window(server, key, clients, args.warmup, mix, tree_dir / f"warm{clients}", args.seed)
                window = post_window(server, key, clients, args.duration, mix, tree_dir / f"post{clients}", args.seed)
                warm = read_answers(tree_dir / f"warm{clients}", mix)[1] if args.warmup > 0 else []
                result = audit([*warm, *window.answers], read_stored(database_url, key_id))
                rows.append(Row(tree.label, "POST /v1/forget-requests", clients, window, result))
                log(f"{tree.label}, {clients} clients: {dict(sorted(window.statuses.items()))}; {result}")
            if args.warmup > 0:
                get_window(server, reader_key, args.get_clients, args.warmup, tree_dir / "warm-get")
            window = get_window(server, reader_key, args.get_clients, args.duration, tree_dir / "get")
            rows.append(Row(tree.label, f"GET {JOBS_PATH}", args.get_clients, window, None))
            log(f"{tree.label}, job polls: {window.requests} answered, {window.errors} errors")
    return rows


COLUMNS = (
    "code", "load", "clients", "answers/s", "accepted/s", "p50 ms", "p99 ms", "API CPU", "API CPU ms/req",
    "wrk CPU", "errors", "lost", "duplicates",
)  # fmt: skip


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table, one row per code tree and load."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        w = r.window
        cells = [
            r.tree,
            r.load,
            str(r.clients),
            f"{w.requests / w.seconds:.0f}",
            f"{w.accepted / w.seconds:.0f}" if r.audit else "-",
            f"{w.p50_ms:.1f}",
            f"{w.p99_ms:.1f}",
            f"{w.api_cpu / w.seconds:.0%}",
            f"{1000 * w.api_cpu / max(1, w.requests):.2f}",
            f"{w.client_cpu / w.seconds:.0%}",
            str(w.errors),
            str(r.audit.lost) if r.audit else "-",
            str(r.audit.duplicates) if r.audit else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: Sequence[Row]) -> list[str]:
    """This tree against the baseline, per load: API CPU per request and throughput."""
    by_tree: defaultdict[str, dict[tuple[str, int], Window]] = defaultdict(dict)
    for r in rows:
        by_tree[r.tree][(r.load, r.clients)] = r.window
    if len(by_tree) < 2:
        return []
    (base_label, base), (ours_label, ours) = list(by_tree.items())
    lines = []
    for (load, clients), w in ours.items():
        b = base[(load, clients)]
        cpu = (b.api_cpu / max(1, b.requests)) / max(1e-9, w.api_cpu / max(1, w.requests))
        rate = (w.requests / w.seconds) / max(1e-9, b.requests / b.seconds)
        lines.append(f"{load}, {clients} clients: {ours_label} uses 1/{cpu:.1f} of {base_label}'s API CPU per "
                     f"request and answers {rate:.1f}x the requests per second")  # fmt: skip
    return lines


def _client_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers, e.g. 16,32") from exc
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers, e.g. 16,32")
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
    p.add_argument("--baseline-ref", default="main", help="git ref measured first, as the baseline; '' for none")
    p.add_argument("--clients", type=_client_counts, default="16,32", help="wrk connections of the POST windows")
    p.add_argument("--get-clients", type=int, default=16, help="wrk connections polling the job list")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per window")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each window (audited, not timed)")
    p.add_argument("--seed", type=int, default=0, help="seeds each wrk thread's choice of operations")
    mix = p.add_argument_group("the operations")
    mix.add_argument("--replay-fraction", type=_fraction, default=0.1, help="POSTs replaying an accepted body")
    mix.add_argument("--conflict-fraction", type=_fraction, default=0.02, help="POSTs reusing an id with a new body")
    mix.add_argument("--items", type=int, default=2, help="text items per submitted request")
    mix.add_argument("--job-models", type=int, default=50, help="models registered, each with one queued job")
    mix.add_argument("--requests-per-job", type=int, default=8, help="requests batched into each queued job")
    system = p.add_argument_group("the system under test")
    system.add_argument(
        "--admin-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL URL allowed to create and drop databases; each code tree gets a fresh one",
    )
    system.add_argument(
        "--broker-url",
        default="redis://127.0.0.1:6379/15",
        help="the servers' Redis (the rate limiter's buckets, and the setup jobs' messages in its `gpu` queue, so "
        "give one no worker consumes)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.duration < 1 or args.warmup < 0 or args.items < 1 or args.job_models < 1 or args.requests_per_job < 1:
        raise SystemExit("--duration must be at least 1, --warmup >= 0, --items, --job-models, --requests-per-job >= 1")
    if args.replay_fraction + args.conflict_fraction > 1:
        raise SystemExit("--replay-fraction + --conflict-fraction must be at most 1")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    # Ctrl-C and SIGTERM unwind through the clean-ups that stop the server, drop the database, remove the worktree.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    work_dir = Path(tempfile.mkdtemp(prefix="unlearnd-load-"))
    try:
        log("building the tiny demo model to register")
        demo = build_demo_model(work_dir / "demo", size="tiny", seed=0)
        with code_trees(args.baseline_ref, work_dir, log) as trees:
            rows = [row for tree in trees for row in measure(tree, args, demo, work_dir, log)]
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the server was stopped, the database dropped, the worktree removed") from None
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    print(
        f"wrk, {args.warmup:g} s warm-up + {args.duration:g} s per window; POSTs of {args.items} items "
        f"({args.replay_fraction:.0%} replays, {args.conflict_fraction:.0%} conflicting bodies, the rest new), then "
        f"{args.get_clients} connections polling GET {JOBS_PATH} over {args.job_models} queued jobs of "
        f"{args.requests_per_job} requests; one API worker, PostgreSQL, Redis; seed {args.seed}."
    )
    print(
        "answers/s counts every answer, accepted/s the 201s; p50/p99 per HTTP request (wrk); API CPU and wrk CPU "
        "are the API process's and wrk's CPU time over the window (100% = one core); API CPU ms/req the API's CPU "
        "time per answer (PostgreSQL's and Redis' not counted); errors are answers other than expected and socket "
        "errors; lost and duplicates come from the database audit of the window's write key (warm-up included).\n"
    )
    print(format_table(rows))
    for line in ratios(rows):
        print(line)
    if any(r.audit and (r.audit.lost or r.audit.duplicates) for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
