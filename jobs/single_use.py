"""Single-use values that must not be forgotten: v2 nonces and WebSocket tickets.

Each value is kept for its whole lifetime, whatever the traffic in between
and across restarts: a store that evicts under load, or empties when the
process restarts, would let a captured request be replayed.

With ``REDIS_URL`` the store is Redis, so every replica sees what any other
has remembered or consumed; the two operations that must be atomic are one
Redis command each (``SET NX`` and ``GETDEL``), so two requests racing on
different replicas cannot both win. Redis is spoken to directly (the async
client of ``jobs.redis_clients``) rather than through Django's cache, whose
async methods hop to a thread.

Without Redis it is the database (``jobs.models.SingleUse``), which the
embedded default already keeps on disk: each operation is one statement on
the primary key, atomic for any number of processes. Expired rows are
deleted by whichever call first finds ``PRUNE_EVERY_SECONDS`` gone by.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections

from jobs.db import in_db_thread
from jobs.models import SingleUse
from jobs.redis_clients import async_client

PREFIX = "gateway:once:"
# How often a process deletes the database's expired rows (seconds).
PRUNE_EVERY_SECONDS = 60.0

_TABLE = SingleUse._meta.db_table
# Inserted, or taken over from a row whose time is up: one row changed either
# way. A live row is left alone and nothing changes. (SQLite and PostgreSQL.)
_ADD = (
    f'INSERT INTO {_TABLE} ("key", value, expires_at) VALUES (%s, %s, %s) '  # noqa: S608
    'ON CONFLICT ("key") DO UPDATE SET value = excluded.value, '
    f"expires_at = excluded.expires_at WHERE {_TABLE}.expires_at <= %s"
)
_TAKE = f'DELETE FROM {_TABLE} WHERE "key" = %s RETURNING value, expires_at'  # noqa: S608
_PRUNE = f"DELETE FROM {_TABLE} WHERE expires_at <= %s"  # noqa: S608

_last_prune = 0.0


async def add(key: str, value: str, ttl: int) -> bool:
    """Store ``value`` under ``key`` for ``ttl`` seconds unless the key exists.

    True when this call stored it: the first to ask wins, once.
    """
    if settings.REDIS_URL:
        name = PREFIX + key
        return bool(await async_client().set(name, value, nx=True, ex=ttl))
    now = time.time()
    if _prune_due(now):
        await _prune_in_thread(now)
    changed, _ = await _execute(_ADD, [key, value, now + ttl, now])
    return changed == 1


async def take(key: str) -> str | None:
    """Remove ``key`` and return its value; None if absent, expired or taken.

    Of any number of simultaneous calls, exactly one gets the value.
    """
    if settings.REDIS_URL:
        raw = await async_client().getdel(PREFIX + key)
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)
    _, rows = await _execute(_TAKE, [key])
    if not rows or rows[0][1] <= time.time():
        return None
    return str(rows[0][0])


def prune(now: float | None = None) -> int:
    """Delete the database's expired values now; return how many went."""
    with connection.cursor() as cursor:
        cursor.execute(_PRUNE, [time.time() if now is None else now])
        return int(cursor.rowcount)


# --- The database, from the event loop --------------------------------------------

Rows = list[tuple[Any, ...]]


async def _execute(sql: str, params: list[Any]) -> tuple[int, Rows]:
    """Run one statement: rows changed, and rows returned.

    On SQLite, on the event loop's own thread when the write lock is free at
    once: the statement takes about 15 µs, and its hop to a worker thread cost
    five times that, for every v2 request (docs/security.md, "Nonces"). When
    another writer holds the lock the loop never waits for it: a worker thread
    does. The database is read from the settings, not from ``connection``,
    whose per-task lookup cost as much as the statement.
    """
    database = connections.settings[DEFAULT_DB_ALIAS]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        try:
            cursor = _loop_connection(str(database["NAME"])).cursor()
            try:
                return _run(cursor, sql.replace("%s", "?"), params)
            finally:
                cursor.close()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in (
                sqlite3.SQLITE_BUSY,
                sqlite3.SQLITE_LOCKED,
            ):
                raise
    return await _execute_in_thread(sql, params)


def _run(cursor: Any, sql: str, params: list[Any]) -> tuple[int, Rows]:
    cursor.execute(sql, params)
    # Every row read, or a RETURNING statement would stay open (and locked).
    rows = [tuple(row) for row in cursor.fetchall()] if cursor.description else []
    return int(cursor.rowcount), rows


@in_db_thread
def _execute_in_thread(sql: str, params: list[Any]) -> tuple[int, Rows]:
    with connection.cursor() as cursor:
        return _run(cursor, sql, params)


_loop_connections = threading.local()


def _loop_connection(name: str) -> sqlite3.Connection:
    """This thread's own connection to SQLite file ``name``, one that never waits."""
    held: tuple[str, sqlite3.Connection] | None = getattr(
        _loop_connections, "held", None
    )
    if held is None or held[0] != name:
        # Autocommit; a busy database raises at once (timeout 0) instead of
        # blocking the loop; the file's WAL mode is set by Django's connections.
        conn = sqlite3.connect(name, timeout=0, isolation_level=None)
        conn.execute("PRAGMA synchronous=NORMAL")
        held = (name, conn)
        _loop_connections.held = held
    return held[1]


def _prune_due(now: float) -> bool:
    # Either way: a clock set back must not put off the next prune.
    return abs(now - _last_prune) >= PRUNE_EVERY_SECONDS


@in_db_thread
def _prune_in_thread(now: float) -> None:
    global _last_prune
    if _prune_due(now):
        _last_prune = now
        prune(now)
