"""Two code trees' API CPU per POST, interleaved: both servers up at once, short wrk windows alternated between them.

`bench/load.py` measures one tree after the other; on a shared machine the neighbours' load moves between the two,
and its per-request CPU moved by up to 20% between runs of the same code. Here each round runs one window per tree,
in alternating order, so a slow drift weighs on both alike: the medians over rounds, and in how many rounds each
tree used less CPU, compare the trees. It also counts the PostgreSQL sessions each window opened (from
`pg_stat_database`, independent of load). Same setup, server and POST mix as bench/load.py; no audit, no job polls.

    python -m bench.load_ab                      # main vs this tree, 8 rounds of 5 s at 32 clients: ~3 min
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from bench.load import (
    CodeTree,
    Mix,
    Server,
    api_server,
    code_trees,
    create_keys,
    fresh_database,
    post_window,
    queued_jobs,
    server_settings,
    tree_env,
)
from worker.demo_model import build_demo_model


def sessions_opened(admin_url: str, database: str) -> int:
    """Sessions PostgreSQL has established to `database` so far."""
    url = make_url(admin_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False)) as connection:
        row = connection.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (database,)).fetchone()
    return int(row[0])


def start(
    tree: CodeTree, args: argparse.Namespace, work_dir: Path, stack: contextlib.ExitStack
) -> tuple[Server, str, str, Path]:
    """The tree's server on a fresh database, with one write key: (server, key, database name, its folder)."""
    tree_dir = work_dir / re.sub(r"[^A-Za-z0-9]+", "-", tree.label)
    tree_dir.mkdir()
    database_url = stack.enter_context(fresh_database(args.admin_url, tree, log))
    admin_key, writers, _ = create_keys(database_url, 1)
    settings = server_settings(database_url, args.broker_url, tree_dir / "data")
    server: Server = stack.enter_context(api_server(tree_env(tree, settings), tree_dir, log))
    queued_jobs(server.base_url, admin_key, args.demo, 1, 1)  # the tiny demo model, registered
    return server, writers[0][0], make_url(database_url).database, tree_dir


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.load_ab", description=__doc__.split("\n")[0])
    p.add_argument("--baseline-ref", default="main", help="git ref compared with this tree")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0, help="per window")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--broker-url", default="redis://127.0.0.1:6379/15")
    args = p.parse_args()
    if not args.baseline_ref:
        p.error("--baseline-ref: a git ref is needed, this bench compares two trees")
    mix = Mix(replay_fraction=0.1, conflict_fraction=0.02, items=2)
    work_dir = Path(tempfile.mkdtemp(prefix="unlearnd-load-ab-"))
    try:
        args.demo = build_demo_model(work_dir / "demo", size="tiny", seed=0)
        with code_trees(args.baseline_ref, work_dir, log) as trees, contextlib.ExitStack() as stack:
            servers = {tree.label: start(tree, args, work_dir, stack) for tree in trees}
            cpu: dict[str, list[float]] = {label: [] for label in servers}
            for r in range(args.rounds):
                for label in list(servers)[:: 1 if r % 2 == 0 else -1]:
                    server, key, database, tree_dir = servers[label]
                    before = sessions_opened(args.admin_url, database)
                    window = post_window(server, key, args.clients, args.seconds, mix, tree_dir / f"round{r}", r)
                    opened = sessions_opened(args.admin_url, database) - before
                    cpu[label].append(1000 * window.api_cpu / max(1, window.requests))
                    log(f"round {r}, {label}: {cpu[label][-1]:.2f} ms/POST, {window.requests / window.seconds:.0f}"
                        f" answers/s, {opened} PostgreSQL sessions opened")  # fmt: skip
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    (base, base_cpu), (ours, ours_cpu) = cpu.items()
    wins = sum(o < b for o, b in zip(ours_cpu, base_cpu, strict=True))
    for label, values in cpu.items():
        rounds = [round(v, 2) for v in values]
        print(f"{label}: API CPU per POST median {statistics.median(values):.2f} ms; rounds {rounds}")
    print(f"{ours} used less CPU per POST than {base} in {wins} of {args.rounds} rounds; ratio of medians "
          f"{statistics.median(base_cpu) / statistics.median(ours_cpu):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
