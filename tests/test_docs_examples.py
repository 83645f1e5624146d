"""Every example a reader may paste from the README and docs/ runs as written.

A shell or Python block preceded by ``<!-- runnable -->`` is run here, as a
reader would run it: from the root of a checkout that ``scripts/run`` has set
up (its ``.venv``, its ``.dev-secrets``), in a shell where those secrets are
exported (``set -a; . ./.dev-secrets; set +a``) and ``.venv/bin`` comes first
on the ``PATH``, against a real gateway (daphne) on ``$PORT``, also named by
``$BASE_URL``. Shell blocks run with ``bash -e``: any failing command fails the
block. Every other shell or Python block says why it is not run
(``<!-- not run: REASON -->``); a block marked neither fails the first test.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testkit.servers import REPO_ROOT, DaphneProcess
from tests.conftest import process_env

pytestmark = [
    pytest.mark.backends,
    pytest.mark.processes,
    pytest.mark.usefixtures("empty_redis"),
]

DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
CHECKED_LANGUAGES = {"sh", "bash", "shell", "console", "python", "py"}
RUNNABLE = re.compile(r"<!--\s*runnable\s*-->")
NOT_RUN = re.compile(r"<!--\s*not run:\s*\S.*-->")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
BLOCK_TIMEOUT = 60
# What scripts/run generates into .dev-secrets, one NAME=value line each.
DEV_SECRETS = ("API_KEY", "HMAC_SECRET", "DJANGO_SECRET_KEY")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language, its marker, its text."""

    document: Path
    line: int
    language: str
    marker: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(REPO_ROOT)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return RUNNABLE.fullmatch(self.marker) is not None

    @property
    def shell(self) -> bool:
        return self.language in ("sh", "bash", "shell", "console")


def blocks(document: Path) -> Iterator[Block]:
    """The fenced blocks of a Markdown file, with the line just before each."""
    lines = document.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, language = opening.groups()
        end = index + 1
        while end < len(lines) and not lines[end].startswith(fence):
            end += 1
        marker = lines[index - 1].strip() if index else ""
        code = "\n".join(lines[index + 1 : end]) + "\n"
        yield Block(document, index + 1, language.lower(), marker, code)
        index = end + 1


ALL_BLOCKS = [block for document in DOCUMENTS for block in blocks(document)]
RUNNABLE_BLOCKS = [block for block in ALL_BLOCKS if block.runnable]


def test_every_shell_and_python_block_is_runnable_or_says_why_not() -> None:
    unmarked = [
        block.name
        for block in ALL_BLOCKS
        if block.language in CHECKED_LANGUAGES
        and not (block.runnable or NOT_RUN.fullmatch(block.marker))
    ]
    assert not unmarked, (
        "mark each with <!-- runnable --> (tests/test_docs_examples.py runs it) "
        f"or <!-- not run: REASON --> on the line before its fence: {unmarked}"
    )
    # A marker on anything else is a mistake: nothing would run it.
    misplaced = [
        block.name
        for block in RUNNABLE_BLOCKS
        if block.language not in CHECKED_LANGUAGES
    ]
    assert not misplaced


def test_the_readme_signs_health_a_job_and_next_in_curl_and_in_python() -> None:
    readme = [block for block in RUNNABLE_BLOCKS if block.document.name == "README.md"]
    curl = [block.code for block in readme if block.shell and "curl" in block.code]
    python = [block.code for block in readme if block.language == "python"]
    assert curl and python
    for code in (curl[0], python[0]):
        for call in ("GET", "/health"), ("POST", "/job"), ("GET", "/job/next"):
            assert re.search(rf"{call[0]}\W+{re.escape(call[1])}\b", code), call
        assert re.search(r"Content-Type\W+application/json", code)


@dataclass(frozen=True)
class Checkout:
    """A folder laid out like a checkout after ``scripts/run``, and its gateway."""

    root: Path
    secrets: dict[str, str]
    gateway: DaphneProcess

    def run(self, block: Block) -> subprocess.CompletedProcess[str]:
        if block.shell:
            argv = ["bash", "-e", "-o", "pipefail", "-c", block.code]
        else:
            script = self.root / "example.py"
            script.write_text(block.code)
            argv = [str(self.root / ".venv" / "bin" / "python"), str(script)]
        env = {
            "PATH": f"{self.root / '.venv' / 'bin'}:{os.environ.get('PATH', '')}",
            "HOME": str(self.root),
            "LANG": "C.UTF-8",
            "PORT": str(self.gateway.port),
            "BASE_URL": self.gateway.base_url,
            "API_KEY": self.secrets["API_KEY"],
            "HMAC_SECRET": self.secrets["HMAC_SECRET"],
        }
        return subprocess.run(
            argv,
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            check=False,
        )


# Left out of the copy: the repository's history, and what scripts/run or a
# developer keeps in their own checkout.
_NOT_COPIED = {".git", ".venv", ".dev-secrets", "app_settings.json", "staticfiles"}


@pytest.fixture
def checkout(tmp_path: Path, transactional_db: None) -> Iterator[Checkout]:
    """The repository's files (linked), fresh development secrets, a gateway."""
    root = tmp_path / "job-gateway"
    root.mkdir()
    for entry in REPO_ROOT.iterdir():
        if entry.name not in _NOT_COPIED and not entry.name.startswith("db.sqlite3"):
            (root / entry.name).symlink_to(entry)
    (root / ".venv").symlink_to(Path(sys.prefix))
    made = {name: secrets.token_urlsafe(32) for name in DEV_SECRETS}
    dev_secrets = root / ".dev-secrets"
    dev_secrets.write_text("".join(f"{name}={made[name]}\n" for name in made))
    dev_secrets.chmod(0o600)
    env = process_env(API_KEY=made["API_KEY"], HMAC_SECRET=made["HMAC_SECRET"])
    with DaphneProcess(env=env) as gateway:
        yield Checkout(root, made, gateway)


@pytest.mark.parametrize("block", RUNNABLE_BLOCKS, ids=lambda block: block.name)
def test_a_runnable_block_runs_as_written(block: Block, checkout: Checkout) -> None:
    result = checkout.run(block)
    assert result.returncode == 0, (
        f"{block.name} exited {result.returncode}\n--- stdout\n{result.stdout}"
        f"\n--- stderr\n{result.stderr}"
    )
    for secret in checkout.secrets.values():
        assert secret not in result.stdout + result.stderr
    if block.document.name == "README.md" and "/job/next" in block.code:
        _assert_the_job_posted_is_the_job_pulled(block, result.stdout)


def _assert_the_job_posted_is_the_job_pulled(block: Block, output: str) -> None:
    answers = [_json(line) for line in output.splitlines() if line.startswith("{")]
    health, posted, pulled = answers
    assert health["ok"] is True, output
    assert posted["queued"] is True, output
    assert pulled["job"]["job_id"] == posted["job"]["job_id"], (block.name, output)


def _json(line: str) -> dict[str, Any]:
    value = json.loads(line)
    assert isinstance(value, dict)
    return value
