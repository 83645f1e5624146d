"""The worker's settings, read from the environment; a bad value stops it loudly."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gateway_client.client import DEFAULT_BASE_URL, first_credential
from gateway_client.errors import CredentialError
from gateway_client.filters import NO_FILTER, JobFilter

# The gateway holds a long-poll at most 30 s; 25 stays clear of proxies that
# cut idle requests at 30.
MAX_WAIT = 25.0
# WHERE holds several clauses; a comma cannot part them ("players>=1,250").
WHERE_SEPARATOR = ";"
# Time left, inside TIMEOUT, for the answer to a long-poll to arrive.
ANSWER_MARGIN = 5.0
MAX_CONCURRENCY = 1000


class ConfigError(ValueError):
    """A setting is missing or does not parse; the message names it."""


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker reads from its environment.

    The credentials are left out of ``repr()`` (and so of ``str()``): a config
    printed in a log line or a traceback must not carry them.
    """

    base_url: str
    api_key: str = field(repr=False)
    hmac_secret: str = field(repr=False)
    concurrency: int = 4
    timeout: float = 30.0
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    retries: int = 0
    log_level: str = "INFO"
    # Which jobs to ask for: WHERE, CHANNELS and TIER (docs/filters.md).
    job_filter: JobFilter = NO_FILTER
    # --lease S: each job is leased for S seconds and acked once written.
    lease: int | None = None

    @property
    def wait(self) -> float:
        """The long-poll wait: min(25, TIMEOUT - 5); 0 (plain polling) if short."""
        return max(0.0, min(MAX_WAIT, self.timeout - ANSWER_MARGIN))

    @property
    def answer_timeout(self) -> float:
        """What TIMEOUT leaves for the answer once the long-poll wait is spent."""
        return self.timeout - self.wait

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerConfig:
        """Read the settings; raise ``ConfigError`` naming the first bad one."""
        initial = _seconds(env, "INITIAL_BACKOFF", 0.5)
        maximum = _seconds(env, "MAX_BACKOFF", 30.0)
        if maximum < initial:
            raise ConfigError(
                f"MAX_BACKOFF ({maximum:g}) must not be less than "
                f"INITIAL_BACKOFF ({initial:g})"
            )
        return cls(
            base_url=_base_url(env),
            api_key=_credential(env, "API_KEY"),
            hmac_secret=_credential(env, "HMAC_SECRET"),
            concurrency=_integer(env, "CONCURRENCY", 4, 1, MAX_CONCURRENCY),
            timeout=_seconds(env, "TIMEOUT", 30.0),
            initial_backoff=initial,
            max_backoff=maximum,
            retries=_integer(env, "RETRIES", 0, 0, None),
            log_level=_log_level(env),
            job_filter=_job_filter(env),
        )


def _raw(env: Mapping[str, str], name: str) -> str | None:
    # Blank counts as unset: env files often carry "NAME=" placeholders.
    value = env.get(name, "").strip()
    return value or None


def _base_url(env: Mapping[str, str]) -> str:
    value = _raw(env, "BASE_URL") or DEFAULT_BASE_URL
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"BASE_URL must be an http:// or https:// URL, not {value!r}")
    return value.rstrip("/")


def _credential(env: Mapping[str, str], name: str) -> str:
    value = _raw(env, name)
    # The first of a comma-separated list signs, as the gateway's rotation expects.
    if value is None or not value.replace(",", "").strip():
        # Never echo the value: it is a secret.
        raise ConfigError(f"{name} is required (the gateway's {name})")
    try:
        return first_credential(value, name)
    except CredentialError as exc:
        raise ConfigError(str(exc)) from None


def _integer(
    env: Mapping[str, str],
    name: str,
    default: int,
    minimum: int,
    maximum: int | None,
) -> int:
    value = _raw(env, name)
    if value is None:
        return default
    bound = f"from {minimum} to {maximum}" if maximum else f"{minimum} or more"
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum or (maximum and number > maximum):
        raise ConfigError(f"{name} must be a whole number {bound}, not {value!r}")
    return number


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    value = _raw(env, name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
    return number


def _log_level(env: Mapping[str, str]) -> str:
    value = (_raw(env, "LOG_LEVEL") or "INFO").upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(
            f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {value!r}"
        )
    return value


def _job_filter(env: Mapping[str, str]) -> JobFilter:
    where = [c for c in (_raw(env, "WHERE") or "").split(WHERE_SEPARATOR) if c.strip()]
    try:
        clauses = JobFilter.of(where=where).where
    except ValueError as exc:
        raise ConfigError(f"WHERE: {exc}") from None
    # CHANNELS is any comma-separated list and TIER any non-blank name: the
    # gateway judges both, when the worker first asks.
    return JobFilter(
        clauses,
        JobFilter.of(channels=_raw(env, "CHANNELS")).channels,
        _raw(env, "TIER"),
    )
