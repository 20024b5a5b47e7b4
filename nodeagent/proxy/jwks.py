"""JWKS key management for RequestAuthentication rules with a ``jwksUri``.

Three parts, the I/O at the edge:

* ``JwksCache`` — pure state: the last good key set per URI and how its fetches went.
  ``keys(uri)`` is the ``KeyLookup`` the ``jwtauth.Authenticator`` reads on every request.
  A fetch that fails, or returns something that is not a JWKS with a usable signing key,
  leaves the last-known-good keys in place: an identity provider that goes away (or starts
  serving an error page) does not log everybody out. Before the first good fetch a URI has
  no keys, and the tokens of its issuer are refused with 401 "Jwks remote fetch is failed".
* ``JwksRefresher`` — one asyncio task per watched URI: fetch now, then every
  ``refresh_interval`` (20 min, as istiod refreshes JWKS); after a failure retry with
  exponential backoff (1 s doubling to at most 5 min, never past the refresh interval,
  +-10 % jitter). ``watch(uris)`` follows the snapshot: new URIs start fetching at once,
  dropped ones stop and forget their keys. Counts fetches on the injected registry as
  ``hostmesh_agent_jwks_fetches_total{result}`` with result ``ok``, ``invalid_jwks`` (got a
  body that is no usable JWKS), ``http_error`` (not 200), ``network_error`` (connect, TLS,
  framing) and ``timeout``.
* ``HttpsJwksFetcher`` — the fetcher: one HTTPS GET over asyncio streams with the stdlib
  ``ssl`` default context (certificate and hostname verified; a test injects its CA), a
  timeout, a body size cap, no redirects.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

import httptools
from prometheus_client import CollectorRegistry, Counter

from nodeagent.proxy.jwtauth import KeySet, parse_jwks

log = logging.getLogger(__name__)

DEFAULT_REFRESH_INTERVAL = 20 * 60.0
DEFAULT_RETRY_INITIAL = 1.0
DEFAULT_RETRY_MAX = 300.0
DEFAULT_FETCH_TIMEOUT = 5.0
MAX_JWKS_BYTES = 512 * 1024

OK = "ok"
INVALID_JWKS = "invalid_jwks"
HTTP_ERROR = "http_error"
NETWORK_ERROR = "network_error"
TIMEOUT = "timeout"
FETCH_RESULTS = (OK, INVALID_JWKS, HTTP_ERROR, NETWORK_ERROR, TIMEOUT)


class JwksFetchError(Exception):
    """A fetch that produced no body: ``result`` is one of HTTP_ERROR, NETWORK_ERROR, TIMEOUT."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


Fetcher = Callable[[str], Awaitable[bytes]]


# ------------------------------------------------------------------ state

@dataclass
class JwksStatus:
    """What an operator wants to know about one URI (for config dumps)."""

    keys: KeySet | None = None
    last_success: float | None = None  # wall clock
    last_attempt: float | None = None
    last_error: str = ""
    consecutive_failures: int = 0


class JwksCache:
    """Last-known-good keys per JWKS URI. No I/O: fed by ``JwksRefresher`` (or a test)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[str, JwksStatus] = {}
        self._bodies: dict[str, bytes] = {}  # the last good body per URI (what proxy workers get)
        self._subscribers: list[Callable[[str, bytes | None], None]] = []

    def subscribe(self, fn: Callable[[str, bytes | None], None]) -> None:
        """``fn(uri, body)`` after a new good body; ``fn(uri, None)`` when a URI is forgotten."""
        self._subscribers.append(fn)

    def bodies(self) -> dict[str, bytes]:
        return dict(self._bodies)

    def keys(self, uri: str) -> KeySet | None:
        entry = self._entries.get(uri)
        return entry.keys if entry is not None else None

    def status(self, uri: str) -> JwksStatus | None:
        return self._entries.get(uri)

    def uris(self) -> list[str]:
        return sorted(self._entries)

    def forget(self, uri: str) -> None:
        self._entries.pop(uri, None)
        if self._bodies.pop(uri, None) is not None:
            for fn in self._subscribers:
                fn(uri, None)

    def record_body(self, uri: str, body: bytes) -> str:
        """A fetched body: parsed, and kept only if it holds a usable signing key. Returns
        OK or INVALID_JWKS."""
        keys, problems = parse_jwks(body, where="JWKS")
        if not keys:
            reason = "; ".join(f"{where}: {message}" for where, message in problems[:3]) or "no signing key"
            self.record_failure(uri, f"not a usable JWKS ({reason})")
            return INVALID_JWKS
        for where, message in problems:
            log.warning("JWKS %s: %s: %s; that key is skipped", uri, where, message)
        entry = self._entries.setdefault(uri, JwksStatus())
        now = self._clock()
        entry.keys, entry.last_success, entry.last_attempt = keys, now, now
        entry.last_error, entry.consecutive_failures = "", 0
        if self._bodies.get(uri) != body:
            self._bodies[uri] = body
            for fn in self._subscribers:
                fn(uri, body)
        return OK

    def record_failure(self, uri: str, message: str) -> None:
        entry = self._entries.setdefault(uri, JwksStatus())
        entry.last_attempt = self._clock()
        entry.last_error = message
        entry.consecutive_failures += 1


def retry_delay(failures: int, *, initial: float = DEFAULT_RETRY_INITIAL, maximum: float = DEFAULT_RETRY_MAX,
                refresh_interval: float = DEFAULT_REFRESH_INTERVAL, jitter: float = 0.0) -> float:
    """Seconds before the next attempt after ``failures`` consecutive failures (>= 1);
    ``jitter`` in [-1, 1] spreads agents by up to 10 %."""
    base = min(initial * 2 ** min(failures - 1, 30), maximum, refresh_interval)
    return base * (1 + 0.1 * jitter)


# ------------------------------------------------------------------ the refresher

class JwksRefresher:
    """Keeps the watched URIs' keys in ``cache`` fresh with ``fetch``."""

    def __init__(self, cache: JwksCache, fetch: Fetcher, registry: CollectorRegistry | None = None, *,
                 refresh_interval: float = DEFAULT_REFRESH_INTERVAL, retry_initial: float = DEFAULT_RETRY_INITIAL,
                 retry_max: float = DEFAULT_RETRY_MAX, rand: Callable[[], float] | None = None) -> None:
        self.cache = cache
        self._fetch = fetch
        self._refresh = refresh_interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._rand = rand or random.Random().random
        self._tasks: dict[str, asyncio.Task] = {}
        self._fetches = Counter("hostmesh_agent_jwks_fetches", "JWKS fetches for RequestAuthentication, by result.",
                                ["result"], registry=registry) if registry is not None else None
        if self._fetches is not None:
            for result in FETCH_RESULTS:
                self._fetches.labels(result)

    def watch(self, uris: Iterable[str]) -> None:
        """Keep exactly ``uris`` fresh (call on every snapshot; needs a running loop)."""
        wanted = set(uris)
        for uri in list(self._tasks):
            if uri not in wanted:
                self._tasks.pop(uri).cancel()
                self.cache.forget(uri)
        for uri in sorted(wanted - set(self._tasks)):
            self._tasks[uri] = asyncio.get_running_loop().create_task(self._keep_fresh(uri), name=f"jwks {uri}")

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def refresh_once(self, uri: str) -> str:
        """One fetch of ``uri`` into the cache; returns the result label. Never raises
        (but cancellation)."""
        try:
            body = await self._fetch(uri)
        except JwksFetchError as exc:
            result, message = exc.result, str(exc)
        except asyncio.TimeoutError:
            result, message = TIMEOUT, "timed out"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a fetcher bug must not stop the refresh loop
            result, message = NETWORK_ERROR, f"{type(exc).__name__}: {exc}"
        else:
            result = self.cache.record_body(uri, body)
            message = self.cache.status(uri).last_error if result != OK else ""
        if result not in (OK, INVALID_JWKS):
            self.cache.record_failure(uri, message)
        if self._fetches is not None:
            self._fetches.labels(result).inc()
        if result != OK:
            status = self.cache.status(uri)
            kept = "keeping the last good keys" if status.keys else "no keys yet: its tokens are refused"
            log.warning("JWKS %s: fetch failed (%s): %s; %s", uri, result, message, kept)
        return result

    def next_delay(self, uri: str) -> float:
        status = self.cache.status(uri)
        failures = status.consecutive_failures if status else 0
        jitter = self._rand() * 2 - 1
        if failures == 0:
            return self._refresh * (1 + 0.1 * jitter)
        return retry_delay(failures, initial=self._retry_initial, maximum=self._retry_max,
                           refresh_interval=self._refresh, jitter=jitter)

    async def _keep_fresh(self, uri: str) -> None:
        while True:
            await self.refresh_once(uri)
            await asyncio.sleep(self.next_delay(uri))


# ------------------------------------------------------------------ the HTTPS fetcher

class _Response:
    """httptools callbacks collecting one response."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.body = bytearray()
        self.too_large = False
        self.headers_done = False
        self.delimited = False  # content-length or chunked: else the body ends at EOF
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.delimited = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, chunk: bytes) -> None:
        if len(self.body) + len(chunk) > self.max_bytes:
            self.too_large = True
            return
        self.body += chunk

    def on_message_complete(self) -> None:
        self.done = True


class HttpsJwksFetcher:
    """``await fetcher(uri) -> body`` of a 200 answer to an HTTPS GET; raises
    ``JwksFetchError`` otherwise."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, *, timeout: float = DEFAULT_FETCH_TIMEOUT,
                 max_bytes: int = MAX_JWKS_BYTES) -> None:
        self._ssl = ssl_context or ssl.create_default_context()
        self._timeout = timeout
        self._max_bytes = max_bytes

    async def __call__(self, uri: str) -> bytes:
        try:
            return await asyncio.wait_for(self._get(uri), self._timeout)
        except asyncio.TimeoutError:
            raise JwksFetchError(TIMEOUT, f"no answer within {self._timeout:g} s") from None

    async def _get(self, uri: str) -> bytes:
        parts = urlsplit(uri)
        if parts.scheme != "https" or not parts.hostname:
            raise JwksFetchError(NETWORK_ERROR, f"{uri!r} is not an https:// URL")
        host, port = parts.hostname, parts.port or 443
        authority = parts.netloc.rpartition("@")[2]
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            reader, writer = await asyncio.open_connection(host, port, ssl=self._ssl, server_hostname=host)
        except (OSError, ssl.SSLError) as exc:
            raise JwksFetchError(NETWORK_ERROR, f"cannot connect to {authority}: {exc}") from None
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\n"
                         f"User-Agent: hostmesh-agent\r\nConnection: close\r\n\r\n".encode("ascii"))
            return await self._read(reader)
        except (OSError, ssl.SSLError, httptools.HttpParserError) as exc:
            raise JwksFetchError(NETWORK_ERROR, f"reading from {authority}: {exc}") from None
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass

    async def _read(self, reader: asyncio.StreamReader) -> bytes:
        response = _Response(self._max_bytes)
        parser = httptools.HttpResponseParser(response)
        while not response.done and not response.too_large:
            chunk = await reader.read(65536)
            if not chunk:
                break
            parser.feed_data(chunk)
        if response.too_large:
            raise JwksFetchError(NETWORK_ERROR, f"JWKS larger than {self._max_bytes} bytes")
        complete = response.done or (response.headers_done and not response.delimited)
        if not complete:
            raise JwksFetchError(NETWORK_ERROR, "connection closed before the response was complete")
        status = parser.get_status_code()
        if status != 200:
            raise JwksFetchError(HTTP_ERROR, f"HTTP {status}")
        return bytes(response.body)
