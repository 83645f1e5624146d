"""The worker's command line: ``gateway-client``, or ``python -m gateway_client``
(see docs/python-client.md)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from gateway_client import __version__
from gateway_client.config import ConfigError, WorkerConfig
from gateway_client.filters import JobFilter
from gateway_client.worker import run

# Exit codes: 0 stopped by a signal, 1 a fatal error, 2 bad usage or settings.
EXIT_USAGE = 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; settings come from the environment."""
    parser = argparse.ArgumentParser(
        prog=_program_name(),
        description=(
            "Print the gateway's jobs, one JSON line each. Settings come from "
            "BASE_URL, API_KEY, HMAC_SECRET, CONCURRENCY, TIMEOUT, "
            "INITIAL_BACKOFF, MAX_BACKOFF, RETRIES, LOG_LEVEL and, for the "
            "filter, WHERE (clauses separated by ;), CHANNELS and TIER; the "
            "filter options below replace those."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    parser.add_argument(
        "--ws",
        action="store_true",
        help="follow the /ws push stream (every job) instead of pulling (each once)",
    )
    parser.add_argument(
        "--where",
        metavar="CLAUSE",
        action="append",
        type=_clause,
        help="only jobs matching this clause, e.g. 'money_per_sec>=10M'; "
        "repeat it: every clause must hold",
    )
    parser.add_argument(
        "--channels", metavar="A,B", help="only jobs from these channels"
    )
    parser.add_argument(
        "--tier", metavar="NAME", type=_tier, help="only jobs of this named tier"
    )
    parser.add_argument(
        "--lease",
        metavar="SECONDS",
        type=_lease,
        help="pull each job under a lease of SECONDS (1-300), acked once written: "
        "a job this worker dies holding goes back to the queue",
    )
    parser.add_argument(
        "--since",
        metavar="ID",
        type=_job_id,
        help="with --ws: first replay the jobs after this id",
    )
    args = parser.parse_args(argv)
    if not args.ws and args.since is not None:
        parser.error("--since needs --ws")
    if args.ws and args.lease is not None:
        parser.error("--lease pulls: it cannot go with --ws")
    return args


def _program_name() -> str:
    # The name it was started by: the console script, or python -m.
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if not name or name in ("__main__.py", "-c"):
        return "python -m gateway_client"
    return name


def _clause(value: str) -> str:
    try:
        return JobFilter.of(where=value).where[0]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _lease(value: str) -> int:
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= 300):
        raise argparse.ArgumentTypeError(f"must be 1 to 300 seconds, not {value!r}")
    return int(value)


def _tier(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must be a tier's name")
    return value.strip()


def with_options(config: WorkerConfig, args: argparse.Namespace) -> WorkerConfig:
    """The settings, with the filter options given on the command line in place."""
    env_filter = config.job_filter
    try:
        job_filter = JobFilter.of(
            args.where or env_filter.where,
            env_filter.channels if args.channels is None else args.channels,
            env_filter.tier if args.tier is None else args.tier,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return dataclasses.replace(config, job_filter=job_filter, lease=args.lease)


def _job_id(value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise argparse.ArgumentTypeError(f"must be a job id, not {value!r}")
    return int(value)


def main(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> int:
    """Run the worker; return the process exit code."""
    args = parse_args(argv)
    try:
        config = with_options(
            WorkerConfig.from_env(os.environ if env is None else env), args
        )
    except ConfigError as exc:
        print(f"gateway_client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=config.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO: one line per job would drown the rest.
    for noisy in ("httpx", "httpcore", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return asyncio.run(run(config, ws=args.ws, since=args.since))
    except KeyboardInterrupt:
        # Ctrl-C before the signal handlers were installed: still a clean stop.
        return 0


if __name__ == "__main__":
    sys.exit(main())
