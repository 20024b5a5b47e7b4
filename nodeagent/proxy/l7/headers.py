"""Header helpers for forwarding HTTP messages: pure functions, no I/O.

Header lists are ``list[tuple[bytes, bytes]]`` with *lowercase* names (what
``http1`` emits and what HTTP/2 requires); values have no leading/trailing whitespace.
Every function returns a new list and leaves its input alone.

Hop-by-hop fields (RFC 9110 section 7.6.1): an intermediary removes the ``Connection``
field, every field named by one of its options, and the fields known to be
connection-specific whether or not they are listed: ``Keep-Alive``, ``Proxy-Connection``,
``TE``, ``Transfer-Encoding``, ``Upgrade``. Here, in addition:

* ``TE: trailers`` is kept as ``te: trailers`` (the only TE value HTTP/2 allows; gRPC
  requires it end to end, and Envoy keeps it the same way); any other TE coding is dropped.
* ``Upgrade`` is kept only when the caller passes a WebSocket-style upgrade through
  (``upgrade=True``); the HTTP/1 codec then writes its own ``connection: upgrade``.
* ``HTTP2-Settings`` is always removed (h2c upgrades are never passed on).
* Framing is the codec's job: ``Content-Length`` is *not* removed here (it is end-to-end
  information for HTTP/2 and for HEAD responses), the HTTP/1 serializer rewrites it.
* A ``Connection`` option naming a field that is meant for all recipients (``host``,
  ``content-length``, the ``x-forwarded-*`` fields, ``x-request-id``, pseudo-headers) is
  ignored rather than obeyed: a client must not be able to make the mesh delete what it
  or an earlier hop set (the "hop-by-hop header abuse" attack). Envoy rejects such
  requests instead; ignoring is friendlier and just as safe.

Forwarding fields:

* ``x-forwarded-for``: the client address is appended (existing values are kept and
  joined into one field, in order).
* ``x-forwarded-proto``: kept when present (an edge proxy knows better), else set.
* ``x-forwarded-host``: only when the routing layer rewrites Host (``forwarded_host``).
* ``x-request-id``: a valid incoming id is kept (the first valid one; duplicates dropped),
  else a UUID4 is generated (``new_id`` is injectable for tests).
* ``via``: not added by default — Envoy and the other meshes do not either, and the mesh
  aims to be invisible (RFC 9110 7.6.3 asks proxies to add it; pass ``via=`` to comply).
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Callable, Iterable

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding",
    b"upgrade", b"http2-settings",
})

# never removed because a Connection option names them
PROTECTED = frozenset({
    b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-forwarded-host", b"x-request-id",
})

# Connection values that nominate no removable field (keep-alive/upgrade are hop-by-hop anyway)
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade"})

# the fields prepare_request does more with than copy (the others take its short cut)
_REQUEST_SPECIAL = HOP_BY_HOP | {b"x-request-id", b"x-forwarded-for", b"via", b"x-forwarded-proto",
                                 b"x-forwarded-host"}

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=@-]{1,128}")


def list_tokens(value: bytes) -> list[bytes]:
    """The lowercase members of a comma-separated list field (empty members skipped)."""
    return [t for t in (p.strip(b" \t").lower() for p in value.split(b",")) if t]


def connection_options(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """All options of all ``Connection`` fields, lowercased."""
    opts: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            opts.update(list_tokens(value))
    return opts


def _removable(options: list[bytes]) -> set[bytes]:
    """The fields that the ``Connection`` values ``options`` nominate and that may be removed."""
    out: set[bytes] = set()
    for value in options:
        out.update(t for t in list_tokens(value) if t not in PROTECTED and t not in HOP_BY_HOP
                   and not t.startswith(b":"))
    return out


def _hop_field(name: bytes, value: bytes, upgrade: bool, out: Headers, options: list[bytes]) -> bool:
    """One hop-by-hop field: an ``upgrade`` kept when asked, ``Connection`` values collected
    into ``options`` (the usual ones name nothing and are skipped); True for ``TE: trailers``."""
    if name == b"connection":
        if value not in _PLAIN_CONNECTION:
            options.append(value)
    elif name == b"te":
        return b"trailers" in (t.split(b";", 1)[0].strip() for t in list_tokens(value))
    elif name == b"upgrade" and upgrade:
        out.append((name, value))
    return False


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]], *, upgrade: bool = False) -> Headers:
    """``headers`` without hop-by-hop fields (see the module doc); keeps ``te: trailers``.

    ``upgrade=True`` keeps the ``upgrade`` field (WebSocket passthrough). One pass; fields
    nominated by ``Connection`` options are filtered afterwards (rare).
    """
    out: Headers = []
    options: list[bytes] = []
    te_trailers = False
    hop = HOP_BY_HOP
    plain = _PLAIN_CONNECTION
    for name, value in headers:
        if name in hop:
            if name == b"connection" and value in plain:
                continue  # the usual keep-alive / close: nothing nominated (_hop_field, short cut)
            if _hop_field(name, value, upgrade, out, options):
                te_trailers = True
            continue
        out.append((name, value))
    if options:
        drop = _removable(options)
        if drop:
            out = [(n, v) for n, v in out if n not in drop]
    if te_trailers:  # RFC 9110 asks senders of TE to list it in Connection: that is normal
        out.append((b"te", b"trailers"))
    return out


def append_forwarded_for(headers: Iterable[tuple[bytes, bytes]], client: str | bytes) -> Headers:
    """Append ``client`` to ``x-forwarded-for`` (all existing values joined into one field)."""
    client_b = client.encode("ascii") if isinstance(client, str) else client
    out: Headers = []
    chain: list[bytes] = []
    for name, value in headers:
        if name == b"x-forwarded-for":
            v = value.strip(b" \t")
            if v:
                chain.append(v)
        else:
            out.append((name, value))
    chain.append(client_b)
    out.append((b"x-forwarded-for", b", ".join(chain)))
    return out


_VARIANT = bytes.maketrans(b"0123456789abcdef", b"89ab89ab89ab89ab")  # hex digit -> "89ab"[d & 3]


def _uuid4() -> bytes:
    """A random (version 4) UUID as text, ~4x cheaper than ``str(uuid.uuid4())``; from
    ``os.urandom`` like uuid4 (a module-level PRNG would repeat ids in forked children)."""
    return _format_uuid4(os.urandom(16).hex().encode("ascii"))


def _format_uuid4(h: bytes) -> bytes:
    """32 random hex digits as a version 4 UUID (the version and variant digits forced)."""
    return b"".join((h[:8], b"-", h[8:12], b"-4", h[13:16], b"-", h[16:17].translate(_VARIANT), h[17:20], b"-",
                     h[20:32]))


class RequestIds:
    """A ``new_id`` for ``prepare_request``: version 4 UUIDs like ``_uuid4`` (``os.urandom``),
    the random bytes drawn ``batch`` ids at a time: one getrandom syscall per batch instead of
    one per request. A forked child throws the inherited bytes away (its ids never repeat the
    parent's). One per proxy (``L7Inputs.request_ids``); one event loop calls it."""

    __slots__ = ("batch", "_hex", "_pos", "__weakref__")

    def __init__(self, batch: int = 256) -> None:
        self.batch = batch
        self._hex = b""
        self._pos = 0
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (lambda ids: ids is not None and ids._forget())(ref()))

    def _forget(self) -> None:
        self._hex = b""
        self._pos = 0

    def __call__(self) -> bytes:
        pos = self._pos
        if pos >= len(self._hex):
            self._hex = os.urandom(16 * self.batch).hex().encode("ascii")
            pos = 0
        self._pos = pos + 32
        return _format_uuid4(self._hex[pos:pos + 32])


def valid_request_id(value: bytes) -> bool:
    return _REQUEST_ID.fullmatch(value) is not None


def ensure_request_id(headers: Iterable[tuple[bytes, bytes]],
                      new_id: Callable[[], bytes] = _uuid4) -> tuple[Headers, bytes]:
    """Keep the first valid ``x-request-id`` (drop the others) or add a new one.

    Returns ``(headers, request_id)``.
    """
    out: Headers = []
    rid: bytes | None = None
    for name, value in headers:
        if name == b"x-request-id":
            if rid is None and valid_request_id(value):
                rid = value
            continue
        out.append((name, value))
    if rid is None:
        rid = new_id()
    out.append((b"x-request-id", rid))
    return out, rid


def prepare_request(headers: Iterable[tuple[bytes, bytes]], *, client: str | bytes | None,
                    proto: str | bytes = b"http", upgrade: bool = False,
                    forwarded_host: bytes | None = None, via: bytes | None = None,
                    new_id: Callable[[], bytes] = _uuid4) -> tuple[Headers, bytes]:
    """Everything a forwarded request needs, in one call.

    Strips hop-by-hop fields (keeping ``upgrade`` when ``upgrade``), appends ``client`` to
    ``x-forwarded-for`` (when given), sets ``x-forwarded-proto`` if absent, sets
    ``x-forwarded-host`` to ``forwarded_host`` when the caller rewrote Host (an existing
    one is kept), appends ``via`` when given, and keeps or creates ``x-request-id``.
    Returns ``(headers, request_id)``.

    The same result as ``strip_hop_by_hop`` -> ``append_forwarded_for`` -> ``add_via`` ->
    ``ensure_request_id``, in one pass over the fields (this runs for every request).
    """
    if via is None and type(headers) is list:
        special = _REQUEST_SPECIAL
        for name, _value in headers:
            if name in special:
                break
        else:  # the usual request: nothing to strip, merge or keep; only fields to append
            out = headers.copy()
            if client is not None:
                out.append((b"x-forwarded-for", client.encode("ascii") if isinstance(client, str) else client))
            out.append((b"x-forwarded-proto", proto.encode("ascii") if isinstance(proto, str) else proto))
            if forwarded_host is not None:
                out.append((b"x-forwarded-host", forwarded_host))
            rid = new_id()
            out.append((b"x-request-id", rid))
            return out, rid
    chain: list[bytes] | None = [] if client is not None else None
    vias: list[bytes] | None = [] if via is not None else None
    rid: bytes | None = None
    has_proto = has_fhost = te_trailers = False
    out: Headers = []
    options: list[bytes] = []
    hop = HOP_BY_HOP
    for name, value in headers:
        if name in hop:
            if _hop_field(name, value, upgrade, out, options):
                te_trailers = True
            continue
        if name == b"x-request-id":
            if rid is None and _REQUEST_ID.fullmatch(value) is not None:
                rid = value
            continue
        if name == b"x-forwarded-for" and chain is not None:
            v = value.strip(b" \t")
            if v:
                chain.append(v)
            continue
        if name == b"via" and vias is not None:
            vias.append(value)
            continue
        if name == b"x-forwarded-proto":
            has_proto = True
        elif name == b"x-forwarded-host":
            has_fhost = True
        out.append((name, value))
    if options:
        drop = _removable(options)
        if drop:
            out = [(n, v) for n, v in out if n not in drop]
            if vias and b"via" in drop:
                vias = []
    if te_trailers:
        out.append((b"te", b"trailers"))
    if chain is not None:
        chain.append(client.encode("ascii") if isinstance(client, str) else client)
        out.append((b"x-forwarded-for", b", ".join(chain)))
    if not has_proto:
        out.append((b"x-forwarded-proto", proto.encode("ascii") if isinstance(proto, str) else proto))
    if forwarded_host is not None and not has_fhost:
        out.append((b"x-forwarded-host", forwarded_host))
    if vias is not None:
        vias.append(via)
        out.append((b"via", b", ".join(vias)))
    if rid is None:
        rid = new_id()
    out.append((b"x-request-id", rid))
    return out, rid


def prepare_response(headers: Iterable[tuple[bytes, bytes]], *, upgrade: bool = False,
                     via: bytes | None = None) -> Headers:
    """A forwarded response's headers: hop-by-hop fields stripped (``upgrade`` for a 101)."""
    out = strip_hop_by_hop(headers, upgrade=upgrade)
    if via is not None:
        out = add_via(out, via)
    return out


def add_via(headers: Iterable[tuple[bytes, bytes]], via: bytes) -> Headers:
    """Append a ``via`` member (e.g. ``b"1.1 hostmesh"``), joining existing ones."""
    out: Headers = []
    chain: list[bytes] = []
    for name, value in headers:
        if name == b"via":
            chain.append(value)
        else:
            out.append((name, value))
    chain.append(via)
    out.append((b"via", b", ".join(chain)))
    return out


def get(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of ``name`` (lowercase), or None."""
    for n, v in headers:
        if n == name:
            return v
    return None
