"""HTTP/1.1 <-> HTTP/2 message translation: pure functions over the codecs' heads.

The proxy speaks HTTP/2 to an upstream for an HTTP/1.1 client (and the reverse) when the
endpoint's protocol says so. These functions map one head to the other; bodies pass
through as ``Data`` unchanged and the codecs frame them.

Requests, HTTP/1.1 -> HTTP/2 (``h1_request_to_h2``, from an ``http1.RequestHead``):

* ``:method``; ``:scheme`` as given by the caller (the downstream's scheme, ``http``
  for captured plaintext); ``:authority`` from ``Host`` — or from the target when it is
  in absolute-form (RFC 9112 3.2.2: the target's authority wins over Host); ``:path`` =
  the origin-form target (absolute-form: its path and query, ``/`` when empty;
  ``*`` for ``OPTIONS *``).
* Hop-by-hop fields removed (``headers.strip_hop_by_hop``: Connection and what it names,
  Keep-Alive, Proxy-Connection, Transfer-Encoding, Upgrade, HTTP2-Settings; ``te:
  trailers`` is kept as HTTP/2 allows); ``host`` is dropped (``:authority`` carries it).
* ``content-length`` stays when the body was length-delimited (it is end-to-end
  information in HTTP/2); a chunked body has none. ``end_stream`` when there is no body.
* Upgrades (WebSocket) are not translated (RFC 8441 extended CONNECT is not offered):
  ``TranslationError`` — the driver keeps such a request on HTTP/1.1.

Requests, HTTP/2 -> HTTP/1.1 (``h2_request_to_h1``): request-target = ``:path``,
``host`` = ``:authority`` (first field), framing from ``content_length`` or chunked when
a body of unknown length may follow; the HTTP/1 serializer writes framing and connection
fields itself.

Responses, HTTP/2 -> HTTP/1.1 (``h2_response_to_h1``): status and headers (hop-by-hop
stripped defensively); ``content_length`` when the upstream sent one, 0 for a response
that ended with its HEADERS, else unknown -> the HTTP/1 codec sends it chunked (close-
delimited to an HTTP/1.0 client). Trailers (``h1_trailers``): passed on only when the
client asked with ``TE: trailers`` (RFC 9110 6.5.1) and the body is chunked, else
dropped.

Responses, HTTP/1.1 -> HTTP/2 (``h1_response_to_h2``): status, headers without hop-by-hop
fields, ``content-length`` kept for a length-delimited body, the body's end becomes
END_STREAM; ``101`` cannot be translated (``TranslationError``).
"""

from __future__ import annotations

from nodeagent.proxy.l7 import http1, http2
from nodeagent.proxy.l7.grpc import is_grpc
from nodeagent.proxy.l7.headers import list_tokens, strip_hop_by_hop

Headers = list[tuple[bytes, bytes]]


_NO_CONTENT_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT"})


class TranslationError(ValueError):
    """A message that has no equivalent in the other protocol version."""


def split_absolute(target: bytes) -> tuple[bytes, bytes]:
    """An absolute-form target ``scheme://authority/path?q`` -> ``(authority, path)``."""
    rest = target.split(b"://", 1)[1]
    cut = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    authority = rest[:cut].rsplit(b"@", 1)[-1]  # userinfo is never forwarded
    path = rest[cut:]
    if not path:
        path = b"/"
    elif path[:1] == b"?":
        path = b"/" + path
    return authority, path


def h1_request_to_h2(head: http1.RequestHead, *, scheme: bytes = b"http") -> http2.RequestHead:
    """An HTTP/1.1 request head as an HTTP/2 request (``stream_id`` 0: set on sending)."""
    if head.upgrade is not None:
        raise TranslationError("upgrade requests cannot be sent over HTTP/2")
    target = head.target
    authority = None
    if target[:1] == b"/" or target == b"*":
        path = target
    else:
        authority, path = split_absolute(target)
    fields = strip_hop_by_hop(head.headers)
    out: Headers = []
    for name, value in fields:
        if name == b"host":
            if authority is None:
                authority = value
            continue
        if name == b"content-length" and head.chunked:
            continue
        out.append((name, value))
    if not authority:
        raise TranslationError("request without a host cannot be sent over HTTP/2")
    length = None if head.chunked else head.content_length
    return http2.RequestHead(0, head.method, scheme, authority, path, out, not head.has_body, length,
                             is_grpc(out))


def h2_request_to_h1(head: http2.RequestHead) -> http1.RequestHead:
    """An HTTP/2 request as an HTTP/1.1 request head for ``http1.ClientConnection``."""
    fields: Headers = [(b"host", head.authority)]
    fields.extend(hv for hv in strip_hop_by_hop(head.headers) if hv[0] != b"host")
    if head.end_stream:  # RFC 9110 8.6: a POST/PUT without a body says so with length 0
        length, chunked = (None if head.method in _NO_CONTENT_METHODS else 0), False
    elif head.content_length is not None:
        length, chunked = head.content_length, False
    else:
        length, chunked = None, True
    return http1.RequestHead(head.method, head.path, fields, b"1.1", True, length, chunked)


def h2_response_to_h1(head: http2.ResponseHead) -> http1.ResponseHead:
    """An HTTP/2 response head for ``http1.ServerConnection.send_response``."""
    fields = strip_hop_by_hop(head.headers)
    length = head.content_length
    if length is None and head.end_stream and head.status >= 200:
        length = 0
    return http1.ResponseHead(head.status, fields, b"", b"1.1", True, length, False)


def h1_response_to_h2(head: http1.ResponseHead) -> tuple[int, Headers]:
    """``(status, headers)`` of an HTTP/1.1 response for ``http2.ServerConnection.send_response``."""
    if head.status == 101:
        raise TranslationError("101 Switching Protocols has no HTTP/2 equivalent")
    out: Headers = []
    for name, value in strip_hop_by_hop(head.headers):
        if name == b"content-length" and head.chunked:
            continue
        if name == b"te":  # a request field; never in an HTTP/2 response
            continue
        out.append((name, value))
    return head.status, out


def accepts_trailers(request_headers: Headers) -> bool:
    """The HTTP/1.1 client sent ``TE: trailers``."""
    for name, value in request_headers:
        if name == b"te" and b"trailers" in (t.split(b";", 1)[0].strip() for t in list_tokens(value)):
            return True
    return False


def h1_trailers(trailers: Headers, request_headers: Headers) -> Headers:
    """The trailers to pass to an HTTP/1.1 client: all of them with ``TE: trailers``, else none."""
    return list(trailers) if trailers and accepts_trailers(request_headers) else []
