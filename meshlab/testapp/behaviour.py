"""Protocol-independent logic of the test app: no I/O, no asyncio.

* `parse_behaviour(query)` turns the query string of a request into a `Behaviour`
  (status, delay, size, reset, extra response headers), or raises `BehaviourError`
  with a message meant for the client.
* `split_target`, `route`, `join_headers`, `describe` and `error_body` are the small
  pure helpers the HTTP/1.1 and HTTP/2 layers share.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

# Limits (each one documented in the error message that enforces it).
MAX_DELAY = 60.0                 # seconds
MAX_SIZE = 10 * 1024 ** 3        # 10 GiB
MAX_EXTRA_HEADERS = 64
MAX_HEADER_VALUE = 8192

# Paths with a fixed meaning; every other path is answered by the JSON description.
ECHO = "echo"
HEALTHZ = "healthz"
DEFAULT = "default"
_ROUTES = {"/echo": ECHO, "/healthz": HEALTHZ}

# Response headers a client may not set through header=: they would break the framing
# of the response or are connection-specific (forbidden in HTTP/2).
FORBIDDEN_HEADERS = frozenset({
    "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
    "proxy-connection", "te", "trailer",
})

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VALUE = re.compile(r"[\t\x20-\x7e]*\Z")          # visible ASCII, space and tab
_SIZE = re.compile(r"(\d{1,20})\s*(k|m|g|ki|mi|gi|kib|mib|gib|kb|mb|gb)?\Z", re.IGNORECASE | re.ASCII)
_UNITS = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
_STATUS = re.compile(r"\d{3}\Z", re.ASCII)
_DELAY = re.compile(r"(\d{1,10}(\.\d{0,9})?|\.\d{1,9})\Z", re.ASCII)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class BehaviourError(ValueError):
    """A query parameter is invalid; str(error) is the message for the client (HTTP 400)."""


@dataclass(frozen=True, slots=True)
class Behaviour:
    """What a request asked the app to do.

    status         final response status (200 unless status=NNN asked for 200..599)
    informational  a 1xx status asked for with status=1xx (not 101): sent as an interim
                   response before the final 200
    delay          seconds to wait before answering (counted from the request headers)
    size           send this many generated body bytes instead of the JSON description
    reset          abort instead of answering (TCP RST / HTTP/2 RST_STREAM)
    headers        extra response headers (name as given, value), in query order
    """
    status: int = 200
    informational: int | None = None
    delay: float = 0.0
    size: int | None = None
    reset: bool = False
    headers: tuple[tuple[str, str], ...] = ()


DEFAULT_BEHAVIOUR = Behaviour()


def parse_size(text: str) -> int:
    """'1048576', '64k', '10M', '1GiB' -> bytes (units are binary: k = 1024)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise BehaviourError(f"invalid size={text!r}: expected a byte count such as 1024, 64k, 10M or 1G")
    n = int(m.group(1))
    if m.group(2):
        n *= _UNITS[m.group(2)[0].lower()]
    if n > MAX_SIZE:
        raise BehaviourError(f"invalid size={text!r}: at most {MAX_SIZE} bytes (10 GiB)")
    return n


def parse_status(text: str) -> int:
    if not _STATUS.match(text.strip()):
        raise BehaviourError(f"invalid status={text!r}: expected an integer from 100 to 599")
    code = int(text.strip())
    if not 100 <= code <= 599:
        raise BehaviourError(f"invalid status={text!r}: must be from 100 to 599")
    if code == 101:
        raise BehaviourError("invalid status=101: switching protocols is not supported "
                             "(the connection would be left unusable)")
    return code


def parse_delay(text: str) -> float:
    if not _DELAY.match(text.strip()):
        raise BehaviourError(f"invalid delay={text!r}: expected seconds, e.g. 0.25")
    seconds = float(text.strip())
    if not math.isfinite(seconds) or seconds > MAX_DELAY:
        raise BehaviourError(f"invalid delay={text!r}: must be from 0 to {MAX_DELAY:g} seconds")
    return seconds


def parse_bool(name: str, text: str) -> bool:
    v = text.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise BehaviourError(f"invalid {name}={text!r}: expected 1 or 0")


def parse_header(text: str) -> tuple[str, str]:
    """'Name:Value' -> ('Name', 'Value'); whitespace around the value is dropped."""
    name, sep, value = text.partition(":")
    if not sep:
        raise BehaviourError(f"invalid header={text!r}: expected Name:Value")
    name, value = name.strip(), value.strip()
    if not _TOKEN.match(name):
        raise BehaviourError(f"invalid header={text!r}: {name!r} is not a valid header name")
    if name.lower() in FORBIDDEN_HEADERS:
        raise BehaviourError(f"invalid header={text!r}: {name.lower()} cannot be set "
                             f"(it controls the message framing or the connection)")
    if len(value) > MAX_HEADER_VALUE or not _VALUE.match(value):
        raise BehaviourError(f"invalid header={text!r}: the value must be printable ASCII, "
                             f"at most {MAX_HEADER_VALUE} characters")
    return name, value


def parse_fraction(text: str) -> float:
    try:
        v = float(text.strip())
    except ValueError:
        v = -1.0
    if not 0.0 <= v <= 1.0:
        raise BehaviourError(f"invalid fail={text!r}: expected a fraction from 0 to 1, e.g. 0.5")
    return v


def parse_behaviour(query: str, *, pod: str = "", draw=random.random) -> Behaviour:
    """Parse a raw query string (without '?'). Unknown parameters are ignored (they are
    free for routing tests); status, delay, size and reset may appear at most once;
    header may repeat. ``fail=F`` (a fraction) and ``pod=NAME`` narrow where status,
    delay and reset apply: to a share F of the requests (``draw()`` decides), and only on
    the pod named NAME (``pod``: this app's); elsewhere the answer is a plain 200.
    Raises BehaviourError."""
    if not query:
        return DEFAULT_BEHAVIOUR
    b = _parse_behaviour(query)
    fail, only = 1.0, None
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "fail":
            fail = parse_fraction(value)
        elif name == "pod":
            only = value
    if fail < 1.0 and draw() >= fail or only is not None and only != pod:
        return Behaviour(size=b.size, headers=b.headers)
    return b


def _parse_behaviour(query: str) -> Behaviour:
    status, informational, delay, size, reset = 200, None, 0.0, None, False
    headers: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in ("status", "delay", "size", "reset"):
            if name in seen:
                raise BehaviourError(f"{name} given more than once")
            seen.add(name)
        if name == "status":
            code = parse_status(value)
            if code < 200:
                informational = code
            else:
                status = code
        elif name == "delay":
            delay = parse_delay(value)
        elif name == "size":
            size = parse_size(value)
        elif name == "reset":
            reset = parse_bool(name, value)
        elif name == "header":
            if len(headers) >= MAX_EXTRA_HEADERS:
                raise BehaviourError(f"too many header= parameters (at most {MAX_EXTRA_HEADERS})")
            headers.append(parse_header(value))
    return Behaviour(status=status, informational=informational, delay=delay, size=size,
                     reset=reset, headers=tuple(headers))


def split_target(target: str) -> tuple[str, str]:
    """Request target -> (path, raw query). Handles origin-form ('/a?b'), absolute-form
    ('http://host/a?b'), asterisk-form and authority-form (CONNECT); drops a fragment."""
    target = target.partition("#")[0]
    if not target.startswith("/"):
        scheme, sep, rest = target.partition("://")
        if sep and scheme.isalpha():
            slash = rest.find("/")
            qmark = rest.find("?")
            if slash < 0 or (0 <= qmark < slash):
                target = "/" + rest[qmark:] if qmark >= 0 else "/"
            else:
                target = rest[slash:]
    path, _, query = target.partition("?")
    return path, query


def route(path: str) -> str:
    """Which handler answers `path`: ECHO, HEALTHZ or DEFAULT."""
    return _ROUTES.get(path, DEFAULT)


def join_headers(pairs) -> dict[str, str]:
    """[(name, value), ...] -> {lowercased name: value}, repeated names joined by ', '."""
    out: dict[str, str] = {}
    for name, value in pairs:
        name = name.lower()
        if name in out:
            out[name] = out[name] + ", " + value
        else:
            out[name] = value
    return out


def _addr(sockaddr) -> dict:
    if isinstance(sockaddr, (tuple, list)) and len(sockaddr) >= 2:
        return {"address": sockaddr[0], "port": sockaddr[1]}
    return {"address": str(sockaddr) if sockaddr else None, "port": None}


def describe(*, pod: str, node: str, protocol: str, method: str, path: str, query: str,
             host: str | None, headers: dict[str, str], source, destination,
             body_bytes: int) -> bytes:
    """The JSON body of a default response (UTF-8, newline-terminated)."""
    doc = {
        "pod": pod,
        "node": node,
        "protocol": protocol,
        "method": method,
        "path": path,
        "query": query,
        "host": host,
        "headers": headers,
        "source": _addr(source),
        "destination": _addr(destination),
        "body_bytes": body_bytes,
    }
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def error_body(pod: str, node: str, status: int, message: str) -> bytes:
    return json.dumps({"pod": pod, "node": node, "status": status, "error": message},
                      separators=(",", ":")).encode() + b"\n"
