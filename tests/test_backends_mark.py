"""The ``backends`` mark cannot be forgotten (tests/conftest.py).

A small test module, written to a temporary folder, runs in a pytest of its
own with this suite's plugins; each of its tests reaches the stack one way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from testkit.servers import REPO_ROOT

pytestmark = pytest.mark.processes

MODULE = """
import pytest
from channels.layers import get_channel_layer
from django.core.cache import cache

from tests.conftest import process_env


def test_db_unmarked(db):
    pass


def test_api_unmarked(api):
    pass


@pytest.mark.django_db
def test_django_db_mark_unmarked():
    pass


def test_cache_unmarked():
    cache.get("anything")


def test_layer_unmarked():
    get_channel_layer()


def test_process_env_unmarked():
    process_env()


def test_process_env_with_its_own_database_unmarked():
    process_env(DATABASE_URL="sqlite:///elsewhere.sqlite3")


def test_pure_unmarked():
    assert 1 + 1 == 2


@pytest.mark.backends
def test_db_marked(db):
    cache.get("anything")
    get_channel_layer()
    process_env()
"""


def test_a_test_reaching_the_stack_without_the_mark_fails_naming_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(MODULE))
    # The child is a run of its own on the embedded stack, not an xdist worker.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["GATEWAY_TEST_STACK"] = "embedded"
    argv = [sys.executable, "-m", "pytest", "-c", str(REPO_ROOT / "pyproject.toml")]
    argv += ["--rootdir", str(REPO_ROOT), "-p", "tests.conftest", "-n", "0"]
    argv += ["-p", "no:cacheprovider", "-q", "-rA", str(tmp_path / "test_sample.py")]
    result = subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    outcomes: dict[str, set[str]] = {"PASSED": set(), "FAILED": set(), "ERROR": set()}
    for line in output.splitlines():
        word, _, rest = line.partition(" ")
        if word in outcomes and "::" in rest:
            outcomes[word].add(rest.split("::")[1].split(" ")[0])
    # Setup errors for the fixtures and the mark; errors at teardown (after a
    # pass) for the cache and the layer; a failure where a process is handed
    # the stack's database.
    assert outcomes == {
        "ERROR": {
            "test_db_unmarked",
            "test_api_unmarked",
            "test_django_db_mark_unmarked",
            "test_cache_unmarked",
            "test_layer_unmarked",
        },
        "FAILED": {"test_process_env_unmarked"},
        "PASSED": {
            "test_cache_unmarked",
            "test_layer_unmarked",
            "test_process_env_with_its_own_database_unmarked",
            "test_pure_unmarked",
            "test_db_marked",
        },
    }, output
    mark_it = "mark it @pytest.mark.backends"
    for reason in (
        "test_db_unmarked uses db: " + mark_it,
        "test_api_unmarked uses api, transactional_db",
        "test_django_db_mark_unmarked uses the django_db mark",
        "test_cache_unmarked uses Django's cache: " + mark_it,
        "test_layer_unmarked uses the channel layer: " + mark_it,
        "test_process_env_unmarked hands the stack's database to another process",
    ):
        assert reason in output, output
