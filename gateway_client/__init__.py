"""The Job Gateway's reference Python client. Django-free.

``from gateway_client import GatewayClient`` for the API; ``gateway-client``
(or ``python -m gateway_client``) runs the worker. The gateway itself imports only
``gateway_client.signing``, so the client's modules (httpx, websockets) load
on first use rather than with the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The package's version (gateway_client/pyproject.toml reads it from here).
__version__ = "1.0.0"

if TYPE_CHECKING:
    from gateway_client.client import GatewayClient, LeasedJob, PublishResult
    from gateway_client.errors import (
        AuthError,
        BadFilter,
        BadRequest,
        CredentialError,
        GatewayError,
        GatewayUnreachable,
        LeaseLost,
        RateLimited,
        Unavailable,
    )
    from gateway_client.filters import JobFilter

_EXPORTS = {
    "GatewayClient": "gateway_client.client",
    "LeasedJob": "gateway_client.client",
    "PublishResult": "gateway_client.client",
    "AuthError": "gateway_client.errors",
    "BadFilter": "gateway_client.errors",
    "BadRequest": "gateway_client.errors",
    "CredentialError": "gateway_client.errors",
    "GatewayError": "gateway_client.errors",
    "GatewayUnreachable": "gateway_client.errors",
    "LeaseLost": "gateway_client.errors",
    "RateLimited": "gateway_client.errors",
    "Unavailable": "gateway_client.errors",
    "JobFilter": "gateway_client.filters",
}

__all__ = [
    "AuthError",
    "BadFilter",
    "BadRequest",
    "CredentialError",
    "GatewayClient",
    "GatewayError",
    "GatewayUnreachable",
    "JobFilter",
    "LeaseLost",
    "LeasedJob",
    "PublishResult",
    "RateLimited",
    "Unavailable",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway_client' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
