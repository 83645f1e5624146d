"""Where the gateway reaches into its server: daphne, Twisted, autobahn, and
private Django and Channels internals. Nothing else in the project does.

``apply()``, called once by ``gateway_project.asgi``, applies every patch
below after checking the releases it was written for (``WRITTEN_FOR``) and
the internals it relies on (each patch's ``problems``):

- a protection (the request body limit, daphne's access log redacted and
  escaped, no Twisted request log with whole URIs) and the API handler, which
  has no fallback, stop the server with one line (``ServerPatchError``) when
  they cannot be applied: never a half-applied patch, never an unprotected log;
- a speed patch that cannot be applied is left out, with one log line, and
  the server runs as daphne and Channels would run it.

``GATEWAY_SERVER_LEAVE_OUT`` (comma-separated patch names) leaves speed
patches out: for the benchmarks that measure what each earns
(docs/benchmarks.md), not for production.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger("gateway.server")

LEAVE_OUT_VARIABLE = "GATEWAY_SERVER_LEAVE_OUT"

# The releases (major.minor) every patch was written for and checked against.
# On another, a speed patch is left out and a protection stops the server:
# check the internals its ``problems`` names, then add the release here.
WRITTEN_FOR: dict[str, tuple[str, ...]] = {
    "daphne": ("4.2",),
    "Twisted": ("26.10",),
    "autobahn": ("26.11",),
    "channels": ("4.3",),
    "Django": ("5.2",),
}


class ServerPatchError(RuntimeError):
    """A required patch cannot be applied to the server installed: do not serve."""


@dataclass(frozen=True)
class Patch:
    """One change to the server, what it relies on, and whether it may be left out."""

    name: str  # as GATEWAY_SERVER_LEAVE_OUT names it
    title: str  # for the one line that says it cannot be applied
    libraries: tuple[str, ...]  # distributions whose internals it uses
    required: bool  # a protection, or no fallback: stop the server without it
    problems: Callable[[], list[str]]
    apply: Callable[[], None]


def patches(limit_for: Callable[[bytes], int | None]) -> list[Patch]:
    """Every patch, required ones first; ``limit_for`` gives a path's body limit."""
    from gateway_project.server import consumer, daphne_patches, log_patches

    return [
        Patch(
            "body_limit",
            "the request body limit",
            ("daphne", "Twisted"),
            True,
            daphne_patches.body_limit_problems,
            lambda: daphne_patches.refuse_large_bodies_unread(limit_for),
        ),
        Patch(
            "access_log_redaction",
            "the redaction of daphne's access log",
            ("daphne",),
            True,
            log_patches.access_log_problems,
            log_patches.redact_daphne_access_log,
        ),
        Patch(
            "twisted_request_log",
            "the removal of Twisted's request log",
            ("daphne", "Twisted"),
            True,
            log_patches.request_log_problems,
            log_patches.drop_twisted_request_log,
        ),
        Patch(
            "api_handler",
            "the API handler",
            ("Django",),
            True,
            _api_handler_problems,
            _nothing,  # used by gateway_project.asgi
        ),
        Patch(
            "form_bodies",
            "leaving form bodies to the application",
            ("daphne", "Twisted"),
            False,
            daphne_patches.form_bodies_problems,
            daphne_patches.leave_form_bodies_to_the_application,
        ),
        Patch(
            "frames_at_once",
            "sending WebSocket frames at once",
            ("daphne", "Twisted"),
            False,
            daphne_patches.frames_at_once_problems,
            daphne_patches.write_frames_at_once,
        ),
        Patch(
            "prepared_frames",
            "prepared frames",
            ("daphne", "autobahn"),
            False,
            daphne_patches.prepared_frames_problems,
            daphne_patches.offer_prepared_frames,
        ),
        Patch(
            "autobahn_debug",
            "lazy autobahn debug lines",
            ("autobahn",),
            False,
            log_patches.autobahn_debug_problems,
            log_patches.defer_autobahn_debug_formatting,
        ),
        Patch(
            "consumer_dispatch",
            "consumers without connection tidying",
            ("channels",),
            False,
            consumer.consumer_dispatch_problems,
            _nothing,  # used by websocket_consumer()
        ),
    ]


# The names of the patches applied by apply(), in this process.
applied: set[str] = set()


def apply(limit_for: Callable[[bytes], int | None]) -> None:
    """Apply every patch that can be; ``ServerPatchError`` if a required one cannot.

    The required patches are all checked before any patch is applied, so a
    server that refuses to start was not left half-patched.
    """
    every = patches(limit_for)
    names = {patch.name for patch in every}
    left_out = leave_out_requested()
    if unknown := sorted(left_out - names):
        raise ServerPatchError(f"{LEAVE_OUT_VARIABLE} names no patch {unknown}")
    why_not = {patch.name: why_not_applied(patch) for patch in every}
    for patch in every:
        if patch.required and patch.name in left_out:
            raise ServerPatchError(f"{patch.title} cannot be left out")
        if patch.required and why_not[patch.name]:
            raise ServerPatchError(
                f"{patch.title} cannot be applied: {why_not[patch.name]}"
            )
    for patch in every:
        if patch.name in left_out:
            reason = f"{LEAVE_OUT_VARIABLE} names it"
        else:
            reason = why_not[patch.name]
        if reason:
            logger.warning("Server patch %s left out: %s.", patch.name, reason)
        else:
            patch.apply()
            applied.add(patch.name)


def why_not_applied(patch: Patch) -> str:
    """Why ``patch`` cannot be applied here (other releases, changed internals)."""
    problems = [
        f"{name} {found} (written for {' or '.join(WRITTEN_FOR[name])})"
        for name in patch.libraries
        if not is_series(found := importlib.metadata.version(name), WRITTEN_FOR[name])
    ]
    if not problems:  # on another release, its internals are not read at all
        problems = patch.problems()
    return "; ".join(problems)


def leave_out_requested() -> set[str]:
    """The patches ``GATEWAY_SERVER_LEAVE_OUT`` names."""
    text = os.environ.get(LEAVE_OUT_VARIABLE, "")
    return {name.strip() for name in text.split(",") if name.strip()}


def is_series(version: str, series: tuple[str, ...]) -> bool:
    """Whether ``version`` is of one of the release series ``series`` names."""
    return any(version == one or version.startswith(one + ".") for one in series)


def api_application() -> Any:
    """The ASGI application of the signed API (``api_handler.ApiHandler``)."""
    from gateway_project.server.api_handler import ApiHandler

    return ApiHandler()


Consumer = TypeVar("Consumer", bound=type)


def websocket_consumer(consumer: Consumer) -> Consumer:
    """``consumer`` as served: without Channels' connection tidying, if applied."""
    if "consumer_dispatch" not in applied:
        return consumer
    from gateway_project.server.consumer import without_connection_tidying

    return without_connection_tidying(consumer)


def _api_handler_problems() -> list[str]:
    from gateway_project.server.api_handler import api_handler_problems

    return api_handler_problems()


def _nothing() -> None:
    """Applied where it is used."""
