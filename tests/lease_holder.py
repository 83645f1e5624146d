"""A worker that leases jobs and never finishes them, until it is killed.

``python -m tests.lease_holder BASE_URL SECONDS`` (with ``API_KEY`` and
``HMAC_SECRET`` in its environment) leases jobs with three long-polls, prints
each as a JSON line (``{"id", "token", "expires_at"}``), then holds it: the
fault tests SIGKILL it holding leases, and check that every job it held comes
back once.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from gateway_client import GatewayClient

LOOPS = 3


async def hold(base_url: str, seconds: int) -> None:
    """Lease jobs forever; print each one leased."""
    api_key, secret = os.environ["API_KEY"], os.environ["HMAC_SECRET"]
    async with GatewayClient(base_url, api_key=api_key, hmac_secret=secret) as client:

        async def loop() -> None:
            while True:
                leased = await client.lease_job(seconds, wait=1)
                if leased is not None:
                    line = {
                        "id": leased.id,
                        "token": leased.token,
                        "expires_at": leased.expires_at,
                    }
                    print(json.dumps(line), flush=True)

        await asyncio.gather(*(loop() for _ in range(LOOPS)))


if __name__ == "__main__":
    asyncio.run(hold(sys.argv[1], int(sys.argv[2])))
