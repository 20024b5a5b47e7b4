"""Request-path normalization before policy matching, as Envoy's ``normalize_path`` +
``merge_slashes`` + ``path_with_escaped_slashes_action`` (Istio's ``BASE``/``MERGE_SLASHES``/
``DECODE_AND_MERGE_SLASHES``). Pure functions over the request-target; no I/O.

The normalized path is what AuthorizationPolicy ``paths``/``notPaths`` are matched against
**and** what the proxy forwards, so the policy and the backend see the same resource (Istio:
"the normalized request will be used for both the evaluation of authorization policies and
the request that is ultimately sent to the backend server").

What ``normalize_target`` does, in order (decisions marked *Envoy* follow Envoy/Istio,
*stricter* are deliberate, fail-closed additions):

* origin-form only: the target must start with ``/``. ``*`` (OPTIONS) and absolute-form
  are the caller's business and are refused here (*Envoy* also rejects anything else).
* ``#fragment``: refused (*Envoy*, ``http_reject_path_with_fragment``; a fragment is not
  part of a request-target, RFC 9112 3.2).
* raw control characters, space and DEL anywhere in the target: refused (the HTTP grammar
  forbids them; a lenient parser upstream must not smuggle them past us).
* the query (after the first ``?``) is kept apart, byte for byte, and never decoded.
* percent-encodings: invalid ones (``%`` not followed by two hex digits) are refused;
  ``%00`` is refused (*Envoy/Istio*: "the request will always be rejected with HTTP code
  400"); encodings of unreserved characters (ALPHA DIGIT ``-._~``) are decoded, once (no
  double decoding: ``%252e`` stays ``%252e``); every other encoding is kept, hex uppercased
  (RFC 3986 6.2.2.1).
* ``%2F``/``%5C`` (encoded ``/`` and ``\\``) follow ``EscapedSlashes``: REJECT (default
  here, fail closed), KEEP_UNCHANGED (Envoy's default; the backend may still decode them),
  UNESCAPE_AND_FORWARD (decode to ``/`` then normalize: Istio DECODE_AND_MERGE_SLASHES) or
  UNESCAPE_AND_REDIRECT (same path, but ``redirect`` is set: the caller answers a redirect
  to it instead of forwarding).
* raw ``\\`` becomes ``/`` (*Envoy* normalize_path / Chromium's canonicalizer, Istio BASE).
* characters RFC 3986 does not allow in a path (``"<>`{}|^[]`` and non-ASCII) are
  percent-encoded (*Envoy*, via the Chromium canonicalizer). *Stricter*: percent-encoded or
  raw bytes >= 0x80 must form valid UTF-8 — overlong forms such as ``%c0%ae`` (an
  overlong ``.``), surrogates and stray continuation bytes are refused, since some
  backends decode them into ``.`` or ``/`` after the policy matched.
* *stricter*: a segment that is ``.`` or ``..`` followed by ``;`` (path parameters, e.g.
  ``/public/..;/admin``) is refused: Tomcat and Spring treat it as a dot segment.
* ``//`` runs are merged into ``/`` (``merge_slashes``, default on).
* ``.`` and ``..`` segments are removed per RFC 3986 5.2.4 (after the unreserved decoding,
  so ``%2e%2e`` and ``%2E.`` are dot segments too); ``..`` never climbs above the root.

Everything refused raises ``PathRejected`` with a message a client can read; the caller
answers 400 (or the gRPC equivalent).

Used by ``request_policy.RequestGate`` for every request whose destination has request
checks (MeshConfig ``pathNormalization.escapedSlashes`` picks the ``EscapedSlashes`` mode).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class PathRejected(ValueError):
    """The request-target cannot be normalized safely; the caller answers 400 with ``str(exc)``."""

    status = 400


class EscapedSlashes(enum.Enum):
    """What to do with ``%2F`` and ``%5C`` in the path (Envoy ``path_with_escaped_slashes_action``)."""

    REJECT = "REJECT"
    KEEP_UNCHANGED = "KEEP_UNCHANGED"
    UNESCAPE_AND_FORWARD = "UNESCAPE_AND_FORWARD"
    UNESCAPE_AND_REDIRECT = "UNESCAPE_AND_REDIRECT"


@dataclass(frozen=True, slots=True)
class NormalizedTarget:
    """A normalized request-target. ``path`` has no query; ``query`` is the raw text after
    ``?`` (``None``: no ``?`` at all). ``redirect``: UNESCAPE_AND_REDIRECT unescaped a slash
    and the caller should redirect the client to ``target`` instead of forwarding."""

    path: str
    query: str | None = None
    redirect: bool = False

    @property
    def target(self) -> str:
        return self.path if self.query is None else f"{self.path}?{self.query}"


_HEX = "0123456789ABCDEF"
_HEXVAL = {c: i for i, c in enumerate("0123456789abcdef")} | {c: i for i, c in enumerate(_HEX)}
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# pchar without pct-encoded, plus "/": kept as is when raw
_PATH_SAFE = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
_SLASH_CODES = (0x2F, 0x5C)
# a path made only of characters kept as they are; with no "/." and no "//" it is already normal
_ALREADY_CANONICAL = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")


def _encoded(byte: int) -> str:
    return "%" + _HEX[byte >> 4] + _HEX[byte & 15]


def _printable(target: str, limit: int = 80) -> str:
    shown = target.encode("unicode_escape", "backslashreplace").decode("ascii")
    return shown if len(shown) <= limit else shown[:limit] + "..."


def normalize_target(target: bytes | str, *, escaped_slashes: EscapedSlashes = EscapedSlashes.REJECT,
                     merge_slashes: bool = True) -> NormalizedTarget:
    """Normalize an origin-form request-target; raise ``PathRejected`` when it cannot be."""
    text = _as_text(target)
    if not text.startswith("/"):
        if text == "*":
            raise PathRejected("the asterisk-form request target '*' has no path to authorize")
        raise PathRejected(f"the request target must be a path starting with '/', got {_printable(text)!r}")
    for ch in text:
        if ch < "!" or ch == "\x7f":
            raise PathRejected(f"the request target contains a control character or space: {_printable(text)!r}")
    if "#" in text:
        raise PathRejected("the request target contains a '#fragment', which clients must not send")
    raw_path, sep, query = text.partition("?")
    if _ALREADY_CANONICAL.fullmatch(raw_path) and "/." not in raw_path and (
            not merge_slashes or "//" not in raw_path):
        return NormalizedTarget(raw_path, query if sep else None)  # the common case, no rewriting
    path, unescaped_slash = _canonical_characters(raw_path, escaped_slashes)
    path = _remove_dot_segments(path, merge_slashes)
    redirect = unescaped_slash and escaped_slashes is EscapedSlashes.UNESCAPE_AND_REDIRECT
    return NormalizedTarget(path, query if sep else None, redirect)


def normalize_path(target: bytes | str, *, escaped_slashes: EscapedSlashes = EscapedSlashes.REJECT,
                   merge_slashes: bool = True) -> str:
    """The normalized path (no query) of ``target``; raises ``PathRejected``."""
    return normalize_target(target, escaped_slashes=escaped_slashes, merge_slashes=merge_slashes).path


def _as_text(target: bytes | str) -> str:
    """Bytes as latin-1 (one char per byte, so raw non-ASCII bytes survive for the UTF-8 check)."""
    if isinstance(target, bytes):
        return target.decode("latin-1")
    # a str target: its non-ASCII characters go through the same check as raw bytes
    return target.encode("utf-8", "surrogatepass").decode("latin-1")


def _canonical_characters(path: str, escaped_slashes: EscapedSlashes) -> tuple[str, bool]:
    """Decode unreserved %XX, uppercase the rest, handle %2F/%5C, map '\\' to '/', encode
    what a path may not contain raw. Returns (path, whether an encoded slash was decoded)."""
    out: list[str] = []
    high = bytearray()  # a run of bytes >= 0x80 (raw or encoded): must be valid UTF-8
    unescaped_slash = False
    i, n = 0, len(path)
    while i < n:
        ch = path[i]
        if ch == "%":
            byte = _hex_byte(path, i)
            i += 3
            if byte >= 0x80:
                high.append(byte)
                continue
            _flush_utf8(high, out)
            if byte == 0:
                raise PathRejected("the path contains an encoded NUL (%00)")
            if byte in _SLASH_CODES:
                if escaped_slashes is EscapedSlashes.REJECT:
                    raise PathRejected("the path contains an encoded slash (%2F or %5C), which this mesh refuses")
                if escaped_slashes is EscapedSlashes.KEEP_UNCHANGED:
                    out.append(_encoded(byte))
                else:
                    out.append("/")
                    unescaped_slash = True
                continue
            decoded = chr(byte)
            out.append(decoded if decoded in _UNRESERVED else _encoded(byte))
            continue
        i += 1
        code = ord(ch)
        if code >= 0x80:
            high.append(code)
            continue
        _flush_utf8(high, out)
        if ch == "\\":
            out.append("/")
        elif ch in _PATH_SAFE:
            out.append(ch)
        else:
            out.append(_encoded(code))
    _flush_utf8(high, out)
    return "".join(out), unescaped_slash


def _hex_byte(path: str, i: int) -> int:
    hi = _HEXVAL.get(path[i + 1:i + 2])
    lo = _HEXVAL.get(path[i + 2:i + 3])
    if hi is None or lo is None:
        raise PathRejected(f"the path contains an invalid percent-encoding {path[i:i + 3]!r}")
    return hi << 4 | lo


def _flush_utf8(high: bytearray, out: list[str]) -> None:
    if not high:
        return
    try:
        bytes(high).decode("utf-8")  # strict: refuses overlong forms, surrogates, stray bytes
    except UnicodeDecodeError:
        raise PathRejected("the path contains bytes that are not valid UTF-8 "
                           "(for example an overlong encoding like %C0%AE)") from None
    out.extend(_encoded(b) for b in high)
    high.clear()


def _remove_dot_segments(path: str, merge_slashes: bool) -> str:
    """RFC 3986 5.2.4 on an absolute path, then (Envoy's order) ``//`` merging. The last
    segment stays empty when the input ends with '/', '/.' or '/..'."""
    segments = path[1:].split("/")
    last = len(segments) - 1
    out: list[str] = []
    for i, seg in enumerate(segments):
        if seg == "." or seg == "..":
            if seg == ".." and out:
                out.pop()
            if i == last:
                out.append("")
            continue
        if seg.startswith((".;", "..;")):
            raise PathRejected(f"the path segment {seg!r} is a dot segment with parameters, which is ambiguous")
        out.append(seg)
    if merge_slashes:
        out = [seg for seg in out[:-1] if seg] + out[-1:]
    return "/" + "/".join(out)
