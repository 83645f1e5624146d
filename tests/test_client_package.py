"""The Python client as an installed package, outside the repository.

``pip install ./gateway_client`` into a fresh virtualenv (its dependencies
resolved from the package index, as a user's would be), then: the version, the
``py.typed`` marker read by mypy, and the ``gateway-client`` worker pulling a
job from a real gateway, started from a folder where the repository cannot be
imported.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

import gateway_client
from gateway_client import GatewayClient
from testkit.servers import REPO_ROOT
from tests.conftest import LiveGateway
from tests.test_worker_process import WorkerProcess

pytestmark = [
    pytest.mark.backends,
    pytest.mark.processes,
    pytest.mark.usefixtures("empty_redis"),
]

DISTRIBUTION = "job-gateway-client"
_INSTALL_TIMEOUT = 300


@dataclass(frozen=True)
class Installed:
    """A virtualenv holding the installed client, and a folder outside the repo."""

    venv: Path
    outside: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def env(self, **extra: str) -> dict[str, str]:
        """Only what a user's shell would have: no PYTHONPATH into the repo."""
        return {
            "PATH": f"{self.venv / 'bin'}:{os.environ.get('PATH', '')}",
            "HOME": str(self.outside),
            **extra,
        }

    def run(self, *argv: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(arg) for arg in argv],
            cwd=self.outside,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=_INSTALL_TIMEOUT,
            check=False,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """``pip install ./gateway_client`` into a new virtualenv, as the docs say."""
    root = tmp_path_factory.mktemp("client-package")
    venv, outside = root / "venv", root / "elsewhere"
    outside.mkdir()
    subprocess.run(
        [sys.executable, "-m", "venv", str(venv)],
        check=True,
        timeout=_INSTALL_TIMEOUT,
    )
    package = Installed(venv, outside)
    pip = package.run(
        package.python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        REPO_ROOT / "gateway_client",
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return package


def test_the_package_installs_with_its_version_its_dependencies_and_its_cli(
    installed: Installed,
) -> None:
    shown = installed.run(
        installed.python,
        "-c",
        "import importlib.metadata as m, gateway_client as g; "
        f"print(g.__file__); print(g.__version__); print(m.version({DISTRIBUTION!r}))",
    )
    assert shown.returncode == 0, shown.stderr
    where, version, metadata_version = shown.stdout.split()
    # Imported from the virtualenv, not from the repository.
    assert Path(where).is_relative_to(installed.venv)
    assert version == metadata_version == gateway_client.__version__
    assert (Path(where).parent / "py.typed").is_file()

    # httpx and websockets came as declared dependencies, and are consistent.
    check = installed.run(installed.python, "-m", "pip", "check")
    assert check.returncode == 0, check.stdout
    requires = installed.run(
        installed.python,
        "-c",
        f"import importlib.metadata as m; print(m.requires({DISTRIBUTION!r}))",
    )
    assert "httpx" in requires.stdout and "websockets" in requires.stdout

    cli = installed.run(installed.venv / "bin" / "gateway-client", "--version")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == f"gateway-client {gateway_client.__version__}"


def test_the_installed_package_is_typed(installed: Installed) -> None:
    """mypy reads the client's annotations through ``py.typed``."""
    (installed.outside / "use.py").write_text(
        "from gateway_client import GatewayClient\n"
        "\n"
        'client = GatewayClient("http://127.0.0.1:8", api_key="k", hmac_secret="s")\n'
        "url: int = client.base_url\n"
    )
    mypy = [sys.executable, "-m", "mypy", "--strict", "--no-incremental"]
    against = [
        "--config-file",
        os.devnull,
        "--python-executable",
        str(installed.python),
    ]
    result = subprocess.run(
        [*mypy, *against, "use.py"],
        cwd=installed.outside,
        capture_output=True,
        text=True,
        timeout=_INSTALL_TIMEOUT,
        check=False,
    )
    # One error, the deliberate one: base_url is a str. Without py.typed, mypy
    # would report the import instead ("missing library stubs or py.typed").
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'expression has type "str", variable has type "int"' in result.stdout
    assert "Found 1 error" in result.stdout, result.stdout


@asynccontextmanager
async def installed_worker(
    installed: Installed, gateway: LiveGateway
) -> AsyncIterator[WorkerProcess]:
    """``gateway-client`` from the virtualenv, in a folder outside the repository."""
    process = await asyncio.create_subprocess_exec(
        installed.venv / "bin" / "gateway-client",
        cwd=installed.outside,
        env=installed.env(
            BASE_URL=gateway.base_url,
            API_KEY=gateway.api_key,
            HMAC_SECRET=gateway.hmac_secret,
            CONCURRENCY="1",
        ),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    running = WorkerProcess(process)
    try:
        yield running
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        running.stderr_reader.cancel()


async def test_the_installed_worker_pulls_from_a_real_gateway(
    installed: Installed, live_gateway: LiveGateway
) -> None:
    job_id = f"package-{uuid.uuid4()}"
    async with (
        installed_worker(installed, live_gateway) as worker,
        GatewayClient(
            live_gateway.base_url,
            api_key=live_gateway.api_key,
            hmac_secret=live_gateway.hmac_secret,
        ) as publisher,
    ):
        await publisher.publish({"job_id": job_id})
        [printed] = await worker.jobs(1)
        assert printed["job_id"] == job_id
        assert await worker.stop(signal.SIGTERM) == 0, worker.stderr
    assert "Traceback" not in worker.stderr
