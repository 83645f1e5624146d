"""The deploy: Render's blueprint, the Procfiles and the production settings.

``render.yaml`` is checked against the fields of Render's Blueprint spec that a
typo would most likely break, then against what this gateway needs. The
production settings run ``check --deploy`` with the blueprint's environment.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from jobs.management.commands import serve
from testkit.servers import REPO_ROOT, DaphneProcess

RENDER_HOST = "job-gateway.onrender.com"
# The web service's name on Render's private network, RENDER_SERVICE_NAME.
RENDER_INTERNAL_HOST = "job-gateway-a1b2"
SECRETS = ("API_KEY", "HMAC_SECRET", "DISCORD_TOKEN", "CHANNEL_ID")

# --- A small schema of Render's Blueprint spec ---------------------------------

TOP_LEVEL = {"services", "databases", "envVarGroups", "previews", "projects"}
RUNTIMES = {"python", "node", "ruby", "go", "rust", "elixir", "docker", "image"}
_CODE = {"name", "runtime", "buildCommand", "startCommand"}
REQUIRED = {
    "web": _CODE,
    "worker": _CODE,
    "pserv": _CODE,
    "cron": {*_CODE, "schedule"},
    "keyvalue": {"name", "ipAllowList"},
}
_CODE_FIELDS = {
    *_CODE,
    "type", "repo", "branch", "rootDir", "plan", "region", "envVars",
    "numInstances", "scaling", "preDeployCommand", "autoDeploy",
    "autoDeployTrigger", "buildFilter", "disk", "maxShutdownDelaySeconds",
    "dockerCommand", "dockerfilePath", "dockerContext", "registryCredential",
    "image", "previews",
}  # fmt: skip
ALLOWED = {
    "web": {*_CODE_FIELDS, "healthCheckPath", "domains"},
    "worker": _CODE_FIELDS,
    "pserv": _CODE_FIELDS,
    "cron": {*_CODE_FIELDS, "schedule"},
    "keyvalue": {"type", "name", "plan", "region", "ipAllowList", "maxmemoryPolicy"},
}
DATABASE_FIELDS = {
    "name", "plan", "region", "databaseName", "user", "ipAllowList",
    "postgresMajorVersion", "diskSizeGB", "highAvailability", "readReplicas",
    "previewPlan", "previewDiskSizeGB",
}  # fmt: skip
SOURCES = {"value", "sync", "generateValue", "fromDatabase", "fromService"}
DATABASE_PROPERTIES = {
    "connectionString",
    "host",
    "port",
    "user",
    "password",
    "database",
}
SERVICE_PROPERTIES = {
    "keyvalue": {"connectionString", "host", "port"},
    "web": {"host", "port", "hostport"},
    "pserv": {"host", "port", "hostport"},
}


def blueprint_problems(doc: dict[str, Any]) -> list[str]:
    """Everything in a parsed blueprint that Render's spec would not accept."""
    problems = [f"unknown top-level key {key!r}" for key in set(doc) - TOP_LEVEL]
    services = doc.get("services", [])
    databases = {db.get("name") for db in doc.get("databases", [])}
    groups = {group.get("name") for group in doc.get("envVarGroups", [])}
    declared = {(s.get("type"), s.get("name")) for s in services}
    for db in doc.get("databases", []):
        problems += [f"database: unknown {k!r}" for k in set(db) - DATABASE_FIELDS]
        if "name" not in db:
            problems.append("database without a name")
    for service in services:
        kind, name = service.get("type"), service.get("name", "?")
        if kind not in REQUIRED:
            problems.append(f"{name}: unknown type {kind!r}")
            continue
        problems += [f"{name}: {k} missing" for k in REQUIRED[kind] - set(service)]
        problems += [f"{name}: unknown {k!r}" for k in set(service) - ALLOWED[kind]]
        if "runtime" in service and service["runtime"] not in RUNTIMES:
            problems.append(f"{name}: unknown runtime {service['runtime']!r}")
        for var in service.get("envVars", []):
            problems += _env_var_problems(name, var, databases, declared, groups)
    for group in doc.get("envVarGroups", []):
        for var in group.get("envVars", []):
            where = f"group {group.get('name')}"
            if {"fromDatabase", "fromService", "fromGroup"} & set(var):
                problems.append(f"{where}: {var.get('key')} references in a group")
            problems += _env_var_problems(where, var, databases, declared, set())
    return problems


def _env_var_problems(
    where: str,
    var: dict[str, Any],
    databases: set[str],
    services: set[tuple[str, str]],
    groups: set[str],
) -> list[str]:
    if set(var) == {"fromGroup"}:
        ok = var["fromGroup"] in groups
        return [] if ok else [f"{where}: no env group {var['fromGroup']!r}"]
    key = var.get("key", "?")
    problems = [f"{where}: {key}: unknown {k!r}" for k in set(var) - SOURCES - {"key"}]
    sources = SOURCES & set(var)
    if "key" not in var or len(sources) != 1:
        return [*problems, f"{where}: {key} needs a key and exactly one source"]
    (source,) = sources
    value = var[source]
    if source == "value" and not isinstance(value, str):
        problems.append(f"{where}: {key}: quote the value, {value!r}")
    elif source == "sync" and value is not False:
        problems.append(f"{where}: {key}: sync may only be false")
    elif source == "generateValue" and value is not True:
        problems.append(f"{where}: {key}: generateValue may only be true")
    elif source == "fromDatabase" and (
        value.get("name") not in databases
        or value.get("property") not in DATABASE_PROPERTIES
    ):
        problems.append(f"{where}: {key}: bad fromDatabase {value!r}")
    elif source == "fromService":
        target = (value.get("type"), value.get("name"))
        properties = SERVICE_PROPERTIES.get(value.get("type"), set())
        named = value.get("property") in properties or "envVarKey" in value
        if target not in services or not named:
            problems.append(f"{where}: {key}: bad fromService {value!r}")
    return problems


# --- The blueprint ----------------------------------------------------------------


@pytest.fixture(scope="module")
def blueprint() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO_ROOT / "render.yaml").read_text())
    return doc


def services_of(doc: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [s for s in doc["services"] if s["type"] == kind]


def env_of(doc: dict[str, Any], service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The service's variables by key, its env groups' included."""
    groups = {g["name"]: g["envVars"] for g in doc.get("envVarGroups", [])}
    variables: dict[str, dict[str, Any]] = {}
    for var in service.get("envVars", []):
        for item in groups[var["fromGroup"]] if "fromGroup" in var else [var]:
            variables[item["key"]] = item
    return variables


def test_the_blueprint_follows_renders_spec(blueprint: dict[str, Any]) -> None:
    assert blueprint_problems(blueprint) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d.update(service=[]), "unknown top-level key 'service'"),
        (lambda d: d["services"][0].pop("startCommand"), "startCommand missing"),
        (lambda d: d["services"][0].update(healthcheck="/"), "unknown 'healthcheck'"),
        (
            lambda d: d["services"][0]["envVars"].append(
                {"key": "X", "value": "1", "sync": False}
            ),
            "X needs a key and exactly one source",
        ),
        (
            lambda d: d["services"][0]["envVars"].append(
                {"key": "D", "fromDatabase": {"name": "nope", "property": "host"}}
            ),
            "D: bad fromDatabase",
        ),
        (
            lambda d: d["services"][0]["envVars"].append(
                {"key": "R", "fromService": {"type": "redis", "name": "kv"}}
            ),
            "R: bad fromService",
        ),
        (
            lambda d: d["services"][0]["envVars"].append({"key": "N", "value": 1}),
            "N: quote the value",
        ),
        (
            lambda d: d["services"][0]["envVars"].append({"fromGroup": "nope"}),
            "no env group 'nope'",
        ),
    ],
)
def test_the_schema_check_catches_mistakes(change: Any, problem: str) -> None:
    doc: dict[str, Any] = {
        "services": [
            {
                "type": "web",
                "name": "w",
                "runtime": "python",
                "buildCommand": "b",
                "startCommand": "s",
                "envVars": [],
            },
            {"type": "keyvalue", "name": "kv", "ipAllowList": []},
        ]
    }
    assert blueprint_problems(doc) == []
    change(doc)
    assert any(problem in found for found in blueprint_problems(doc))


def test_the_web_service_serves_daphne_behind_renders_proxy(
    blueprint: dict[str, Any],
) -> None:
    (web,) = services_of(blueprint, "web")
    # manage.py serve: daphne on 0.0.0.0:$PORT, WEB_CONCURRENCY processes.
    assert web["startCommand"] == "python manage.py serve"
    with socket.socket() as listener:
        argv = serve.daphne_argv(listener, [])
    assert argv[-1] == "gateway_project.asgi:application"
    assert " --ping-interval 20 --ping-timeout 30 " in " ".join(argv)
    # The client's address comes from TRUSTED_PROXY_COUNT, never daphne's guess.
    assert "--proxy-headers" not in argv
    assert web["healthCheckPath"] == "/healthz"
    assert "collectstatic --noinput" in web["buildCommand"]
    assert web["preDeployCommand"] == "python manage.py migrate --noinput"
    env = env_of(blueprint, web)
    assert env["TRUSTED_PROXY_COUNT"] == {"key": "TRUSTED_PROXY_COUNT", "value": "1"}
    assert env["HTTPS_ONLY"]["value"] == "true"
    assert env["STATIC_MANIFEST"]["value"] == "true"
    assert env["DJANGO_SECRET_KEY"].get("generateValue") is True


def test_exactly_one_poller_runs(blueprint: dict[str, Any]) -> None:
    (worker,) = services_of(blueprint, "worker")
    assert worker["startCommand"] == "python manage.py runpoller"
    assert worker["numInstances"] == 1
    assert "scaling" not in worker
    needs = {*SECRETS, "SERVICE_BASE_URL", "DATABASE_URL"}
    assert needs <= set(env_of(blueprint, worker))


def test_the_poller_reaches_the_gateway_over_the_private_network(
    blueprint: dict[str, Any],
) -> None:
    (web,) = services_of(blueprint, "web")
    (worker,) = services_of(blueprint, "worker")
    # Wired from the web service itself: no URL to copy by hand.
    assert env_of(blueprint, worker)["SERVICE_BASE_URL"] == {
        "key": "SERVICE_BASE_URL",
        "fromService": {"type": "web", "name": web["name"], "property": "hostport"},
    }
    # Render keeps port 10000 (its default PORT) for public traffic: the
    # gateway listens on another, which the private network reaches too.
    port = env_of(blueprint, web)["PORT"]["value"]
    assert port.isdigit() and int(port) not in (10000, 18012, 18013, 19099)
    # manage.py serve listens on PORT unless told otherwise.
    assert web["startCommand"] == "python manage.py serve"


def test_nothing_is_entered_by_hand_but_the_secrets(blueprint: dict[str, Any]) -> None:
    entered = {
        key
        for service in blueprint["services"]
        for key, var in env_of(blueprint, service).items()
        if var.get("sync") is False
    }
    assert entered == set(SECRETS)


def test_secrets_are_entered_in_render_not_committed(
    blueprint: dict[str, Any],
) -> None:
    seen = set()
    for service in blueprint["services"]:
        for key, var in env_of(blueprint, service).items():
            if key in SECRETS:
                seen.add(key)
                assert var == {"key": key, "sync": False}
    assert seen == set(SECRETS)
    # The gateway and the poller must sign with the same key: one group.
    web, worker = services_of(blueprint, "web")[0], services_of(blueprint, "worker")[0]
    for key in ("API_KEY", "HMAC_SECRET"):
        assert env_of(blueprint, web)[key] is env_of(blueprint, worker)[key]


def test_redis_and_postgresql_are_wired_and_internal_only(
    blueprint: dict[str, Any],
) -> None:
    (kv,) = services_of(blueprint, "keyvalue")
    (db,) = blueprint["databases"]
    assert kv["ipAllowList"] == [] and db["ipAllowList"] == []
    # A queue must never lose jobs to eviction.
    assert kv["maxmemoryPolicy"] == "noeviction"
    for service in blueprint["services"]:
        if service["type"] == "keyvalue":
            continue
        env = env_of(blueprint, service)
        assert env["DATABASE_URL"]["fromDatabase"] == {
            "name": db["name"],
            "property": "connectionString",
        }
        assert env["REDIS_URL"]["fromService"] == {
            "type": "keyvalue",
            "name": kv["name"],
            "property": "connectionString",
        }


def test_every_python_service_runs_the_same_python(blueprint: dict[str, Any]) -> None:
    python = [s for s in blueprint["services"] if s.get("runtime") == "python"]
    versions = {env_of(blueprint, s)["PYTHON_VERSION"]["value"] for s in python}
    # Render's default moves on; the pinned requirements are tested on 3.11.
    assert len(versions) == 1 and versions.pop().startswith("3.11.")


def test_retention_runs_on_a_schedule(blueprint: dict[str, Any]) -> None:
    (cron,) = services_of(blueprint, "cron")
    assert cron["startCommand"] == "python manage.py prunejobs"
    assert len(cron["schedule"].split()) == 5


# --- Procfiles --------------------------------------------------------------------


def procfile(name: str) -> dict[str, str]:
    lines = (REPO_ROOT / name).read_text().splitlines()
    pairs = (line.split(":", 1) for line in lines if re.match(r"^[\w-]+:", line))
    return {kind: command.strip() for kind, command in pairs}


def test_the_procfile_runs_what_render_runs(blueprint: dict[str, Any]) -> None:
    (web,) = services_of(blueprint, "web")
    (worker,) = services_of(blueprint, "worker")
    assert procfile("Procfile") == {
        "web": web["startCommand"],
        "worker": worker["startCommand"],
        "release": web["preDeployCommand"],
    }


def test_the_local_procfile_differs_only_in_the_bound_address() -> None:
    deployed, local = procfile("Procfile"), procfile("Procfile.dev")
    assert local["poller"] == deployed["worker"]
    assert local["web"] == deployed["web"] + " --bind ${HOST:-127.0.0.1}"


# --- Production settings ----------------------------------------------------------


def production_env(doc: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """The web service's environment on Render, with dummy secrets."""
    (web,) = services_of(doc, "web")
    settings_file = tmp_path / "settings.json"
    settings_file.write_text("{}")
    env = {
        "PATH": "/usr/bin:/bin",
        "SETTINGS_FILE": str(settings_file),
        "RENDER_EXTERNAL_HOSTNAME": RENDER_HOST,
        "RENDER_SERVICE_NAME": RENDER_INTERNAL_HOST,
    }
    for key, var in env_of(doc, web).items():
        if "value" in var:
            env[key] = var["value"]
        elif "generateValue" in var:
            env[key] = secrets.token_urlsafe(50)
        elif "fromDatabase" in var:
            env[key] = "postgresql://job_gateway:pw@127.0.0.1:1/job_gateway"
        elif "fromService" in var:
            env[key] = "redis://127.0.0.1:1/0"
        else:
            env[key] = f"dummy-{key.lower()}-{secrets.token_hex(8)}"
    return env


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_deploy_is_clean_with_the_blueprints_environment(
    blueprint: dict[str, Any], tmp_path: Path
) -> None:
    result = manage(
        production_env(blueprint, tmp_path), "check", "--deploy", "--fail-level",
        "WARNING",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


_COLLECT = """
import sys
import django
from django.conf import settings
from django.core.management import call_command
django.setup()
settings.STATIC_ROOT = sys.argv[1]
call_command("collectstatic", "--noinput", verbosity=0)
"""


def test_the_build_writes_the_manifest_the_servers_read(
    blueprint: dict[str, Any], tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _COLLECT, str(tmp_path / "static")],
        cwd=REPO_ROOT,
        env={
            **production_env(blueprint, tmp_path),
            "DJANGO_SETTINGS_MODULE": "gateway_project.settings",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "static" / "staticfiles.json").read_text())
    hashed = manifest["paths"]["admin/css/base.css"]
    assert re.fullmatch(r"admin/css/base\.[0-9a-f]{12}\.css", hashed)
    assert (tmp_path / "static" / f"{hashed}.gz").exists()


_DUMP = """
import json
from django.conf import settings
names = ["ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS", "SECURE_SSL_REDIRECT",
         "SECURE_REDIRECT_EXEMPT", "SECURE_PROXY_SSL_HEADER", "SESSION_COOKIE_SECURE",
         "CSRF_COOKIE_SECURE", "SECURE_HSTS_SECONDS", "SECURE_HSTS_PRELOAD"]
print(json.dumps({name: getattr(settings, name) for name in names}))
"""


def settings_in(env: dict[str, str]) -> dict[str, Any]:
    result = manage(env, "shell", "--no-imports", "-c", _DUMP)
    assert result.returncode == 0, result.stderr
    values: dict[str, Any] = json.loads(result.stdout)
    return values


def test_production_answers_to_renders_host_over_https_only(
    blueprint: dict[str, Any], tmp_path: Path
) -> None:
    values = settings_in(production_env(blueprint, tmp_path))
    assert RENDER_HOST in values["ALLOWED_HOSTS"]
    assert RENDER_INTERNAL_HOST in values["ALLOWED_HOSTS"]
    assert f"https://{RENDER_HOST}" in values["CSRF_TRUSTED_ORIGINS"]
    assert values["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert values["SECURE_SSL_REDIRECT"] is True
    assert any(re.search(p, "healthz") for p in values["SECURE_REDIRECT_EXEMPT"])
    assert values["SESSION_COOKIE_SECURE"] and values["CSRF_COOKIE_SECURE"]
    assert values["SECURE_HSTS_SECONDS"] >= 31_536_000
    assert values["SECURE_HSTS_PRELOAD"] is False


def test_local_runs_keep_plain_http(tmp_path: Path) -> None:
    settings_file = tmp_path / "settings.json"
    settings_file.write_text("{}")
    values = settings_in({"PATH": "/usr/bin:/bin", "SETTINGS_FILE": str(settings_file)})
    assert values["SECURE_SSL_REDIRECT"] is False
    assert values["SESSION_COOKIE_SECURE"] is False
    assert values["SECURE_HSTS_SECONDS"] == 0
    assert values["ALLOWED_HOSTS"] == ["localhost", "127.0.0.1", "[::1]"]


@pytest.fixture
def https_gateway(blueprint: dict[str, Any], tmp_path: Path) -> Iterator[DaphneProcess]:
    """daphne with the production settings, on SQLite and no Redis."""
    env = production_env(blueprint, tmp_path)
    env.update(DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}", REDIS_URL="")
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    with DaphneProcess(env=env) as gateway:
        yield gateway


@pytest.mark.processes
def test_https_only_redirects_the_admin_but_never_the_api_or_health(
    https_gateway: DaphneProcess,
) -> None:
    headers = {"Host": RENDER_HOST}
    with httpx.Client(base_url=https_gateway.base_url, headers=headers) as client:
        admin = client.get("/admin/")
        assert admin.status_code == 301
        assert admin.headers["Location"] == f"https://{RENDER_HOST}/admin/"
        secure = client.get("/admin/", headers={"X-Forwarded-Proto": "https"})
        assert secure.headers["Strict-Transport-Security"].startswith("max-age=")
        # A redirected POST would lose its body; the API answers as it is.
        assert client.post("/job", json={"job_id": "x"}).status_code == 401
        assert client.get("/healthz").status_code == 200


@pytest.mark.processes
def test_the_gateway_answers_to_its_private_host_name(
    https_gateway: DaphneProcess,
) -> None:
    with httpx.Client(base_url=https_gateway.base_url) as client:
        # As the poller sends it, to <host>:<port> over plain HTTP: past the
        # host check (unsigned, so 401), and never redirected to HTTPS.
        internal = {"Host": f"{RENDER_INTERNAL_HOST}:8000"}
        posted = client.post("/job", json={"job_id": "x"}, headers=internal)
        assert posted.status_code == 401, posted.text
        assert client.get("/healthz", headers=internal).status_code == 200
        # Any other host is still refused.
        other = {"Host": "someone-else-c3d4:8000"}
        refused = client.post("/job", json={"job_id": "x"}, headers=other)
        assert refused.status_code == 400
        assert refused.json()["error"] == "bad_host"
