"""``python manage.py runpoller``: read the Discord channels, publish their jobs."""

from __future__ import annotations

import asyncio
import gc
import logging
from argparse import ArgumentParser
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from discord_poller.config import ConfigError, PollerConfig
from discord_poller.service import PollerFailed, serve


class Command(BaseCommand):
    help = (
        "Poll the Discord channels in CHANNEL_ID and publish each job through "
        "the gateway's POST /job. Run exactly one. SIGTERM or SIGINT stops it."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--once",
            action="store_true",
            help="read every channel until caught up, publish, and exit",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            config = PollerConfig.from_settings(settings)
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        # httpx logs every request at INFO: several a second per channel would
        # drown the one line per published job.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        # Django and the apps, loaded by now, live as long as the process.
        # Frozen, the collector's full passes skip them: shorter pauses in the
        # poll loop, and an exit well within a second of SIGTERM.
        gc.freeze()
        try:
            asyncio.run(serve(config, once=options["once"]))
        except PollerFailed as exc:
            raise CommandError(str(exc)) from None
