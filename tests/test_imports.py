"""The benchmarks import nothing from the test suite; ``jobs`` no server library.

``bench/`` runs on its own (``python -m bench.X``); what it shares with the
tests (the server starters, the fake Discord) lives in ``testkit/``, which
must not reach back into ``tests/`` either. Checked twice: every import
statement, and every module path given as a string (``python -m
tests.fakes.discord`` in a child process is an import too), read from the
source; then each bench module imported in a fresh interpreter in which
``tests`` cannot be imported, which also catches an import made at run time
or through another package.

What reaches into daphne, Twisted or autobahn lives in the server seam,
``gateway_project/server``: no module of ``jobs/`` imports them.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from testkit.servers import REPO_ROOT

CHECKED = ("bench", "testkit")
FORBIDDEN = "tests"
# The test suite or one of its modules, whole: "tests", "tests.fakes.discord".
_MODULE_PATH = re.compile(rf"{FORBIDDEN}(\.\w+)*")


def _imports_of_tests(source: str) -> list[tuple[int, str]]:
    """Each (line, module) of ``source`` that names a module of ``tests``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
    return [
        (line, name) for line, name in sorted(found) if _MODULE_PATH.fullmatch(name)
    ]


def _modules(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py"))


def test_the_check_sees_each_way_of_naming_a_test_module() -> None:
    source = (
        "import tests.stack\n"
        "from tests.conftest import LiveGateway\n"
        "from tests import stack\n"
        "args = ['-m', 'tests.fakes.discord']\n"
        "from testkit.servers import REPO_ROOT\n"
        "import testsuite\n"
        '"""tests of the load test"""\n'
    )
    assert _imports_of_tests(source) == [
        (1, "tests.stack"),
        (2, "tests.conftest"),
        (3, "tests"),
        (4, "tests.fakes.discord"),
    ]


def test_bench_and_testkit_name_no_test_module() -> None:
    modules = [path for package in CHECKED for path in _modules(package)]
    assert any(path.name == "loadtest.py" for path in modules)
    offending = [
        f"{path.relative_to(REPO_ROOT)}:{line}: {name}"
        for path in modules
        for line, name in _imports_of_tests(path.read_text("utf-8"))
    ]
    assert offending == []


def test_every_bench_module_imports_without_the_test_suite() -> None:
    names = [
        ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
        for path in _modules("bench")
    ]
    names = [name.removesuffix(".__init__") for name in names]
    script = (
        "import importlib, sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] == {FORBIDDEN!r}:\n"
        "            raise ImportError(f'bench imported {name}')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        f"names = {names!r}\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(names))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"imported {len(names)}"


SERVER_LIBRARIES = ("daphne", "autobahn", "twisted")


def _imported_modules(source: str) -> list[tuple[int, str]]:
    """Each (line, module) an import statement of ``source`` names."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return sorted(found)


def test_no_module_of_jobs_imports_a_server_library() -> None:
    modules = _modules("jobs")
    assert any(path.name == "consumers.py" for path in modules)
    offending = [
        f"{path.relative_to(REPO_ROOT)}:{line}: {name}"
        for path in modules
        for line, name in _imported_modules(path.read_text("utf-8"))
        if name.split(".")[0].lower() in SERVER_LIBRARIES
    ]
    assert offending == []


def test_the_seam_is_where_the_server_libraries_are_imported() -> None:
    seam = _modules("gateway_project/server")
    imported = {
        name.split(".")[0].lower()
        for path in seam
        for _, name in _imported_modules(path.read_text("utf-8"))
    }
    assert set(SERVER_LIBRARIES) <= imported
