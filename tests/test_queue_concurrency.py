"""Processes drain one queue: every job claimed once, none lost, FIFO each.

Eight plain claimers, then filtered and plain claimers together. Runs on
SQLite and PostgreSQL (the database backend) and on Redis, each in a database
of its own, whatever the suite's stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.servers import REPO_ROOT, PostgresServer

pytestmark = pytest.mark.processes

JOBS = 2000
CLAIMERS = 8


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


# The longest module of the suite: under pytest-xdist, a worker per backend.
@pytest.fixture(
    params=[
        pytest.param(backend, marks=pytest.mark.xdist_group(f"queue-{backend}"))
        for backend in ("sqlite", "postgresql", "redis")
    ]
)
def queue_env(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """A migrated database of its own, and the queue backend to test."""
    # An empty REDIS_URL hides the services stack's Redis from the database runs.
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'queue.sqlite3'}",
        "QUEUE_BACKEND": "database",
        "REDIS_URL": "",
    }
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        name = f"queue_{os.getpid()}"
        env["DATABASE_URL"] = server.create_database(name)
    elif request.param == "redis":
        env["QUEUE_BACKEND"] = "redis"
        env["REDIS_URL"] = request.getfixturevalue("clean_redis")
    _run(env, "manage.py", "migrate", "--noinput", "-v0")
    yield env
    if request.param == "postgresql":
        server.drop_database(name)


def test_each_job_claimed_exactly_once_in_order(queue_env: dict[str, str]) -> None:
    seeded = json.loads(
        _run(queue_env, "-m", "tests.claimer", "seed", str(JOBS)).stdout
    )
    assert len(seeded) == JOBS

    claimers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.claimer", "claim", f"10.0.0.{n}"],
            cwd=REPO_ROOT,
            env={**os.environ, **queue_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(CLAIMERS)
    ]
    results = []
    for process in claimers:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err
        results.append(json.loads(out))

    everything = [job_id for claimed in results for job_id in claimed]
    assert sorted(everything) == sorted(seeded), "a job was lost or claimed twice"
    for claimed in results:
        assert claimed == sorted(claimed), "a claimer got a newer job before an older"
    # Every process took part: the claim really was concurrent.
    assert sum(1 for claimed in results if claimed) >= 2


# --- Filtered claims (docs/filters.md) ------------------------------------------

FILTER_JOBS = 900
FILTERED = 4
UNFILTERED = 2


def test_filtered_and_plain_claimers_take_each_job_once(
    queue_env: dict[str, str],
) -> None:
    seeded = json.loads(
        _run(queue_env, "-m", "tests.claimer", "seed", str(FILTER_JOBS)).stdout
    )
    rich = {job_id for n, job_id in enumerate(seeded) if n % 3 == 0}

    def start(name: str, *where: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.claimer", "claim", name, *where],
            cwd=REPO_ROOT,
            env={**os.environ, **queue_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    filtered = [start(f"10.0.1.{n}", "money>=10M") for n in range(FILTERED)]
    plain = [start(f"10.0.2.{n}") for n in range(UNFILTERED)]
    results: dict[str, list[list[int]]] = {"filtered": [], "plain": []}
    for kind, processes in (("filtered", filtered), ("plain", plain)):
        for process in processes:
            out, err = process.communicate(timeout=180)
            assert process.returncode == 0, err
            results[kind].append(json.loads(out))

    everything = [job for kind in results.values() for c in kind for job in c]
    assert sorted(everything) == sorted(seeded), "a job was lost or claimed twice"
    for claimed in results["filtered"]:
        assert set(claimed) <= rich, "a filtered claimer got a job it did not want"
        assert claimed == sorted(claimed), "a newer match came before an older"
    for claimed in results["plain"]:
        assert claimed == sorted(claimed)
    # The filtered claimers really competed, with each other and the rest.
    assert sum(1 for claimed in results["filtered"] if claimed) >= 2
