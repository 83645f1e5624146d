"""A Luau VM that looks enough like a Roblox game server to run the client.

The Roblox reference client (``clients/roblox/JobGateway.luau``) runs in a real
Luau VM here, with the engine pieces it touches played by Python:

- ``game:GetService("HttpService")``: ``RequestAsync`` sends real HTTP with
  httpx and, like the engine, raises on a network failure, refuses locked
  headers and a body on GET; ``JSONEncode``/``JSONDecode`` follow the engine's
  table rules (an empty table encodes as ``[]``, ``null`` decodes to nothing;
  numbers are written as doubles, ``300.0``).
- ``game:GetService("RunService")``: ``IsServer``/``IsClient``.
- ``task``: a scheduler on a virtual clock. ``task.wait`` yields to it and
  returns at once in real time; ``RequestAsync`` yields too, as the engine
  does, so ``task.spawn`` returns before the request's answer is handled.
- ``DateTime.now()`` (real time plus the virtual clock's advance), ``warn``.

``bit32`` is Luau's own.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

MODULE_PATH = Path(__file__).resolve().parent.parent / "clients/roblox/JobGateway.luau"


def _load_pluau() -> ModuleType:
    """Return pluau's compiled module.

    The package's ``__init__`` uses Python 3.12 syntax, so on older Pythons the
    extension is loaded on its own, without running the package.
    """
    if sys.version_info >= (3, 12):
        from pluau import _pluau

        return _pluau
    spec = importlib.util.find_spec("pluau")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pluau is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    binary = next(folder.glob("_pluau*.so"), None) or next(folder.glob("_pluau*.pyd"))
    loader = importlib.machinery.ExtensionFileLoader("pluau._pluau", str(binary))
    ext_spec = importlib.util.spec_from_file_location(
        "pluau._pluau", binary, loader=loader
    )
    assert ext_spec is not None
    module = importlib.util.module_from_spec(ext_spec)
    loader.exec_module(module)
    return module


pluau = _load_pluau()

# What RequestAsync refuses, as the engine does ("Header "X" is not allowed!").
LOCKED_HEADERS = frozenset(
    name.lower()
    for name in (
        "Accept-Encoding",
        "Connection",
        "Content-Length",
        "Expect",
        "Forwarded",
        "Host",
        "Proxy-Connection",
        "Roblox-Id",
        "User-Agent",
        "Via",
        "X-Forwarded-For",
        "X-Forwarded-Host",
        "X-Forwarded-Proto",
    )
)

_PRELUDE = r"""
local host = ...
local scheduler = { now = 0, seq = 0, queue = {}, errors = {}, waits = {} }

local function enqueue(thread, at, ...)
    scheduler.seq += 1
    table.insert(scheduler.queue, {
        thread = thread, at = at, seq = scheduler.seq, args = table.pack(...),
    })
end

local function resume(thread, ...)
    local ok, problem = coroutine.resume(thread, ...)
    if not ok then
        table.insert(scheduler.errors, debug.traceback(thread, tostring(problem)))
    end
end

-- Resumes the earliest sleeper, unless it wakes after `limit`.
function scheduler.step(limit)
    local best
    for i, entry in scheduler.queue do
        local current = best and scheduler.queue[best]
        if not current or entry.at < current.at
            or (entry.at == current.at and entry.seq < current.seq) then
            best = i
        end
    end
    if not best or (limit and scheduler.queue[best].at > limit) then
        return false
    end
    local entry = table.remove(scheduler.queue, best)
    scheduler.now = math.max(scheduler.now, entry.at)
    if coroutine.status(entry.thread) == "suspended" then
        resume(entry.thread, table.unpack(entry.args, 1, entry.args.n))
    end
    return true
end

local function toThread(fn)
    return if type(fn) == "thread" then fn else coroutine.create(fn)
end

task = {}
function task.spawn(fn, ...)
    local thread = toThread(fn)
    resume(thread, ...)
    return thread
end
function task.defer(fn, ...)
    local thread = toThread(fn)
    enqueue(thread, scheduler.now, ...)
    return thread
end
function task.delay(seconds, fn, ...)
    local thread = toThread(fn)
    enqueue(thread, scheduler.now + (seconds or 0), ...)
    return thread
end
function task.wait(seconds)
    seconds = seconds or 0
    if not coroutine.isyieldable() then
        error("task.wait needs a task: start this code with task.spawn", 2)
    end
    table.insert(scheduler.waits, seconds)
    local started = scheduler.now
    enqueue(coroutine.running(), scheduler.now + seconds)
    coroutine.yield()
    return scheduler.now - started
end
function task.cancel(thread)
    for i = #scheduler.queue, 1, -1 do
        if scheduler.queue[i].thread == thread then
            table.remove(scheduler.queue, i)
        end
    end
    coroutine.close(thread)
end

local HttpService = {}
function HttpService:RequestAsync(options)
    local response = host.request(options, scheduler.now)
    -- The engine yields the caller until the answer is in: let other tasks
    -- run first, as they would there.
    if coroutine.isyieldable() then
        enqueue(coroutine.running(), scheduler.now)
        coroutine.yield()
    end
    return response
end
function HttpService:JSONEncode(value)
    return host.jsonEncode(value)
end
function HttpService:JSONDecode(text)
    return host.jsonDecode(text)
end

local RunService = {}
function RunService:IsServer()
    return not host.isClient
end
function RunService:IsClient()
    return host.isClient
end

local services = { HttpService = HttpService, RunService = RunService }
game = {}
function game:GetService(name)
    local service = services[name]
    if service == nil then
        error("'" .. tostring(name) .. "' is not a valid Service name", 2)
    end
    return service
end

DateTime = {}
function DateTime.now()
    local now = host.time() + scheduler.now
    return {
        UnixTimestamp = math.floor(now),
        UnixTimestampMillis = math.floor(now * 1000),
    }
end

function warn(...)
    local parts = table.pack(...)
    for i = 1, parts.n do
        parts[i] = tostring(parts[i])
    end
    host.warn(table.concat(parts, " ", 1, parts.n))
end

return scheduler
"""


@dataclass
class HttpCall:
    """One ``RequestAsync`` call as the engine would have sent it."""

    method: str
    url: str
    headers: dict[str, str]
    body: str | None
    at: float  # virtual seconds since the VM started
    status: int | None = None  # None: no answer (network failure)


def to_python(value: Any, *, depth: int = 0) -> Any:
    """Convert a Luau value to Python: strings to str, tables to list or dict.

    A table whose keys are exactly 1..n becomes a list; any other, the empty
    one included, a dict.
    """
    if depth > 50:
        raise ValueError("table nesting too deep (a cycle?)")
    if isinstance(value, pluau.String):
        return bytes(value.as_bytes()).decode("utf-8", errors="surrogateescape")
    if isinstance(value, pluau.Table):
        items = [(to_python(k, depth=depth + 1), v) for k, v in value]
        keys = {k for k, _ in items}
        if items and keys == set(range(1, len(items) + 1)):
            ordered = sorted(items, key=lambda kv: kv[0])
            return [to_python(v, depth=depth + 1) for _, v in ordered]
        return {k: to_python(v, depth=depth + 1) for k, v in items}
    return value


def _to_json_value(value: Any, *, depth: int = 0) -> Any:
    """Convert a Luau value for JSONEncode, by the engine's rules."""
    if depth > 50:
        raise pluau.RawError("Cannot convert a cyclic table to JSON")
    if isinstance(value, pluau.String):
        return bytes(value.as_bytes()).decode("utf-8")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        # Luau numbers are doubles; written as such (300.0, 1e+16), the way an
        # engine may, so the client cannot count on whole-number formatting.
        return float(value)
    if not isinstance(value, pluau.Table):
        raise pluau.RawError(f"Cannot convert {type(value).__name__} to JSON")
    entries = list(value)
    numeric = [k for k, _ in entries if isinstance(k, (int, float))]
    if not entries or numeric:
        # The engine: an empty table is an array, and number keys win over
        # string keys, which are then dropped.
        return [
            _to_json_value(value.raw_get(i), depth=depth + 1)
            for i in range(1, value.raw_len() + 1)
        ]
    result = {}
    for key, item in entries:
        if not isinstance(key, pluau.String):
            raise pluau.RawError("Cannot convert a table key to JSON")
        result[to_python(key)] = _to_json_value(item, depth=depth + 1)
    return result


# Values that already live in the VM and pass through unchanged.
_LUAU_VALUES = (pluau.String, pluau.Table, pluau.Function, pluau.Thread)


class LuauVM:
    """A Luau VM with the engine services the client uses, on a virtual clock."""

    def __init__(
        self,
        *,
        is_client: bool = False,
        on_request: Callable[[HttpCall], None] | None = None,
    ) -> None:
        self.lua = pluau.Lua()
        self.requests: list[HttpCall] = []
        self.warnings: list[str] = []
        # Called with each request just before it is sent.
        self.on_request = on_request
        # Above the gateway's 30-second long-poll limit.
        self._http = httpx.Client(timeout=httpx.Timeout(40.0))
        callbacks = {
            "request": self._request,
            "jsonEncode": self._json_encode,
            "jsonDecode": self._json_decode,
            "time": lambda lua, args: time.time(),
            "warn": self._warn,
        }
        host = self.lua.create_table()
        for name, callback in callbacks.items():
            host.set(name, self.lua.create_function(callback))
        host.set("isClient", is_client)
        (self._scheduler,) = self.lua.load_chunk(_PRELUDE, name="=prelude")(host)

    def close(self) -> None:
        """Close the HTTP client."""
        self._http.close()

    def __enter__(self) -> LuauVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Conversions -------------------------------------------------------------

    def to_lua(self, value: Any) -> Any:
        """Convert a Python value for Luau: bytes stay bytes, callables wrap."""
        if isinstance(value, _LUAU_VALUES):
            return value
        if isinstance(value, bytes):
            return self.lua.create_string(value)
        if isinstance(value, dict):
            table = self.lua.create_table()
            for key, item in value.items():
                if item is not None:  # nil is no value in a Luau table
                    table.set(self.to_lua(key), self.to_lua(item))
            return table
        if isinstance(value, (list, tuple)):
            table = self.lua.create_table()
            for item in value:
                table.push(self.to_lua(item))
            return table
        if callable(value):
            function = value

            def call(lua: Any, args: tuple[Any, ...]) -> Any:
                result = function(*(to_python(arg) for arg in args))
                # One value, in a tuple: a bare str would be read as many.
                return (self.to_lua(result),)

            return self.lua.create_function(call)
        return value

    # Running code ------------------------------------------------------------

    def load_gateway(self) -> None:
        """Load the client module as a ModuleScript would, into ``JobGateway``."""
        source = MODULE_PATH.read_text(encoding="utf-8")
        (module,) = self.lua.load_chunk(source, name="=JobGateway")()
        self.lua.globals().set("JobGateway", module)

    def run(self, source: str, *args: Any) -> list[Any]:
        """Run a chunk on the main thread (it may not ``task.wait``).

        ``...`` in the chunk holds ``args``; returns its results in Python.
        """
        chunk = self.lua.load_chunk(source, name="=test")
        return [to_python(v) for v in chunk(*(self.to_lua(a) for a in args))]

    def run_tasks(self, *, until: float | None = None, max_steps: int = 10_000) -> int:
        """Resume sleeping tasks in wake order until none is left.

        With ``until``, stops before the first task that wakes later than that
        virtual time. Returns how many resumptions ran.
        """
        steps = 0
        step = self._scheduler.get("step")
        while steps < max_steps and step(until)[0]:
            steps += 1
        if steps >= max_steps:
            raise RuntimeError(f"tasks still runnable after {max_steps} steps")
        return steps

    @property
    def now(self) -> float:
        """Virtual seconds since the VM started."""
        return float(self._scheduler.get("now"))

    @property
    def waits(self) -> list[float]:
        """Every ``task.wait`` duration asked for, in order."""
        return list(to_python(self._scheduler.get("waits")) or [])

    @property
    def task_errors(self) -> list[str]:
        """Errors that escaped a task, with their tracebacks."""
        return list(to_python(self._scheduler.get("errors")) or [])

    # Engine services, played by Python ----------------------------------------

    def _warn(self, lua: Any, args: tuple[Any, ...]) -> None:
        self.warnings.append(to_python(args[0]))

    def _json_encode(self, lua: Any, args: tuple[Any, ...]) -> tuple[str]:
        # A bare str return would be taken for a sequence of values.
        return (json.dumps(_to_json_value(args[0]), separators=(",", ":")),)

    def _json_decode(self, lua: Any, args: tuple[Any, ...]) -> tuple[Any]:
        try:
            return (self.to_lua(json.loads(to_python(args[0]))),)
        except (TypeError, ValueError) as exc:
            raise pluau.RawError("Can't parse JSON") from exc

    def _request(self, lua: Any, args: tuple[Any, ...]) -> Any:
        options, at = to_python(args[0]), float(args[1])
        if not isinstance(options, dict) or not isinstance(options.get("Url"), str):
            raise pluau.RawError("Url field is required")
        method = str(options.get("Method", "GET")).upper()
        headers = {str(k): str(v) for k, v in (options.get("Headers") or {}).items()}
        body = options.get("Body")
        for name in headers:
            if name.lower() in LOCKED_HEADERS:
                raise pluau.RawError(f'Header "{name}" is not allowed!')
        if body is not None and method in ("GET", "HEAD"):
            raise pluau.RawError(f"Body cannot be sent with a {method} request")
        if not options["Url"].startswith(("http://", "https://")):
            raise pluau.RawError("HttpError: InvalidUrl")
        call = HttpCall(method, options["Url"], headers, body, at)
        self.requests.append(call)
        if self.on_request is not None:
            self.on_request(call)
        try:
            response = self._http.request(
                method, call.url, headers=headers, content=body
            )
        except httpx.TimeoutException as exc:
            raise pluau.RawError("HttpError: Timedout") from exc
        except httpx.TransportError as exc:
            raise pluau.RawError("HttpError: ConnectFail") from exc
        call.status = response.status_code
        # Header names as the server spelled them.
        response_headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in response.headers.raw
        }
        return self.to_lua(
            {
                "Success": 200 <= response.status_code <= 299,
                "StatusCode": response.status_code,
                "StatusMessage": response.reason_phrase,
                "Headers": response_headers,
                "Body": response.text,
            }
        )
