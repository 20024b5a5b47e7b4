"""HTTP/1.1 codec (both sides), hop-by-hop/forwarding headers and proxy error replies.

Everything is fed as bytes and checked as events and bytes: no sockets, no event loop.
"""

from __future__ import annotations

import time

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent.proxy.l7 import errors
from nodeagent.proxy.l7 import headers as hh
from nodeagent.proxy.l7.http1 import (
    ClientConnection,
    Data,
    EndOfMessage,
    Http1Limits,
    LocalProtocolError,
    ProtocolError,
    RequestHead,
    ResponseHead,
    ServerConnection,
    Upgrade,
)

EVENT_TYPES = (RequestHead, ResponseHead, Data, EndOfMessage, Upgrade, ProtocolError)


# ============================================================================ helpers

def merge_data(events):
    """Join consecutive Data events: how a body is cut into pieces is not part of the contract."""
    out = []
    for ev in events:
        if isinstance(ev, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].data + ev.data)
        elif isinstance(ev, Data) and not ev.data:
            continue
        else:
            out.append(ev)
    return out


def serve(chunks, *, conn=None, status=200, eof=False):
    """Drive a ServerConnection like the proxy would: answer each request as soon as it is
    complete (200 + a short body), then take the next pipelined one. Returns (events, output)."""
    conn = conn or ServerConnection()
    events, out = [], []

    def handle(evs):
        for ev in evs:
            events.append(ev)
            if isinstance(ev, ProtocolError):
                out.append(conn.send_error(ev))
            elif isinstance(ev, RequestHead) and ev.upgrade is not None:
                out.append(conn.send_response(ResponseHead(101, [], upgrade=ev.upgrade)))
                handle(conn.next_events())
            elif isinstance(ev, EndOfMessage) and not conn.upgraded and not conn.response_started:
                n = sum(isinstance(e, RequestHead) for e in events)
                out.append(conn.send_response(ResponseHead(status, [(b"x-n", b"%d" % n)], content_length=2)))
                out.append(conn.send_data(b"ok"))
                out.append(conn.send_end())
                if not conn.must_close:
                    handle(conn.next_events())

    for chunk in chunks:
        if conn.upgraded:
            events.append(("raw", chunk))
            continue
        handle(conn.receive_data(chunk))
    if eof and not conn.upgraded:
        handle(conn.receive_eof())
    return merge_data(events), b"".join(out)


def fetch(request: bytes, response_chunks, head: RequestHead | None = None):
    """Send ``head`` on a ClientConnection and feed it the response bytes."""
    conn = ClientConnection()
    head = head or RequestHead(b"GET", b"/", [(b"host", b"svc")])
    conn.send_request(head)
    conn.send_end()
    events = []
    for chunk in response_chunks:
        events += conn.receive_data(chunk)
    return conn, merge_data(events)


def parse_response(raw: bytes):
    """Parse bytes we produced with an independent parser: (status, headers dict, body)."""
    got = {"headers": [], "body": b"", "done": False}

    class P:
        def on_header(self, n, v):
            got["headers"].append((n.lower(), v))

        def on_body(self, b):
            got["body"] += b

        def on_message_complete(self):
            got["done"] = True

    p = httptools.HttpResponseParser(P())
    p.feed_data(raw)
    assert got["done"], raw
    return p.get_status_code(), dict(got["headers"]), got["body"]


def first_error(events):
    errs = [e for e in events if isinstance(e, ProtocolError)]
    assert errs, events
    return errs[0]


def bad_request(raw: bytes) -> ProtocolError:
    events, out = serve([raw])
    err = first_error(events)
    # a protocol error always yields a well-formed response and close
    status, hdrs, body = parse_response(out)
    assert status == err.status
    assert hdrs[b"connection"] == b"close"
    assert hdrs[b"x-hostmesh-flags"] == err.flag.encode()
    assert int(hdrs[b"content-length"]) == len(body) and body
    return err


GET = b"GET /a?b=1 HTTP/1.1\r\nHost: svc\r\nUser-Agent: t\r\n\r\n"
POST_CL = b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 11\r\n\r\nhello world"
POST_CHUNKED = (b"POST /c HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\nX-Two:  2 \r\n\r\n")
WS = (b"GET /chat HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
H2C_POST = (b"POST /h HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 4\r\n\r\nbody")


# ============================================================================ requests: parsing

def test_simple_get():
    events, out = serve([GET])
    head, eom = events
    assert head == RequestHead(b"GET", b"/a?b=1", [(b"host", b"svc"), (b"user-agent", b"t")],
                               b"1.1", True, None, False, None, False)
    assert eom == EndOfMessage([])
    assert out == b"HTTP/1.1 200 OK\r\nx-n: 1\r\ncontent-length: 2\r\n\r\nok"


def test_content_length_body_is_streamed_as_data():
    conn = ServerConnection()
    evs = conn.receive_data(POST_CL[:-6])
    assert [type(e) for e in evs] == [RequestHead, Data]
    assert evs[0].content_length == 11 and evs[0].has_body and evs[1] == Data(b"hello")
    assert conn.receive_data(POST_CL[-6:]) == [Data(b" world"), EndOfMessage([])]


def test_chunked_body_with_extensions_and_trailers():
    events, _ = serve([POST_CHUNKED])
    head, body, eom = events
    assert head.chunked and head.content_length is None and head.has_body
    assert body == Data(b"hello world")
    assert eom == EndOfMessage([(b"x-checksum", b"abc"), (b"x-two", b"2")])


def test_names_lowercased_values_trimmed_order_and_duplicates_kept():
    raw = b"GET / HTTP/1.1\r\nHost: svc\r\nX-A:   v1 \t\r\nx-a: v2\r\nCookie: a=1\r\nX-Empty:\r\n\r\n"
    head = serve([raw])[0][0]
    assert head.headers == [(b"host", b"svc"), (b"x-a", b"v1"), (b"x-a", b"v2"), (b"cookie", b"a=1"),
                            (b"x-empty", b"")]


def test_http10_request_and_keep_alive_semantics():
    head = serve([b"GET / HTTP/1.0\r\n\r\n"])[0][0]
    assert head.version == b"1.0" and head.keep_alive is False  # no Host needed in 1.0
    head = serve([b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"])[0][0]
    assert head.keep_alive is True
    head = serve([b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"])[0][0]
    assert head.keep_alive is False


def test_expect_continue_and_absolute_and_asterisk_forms():
    head = serve([b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 0\r\n\r\n"])[0][0]
    assert head.expect_continue and head.content_length == 0 and not head.has_body
    assert serve([b"GET http://svc:8080/p?q HTTP/1.1\r\nHost: svc:8080\r\n\r\n"])[0][0].target == b"http://svc:8080/p?q"
    assert serve([b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"])[0][0].target == b"*"


MESSAGES = {
    "get": [GET],
    "pipelined": [GET, POST_CL, GET],
    "chunked+trailers": [POST_CHUNKED],
    "cl then chunked then get": [POST_CL, POST_CHUNKED, GET],
    "websocket with early frames": [WS + b"\x81\x85abcdEFGHI"],
    "declined h2c upgrade with body": [H2C_POST, GET],
    "leading CRLF between requests": [GET, b"\r\n", GET],
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_request_parsing_is_independent_of_chunking(name):
    data = b"".join(MESSAGES[name])
    whole = serve([data])
    assert not any(isinstance(e, ProtocolError) for e in whole[0]), whole[0]
    bytewise = serve([data[i:i + 1] for i in range(len(data))])

    def norm(result):  # raw bytes after an upgrade arrive as they were cut
        events, out = result
        flat, raw = [], b""
        for e in events:
            if isinstance(e, tuple):
                raw += e[1]
            elif isinstance(e, Upgrade):
                raw += e.data
            else:
                flat.append(e)
        return flat, raw, out

    expected = norm(whole)
    assert norm(bytewise) == expected
    for i in range(1, len(data)):
        assert norm(serve([data[:i], data[i:]])) == expected, i


# ============================================================================ requests: safe defaults

@pytest.mark.parametrize("raw", [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
])
def test_content_length_with_transfer_encoding_is_400(raw):
    assert bad_request(raw).status == 400


@pytest.mark.parametrize("raw", [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",  # equal too (llhttp)
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\nabcd",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
])
def test_duplicate_or_invalid_content_length_is_400(raw):
    assert bad_request(raw).status == 400


@pytest.mark.parametrize("body", [
    b"zz\r\nabc\r\n0\r\n\r\n",  # not hex
    b"3\r\nabcX0\r\n\r\n",  # no CRLF after the data
    b"3\nabc\n0\n\n",  # bare LF
    b"-3\r\nabc\r\n0\r\n\r\n",
    b"0x3\r\nabc\r\n0\r\n\r\n",
    b"3 \r\nabc\r\n0\r\n\r\n",  # whitespace after the size
    b"fffffffffffffffffff\r\n",  # size overflow
    b"3;\x01\r\nabc\r\n0\r\n\r\n",  # control byte in an extension
])
def test_malformed_chunked_encoding_is_400(body):
    raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    assert bad_request(raw).status == 400


def test_malformed_chunk_after_the_head_was_delivered():
    conn = ServerConnection()
    evs = conn.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert [type(e) for e in evs] == [RequestHead, Data]
    err = first_error(conn.receive_data(b"zz\r\n"))
    assert err.status == 400
    out = conn.send_error(err)  # no response started yet: a full 400
    assert parse_response(out)[0] == 400 and conn.must_close
    assert conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == []  # nothing more is parsed


@pytest.mark.parametrize("te,status", [
    (b"gzip, chunked", 501),  # a coding we could not forward
    (b"chunked, chunked", 400),
    (b"gzip", 400),  # chunked is not the final coding: length unknown (RFC 9112 6.3)
    (b"xchunked", 400),
    (b"chunked;x=1", 400),
])
def test_transfer_codings_other_than_chunked(te, status):
    raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + te + b"\r\n\r\n0\r\n\r\n"
    assert bad_request(raw).status == status


def test_transfer_encoding_in_http10_request_is_400():
    assert bad_request(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").status == 400


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",  # CR in a value
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\nb\r\n\r\n",  # LF in a value
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",  # NUL in a value
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX\x00Y: ab\r\n\r\n",  # NUL in a name
    b"GET / HTTP/1.1\r\nHost: a\r\nX\rY: ab\r\n\r\n",  # CR in a name
    b"GET / HTTP/1.1\r\nHost: a\r\nX Y: ab\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nXY : ab\r\n\r\n",  # whitespace before the colon
    b"GET / HTTP/1.1\r\nHost: a\r\n: ab\r\n\r\n",  # empty name
    b"GET / HTTP/1.1\nHost: a\n\n",  # bare LF line endings
])
def test_cr_lf_nul_and_bad_field_syntax_is_400(raw):
    assert bad_request(raw).status == 400


@pytest.mark.parametrize("fold", [b"\r\n continued", b"\r\n\tcontinued"])
def test_obs_fold_is_400(fold):
    assert bad_request(b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: first" + fold + b"\r\n\r\n").status == 400


def many_headers(n: int, size: int = 1) -> bytes:
    fields = b"".join(b"X-%05d: %s\r\n" % (i, b"v" * size) for i in range(n - 1))
    return b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n"


def test_header_count_limit_is_431():
    events, _ = serve([many_headers(100)])
    assert isinstance(events[0], RequestHead) and len(events[0].headers) == 100
    err = bad_request(many_headers(101))
    assert err.status == 431 and "too many" in err.reason


def test_header_bytes_limit_is_431():
    limit = 60 * 1024
    fits = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * (limit - len(b"hosta") - len(b"x-big")) + b"\r\n\r\n"
    assert isinstance(serve([fits])[0][0], RequestHead)
    over = fits.replace(b"X-Big: ", b"X-Big: v")
    assert bad_request(over).status == 431
    assert bad_request(many_headers(60, size=1100)).status == 431  # many medium fields


def test_an_endless_header_line_is_cut_off_with_bounded_memory():
    conn = ServerConnection()
    assert conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ") == []
    events = []
    for _ in range(200_000):  # one byte at a time, never a newline
        events += conn.receive_data(b"a")
        assert len(conn._pending) <= 8192
        if events:
            break
    err = first_error(events)
    assert err.status == 431
    assert parse_response(conn.send_error(err))[0] == 431


def test_trailer_limits_are_431():
    trailers = b"".join(b"T-%03d: x\r\n" % i for i in range(101))
    raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + trailers + b"\r\n"
    assert bad_request(raw).status == 431
    conn = ServerConnection()
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: ")
    events = []
    for _ in range(200):
        events += conn.receive_data(b"x" * 1024)
        if events:
            break
    assert first_error(events).status == 431


def test_limits_are_configurable():
    conn = ServerConnection(Http1Limits(max_headers=3))
    assert first_error(conn.receive_data(many_headers(4))).status == 431
    conn = ServerConnection(Http1Limits(max_target_bytes=10))
    assert first_error(conn.receive_data(b"GET /0123456789 HTTP/1.1\r\nHost: a\r\n\r\n")).status == 414


@pytest.mark.parametrize("raw,status", [
    (b"GET abc HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # not a request-target form
    (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # asterisk-form only for OPTIONS
    (b"GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET ftp://a/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /" + b"x" * (32 * 1024) + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
])
def test_invalid_request_target(raw, status):
    assert bad_request(raw).status == status


@pytest.mark.parametrize("raw,status", [
    (b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n", 405),
    (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET /\r\n\r\n", 400),  # HTTP/0.9
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 400),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n", 400),
])
def test_invalid_method_version_and_host(raw, status):
    assert bad_request(raw).status == status


def test_header_read_timeout_answers_408_and_closes():
    conn = ServerConnection()
    assert conn.awaiting_head
    assert conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: 1") == []
    out = conn.on_timeout()
    status, hdrs, _ = parse_response(out)
    assert status == 408 and hdrs[b"connection"] == b"close" and hdrs[b"x-hostmesh-flags"] == b"SI"
    assert conn.must_close and not conn.awaiting_head
    assert conn.receive_data(b"\r\n\r\n") == []


def test_header_read_timeout_on_an_idle_keep_alive_connection_closes_silently():
    conn = ServerConnection()
    serve([GET], conn=conn)
    assert conn.awaiting_head and not conn.must_close
    assert conn.on_timeout() == b"" and conn.must_close


def test_after_a_protocol_error_nothing_more_is_parsed():
    conn = ServerConnection()
    evs = conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nX: \x00\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(evs) == 1 and isinstance(evs[0], ProtocolError)
    assert conn.receive_data(GET) == [] and conn.receive_eof() == []


# ============================================================================ upgrades

def test_h2c_upgrade_is_ignored_and_never_answered_with_101():
    events, out = serve([H2C_POST])
    head, body, eom = events
    assert head.upgrade is None and head.content_length == 4
    assert body == Data(b"body") and eom == EndOfMessage([])
    assert b"101" not in out
    # forwarded as a plain request: h2c fields gone (headers.py strips, the serializer too)
    client = ClientConnection()
    wire = client.send_request(head)  # even without prepare_request
    assert b"h2c" not in wire.lower() and b"http2-settings" not in wire.lower() and b"upgrade" not in wire.lower()
    prepared, _ = hh.prepare_request(head.headers, client="198.18.1.5", new_id=lambda: b"id")
    assert {n for n, _ in prepared} == {b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto",
                                        b"x-request-id"}
    # and the server side refuses a 101 for it
    conn = ServerConnection()
    conn.receive_data(H2C_POST)
    with pytest.raises(LocalProtocolError):
        conn.send_response(ResponseHead(101, [(b"upgrade", b"h2c")], upgrade=b"h2c"))


def test_h2c_upgrade_without_body_and_without_connection_option():
    for raw in (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAA\r\n\r\n" + GET,
                b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\n\r\n" + GET):
        events, out = serve([raw])
        heads = [e for e in events if isinstance(e, RequestHead)]
        assert len(heads) == 2 and all(h.upgrade is None for h in heads)
        assert out.count(b"HTTP/1.1 200 OK") == 2


def test_h2c_is_never_passed_even_if_allowed():
    conn = ServerConnection(allowed_upgrades=(b"websocket", b"h2c"))
    head = conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n")[0]
    assert head.upgrade is None


def test_websocket_upgrade_passthrough_end_to_end():
    server = ServerConnection()
    evs = server.receive_data(WS + b"\x81\x85early")
    head = evs[0]
    assert head.upgrade == b"websocket" and evs[1] == EndOfMessage([])
    assert server.receive_data(b"more") == []  # held until the upstream answers
    fwd, _ = hh.prepare_request(head.headers, client="198.18.1.5", upgrade=True, new_id=lambda: b"id")
    client = ClientConnection()
    wire = client.send_request(RequestHead(head.method, head.target, fwd, upgrade=head.upgrade))
    wire += client.send_end()
    assert b"connection: upgrade\r\nupgrade: websocket\r\n" in wire and b"sec-websocket-key:" in wire
    resp = client.receive_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                               b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi")
    rh, up = resp
    assert rh.status == 101 and rh.upgrade == b"websocket" and up == Upgrade(b"\x81\x02hi")
    assert client.upgraded and not client.reusable
    out = server.send_response(ResponseHead(rh.status, hh.prepare_response(rh.headers, upgrade=True),
                                            upgrade=rh.upgrade))
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in out
    assert out.endswith(b"connection: upgrade\r\nupgrade: websocket\r\n\r\n")
    assert server.next_events() == [Upgrade(b"\x81\x85earlymore")]
    assert server.upgraded
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"raw")


def test_declined_websocket_upgrade_continues_as_http():
    server = ServerConnection()
    evs = server.receive_data(WS + GET)  # a pipelined GET behind the upgrade request
    assert evs[0].upgrade == b"websocket" and len(evs) == 2
    server.send_response(ResponseHead(403, [], content_length=0))
    server.send_end()
    nxt = server.next_events()
    assert [type(e) for e in nxt] == [RequestHead, EndOfMessage] and nxt[0].target == b"/a?b=1"


def test_upgrade_with_a_body_or_unknown_protocol_is_a_plain_request():
    raw = (b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 3\r\n\r\n"
           b"abc" + GET)
    events, _ = serve([raw])
    assert [type(e) for e in events] == [RequestHead, Data, EndOfMessage, RequestHead, EndOfMessage]
    assert events[0].upgrade is None and events[1] == Data(b"abc")
    events, _ = serve([b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: foo/1\r\n\r\n" + GET])
    assert [type(e) for e in events] == [RequestHead, EndOfMessage, RequestHead, EndOfMessage]
    assert events[0].upgrade is None


def test_upstream_101_for_a_request_that_did_not_ask_is_502():
    conn, events = fetch(b"", [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"])
    err = first_error(events)
    assert err.status == 502 and err.flag == "UPE" and not conn.upgraded and not conn.reusable
    head = RequestHead(b"GET", b"/", [(b"host", b"a")], upgrade=b"websocket")
    conn, events = fetch(b"", [b"HTTP/1.1 101 Switching Protocols\r\n\r\n"], head)
    assert first_error(events).status == 502 and not any(isinstance(e, ResponseHead) for e in events)


# ============================================================================ keep-alive and pipelining

def test_pipelined_requests_wait_for_the_response_in_flight():
    conn = ServerConnection()
    evs = conn.receive_data(GET + POST_CL + GET)
    assert [type(e) for e in evs] == [RequestHead, EndOfMessage]
    assert conn.in_flight and not conn.paused
    assert conn.next_events() == []
    conn.send_response(ResponseHead(204, []))
    assert conn.next_events() == []  # the response has not ended yet
    conn.send_end()
    nxt = conn.next_events()
    assert [type(e) for e in nxt] == [RequestHead, Data, EndOfMessage] and nxt[0].method == b"POST"
    conn.send_response(ResponseHead(200, [], content_length=0))
    conn.send_end()
    assert [type(e) for e in conn.next_events()] == [RequestHead, EndOfMessage]


def test_pipelining_is_bounded_by_paused():
    conn = ServerConnection(Http1Limits(max_pipelined=4, max_buffered=1000))
    conn.receive_data(GET * 6)
    assert conn.paused  # 5 queued behind the one in flight
    for _ in range(2):
        conn.send_response(ResponseHead(204, []))
        conn.send_end()
        conn.next_events()
    assert not conn.paused
    conn = ServerConnection(Http1Limits(max_buffered=1000))
    conn.receive_data(GET + b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n" + b"x" * 2000)
    assert conn.paused  # queued body bytes of the next request
    conn.send_response(ResponseHead(204, []))
    conn.send_end()
    nxt = conn.next_events()
    assert sum(len(e.data) for e in nxt if isinstance(e, Data)) == 2000 and not conn.paused


def test_connection_close_request_closes_after_the_response():
    conn = ServerConnection()
    evs = conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GET)
    assert [type(e) for e in evs] == [RequestHead, EndOfMessage]  # the rest is ignored
    out = conn.send_response(ResponseHead(200, [], content_length=0))
    assert b"connection: close\r\n" in out
    conn.send_end()
    assert conn.must_close and conn.next_events() == []


def test_http10_client_response_framing():
    conn = ServerConnection()
    conn.receive_data(b"GET / HTTP/1.0\r\n\r\n")
    out = conn.send_response(ResponseHead(200, [(b"x", b"1")]))  # unknown length
    assert out == b"HTTP/1.1 200 OK\r\nx: 1\r\nconnection: close\r\n\r\n"  # close-delimited, not chunked
    assert conn.send_data(b"abc") == b"abc" and conn.send_end() == b"" and conn.must_close
    conn = ServerConnection()
    conn.receive_data(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    out = conn.send_response(ResponseHead(200, [], content_length=3))
    assert out == b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: keep-alive\r\n\r\n"
    conn.send_data(b"abc")
    conn.send_end()
    assert not conn.must_close


def test_no_1xx_to_http10_clients_and_100_continue_to_http11():
    conn = ServerConnection()
    conn.receive_data(b"PUT / HTTP/1.0\r\nContent-Length: 1\r\n\r\n")
    assert conn.send_response(ResponseHead(100, [])) == b""
    conn = ServerConnection()
    conn.receive_data(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
    assert conn.send_response(ResponseHead(100, [(b"content-length", b"5")])) == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert conn.receive_data(b"x") == [Data(b"x"), EndOfMessage([])]
    assert conn.send_response(ResponseHead(201, [], content_length=0)).startswith(b"HTTP/1.1 201 Created\r\n")


def test_response_framing_rules():
    def respond(request: bytes, head: ResponseHead, body=b"", trailers=()):
        conn = ServerConnection()
        conn.receive_data(request)
        out = conn.send_response(head) + conn.send_data(body) + conn.send_end(trailers)
        return out, conn

    out, _ = respond(GET, ResponseHead(200, [], content_length=3), b"abc")
    assert out == b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc"
    out, _ = respond(GET, ResponseHead(200, []), b"abc", [(b"grpc-status", b"0"), (b"content-length", b"9")])
    assert out == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\ngrpc-status: 0\r\n\r\n"
    head_req = b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"
    out, _ = respond(head_req, ResponseHead(200, [], content_length=1234), b"ignored")
    assert out == b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"  # HEAD: length kept, no body
    out, _ = respond(GET, ResponseHead(204, [], content_length=0), b"")
    assert out == b"HTTP/1.1 204 No Content\r\n\r\n"
    out, _ = respond(GET, ResponseHead(304, [(b"etag", b'"x"')], content_length=10))
    assert out == b'HTTP/1.1 304 Not Modified\r\netag: "x"\r\ncontent-length: 10\r\n\r\n'
    # framing fields in the header list never reach the wire: the codec writes its own
    out, _ = respond(GET, ResponseHead(200, [(b"content-length", b"99"), (b"transfer-encoding", b"chunked"),
                                             (b"connection", b"keep-alive"), (b"keep-alive", b"timeout=5")],
                                       content_length=2), b"ok")
    assert out == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    # reason phrases are regenerated; an unknown status gets an empty one
    out, _ = respond(GET, ResponseHead(299, [], reason=b"Whatever\x01", content_length=0))
    assert out == b"HTTP/1.1 299 \r\ncontent-length: 0\r\n\r\n"


def test_send_side_refuses_bad_input():
    conn = ServerConnection()
    conn.receive_data(GET)
    with pytest.raises(LocalProtocolError):
        conn.send_response(ResponseHead(200, [(b"x", b"a\r\nInjected: 1")]))
    with pytest.raises(LocalProtocolError):
        conn.send_response(ResponseHead(200, [(b"bad name", b"v")]))
    conn.send_response(ResponseHead(200, [], content_length=2))
    with pytest.raises(LocalProtocolError):
        conn.send_data(b"abc")  # longer than content-length
    with pytest.raises(LocalProtocolError):
        conn.send_end()  # shorter
    with pytest.raises(LocalProtocolError):
        ServerConnection().send_response(ResponseHead(200, []))  # no request
    client = ClientConnection()
    with pytest.raises(LocalProtocolError):
        client.send_request(RequestHead(b"GET", b"/", [(b"x", b"y")]))  # no host
    with pytest.raises(LocalProtocolError):
        client.send_request(RequestHead(b"GET", b"/a b", [(b"host", b"a")]))
    client.send_request(RequestHead(b"GET", b"/", [(b"host", b"a")]))
    with pytest.raises(LocalProtocolError):
        client.send_request(RequestHead(b"GET", b"/", [(b"host", b"a")]))  # one at a time


def test_response_ending_before_its_request_closes_the_connection():
    conn = ServerConnection()
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\npartial")
    out = conn.send_local_reply("RL")
    status, hdrs, body = parse_response(out)
    assert status == 429 and hdrs[b"x-hostmesh-flags"] == b"RL" and body == b"rate limited"
    assert conn.must_close


def test_local_reply_keeps_the_connection_and_respects_head():
    conn = ServerConnection()
    conn.receive_data(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n" + GET)
    out = conn.send_local_reply("UH")
    assert out == (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nx-hostmesh-flags: UH\r\n"
                   b"content-length: 19\r\n\r\n")
    assert not conn.must_close
    assert [type(e) for e in conn.next_events()] == [RequestHead, EndOfMessage]
    out = conn.send_local_reply("NR", close=True)
    assert parse_response(out)[1][b"connection"] == b"close" and conn.must_close


def test_client_eof():
    conn = ServerConnection()
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    err = first_error(conn.receive_eof())
    assert err.status == 400
    conn = ServerConnection()
    assert [type(e) for e in conn.receive_data(GET)] == [RequestHead, EndOfMessage]
    assert conn.receive_eof() == [] and not conn.must_close  # the response is still owed
    conn.send_response(ResponseHead(200, [], content_length=0))
    conn.send_end()
    assert conn.must_close and conn.eof_received
    conn = ServerConnection()
    assert conn.receive_eof() == [] and conn.must_close and not conn.in_flight


# ============================================================================ upstream side

def test_request_serialization():
    c = ClientConnection()
    h = [(b"host", b"svc"), (b"te", b"trailers"), (b"content-length", b"1"), (b"connection", b"close")]
    wire = c.send_request(RequestHead(b"POST", b"/p", h, version=b"1.0", content_length=3))
    assert wire == b"POST /p HTTP/1.1\r\nhost: svc\r\nte: trailers\r\ncontent-length: 3\r\n\r\n"
    assert c.send_data(b"abc") == b"abc" and c.send_end([(b"x", b"y")]) == b""  # no trailers without chunked
    c = ClientConnection()
    wire = c.send_request(RequestHead(b"POST", b"/p", [(b"host", b"svc")], chunked=True))
    wire += c.send_data(b"hello") + c.send_data(b"") + c.send_end([(b"grpc-status", b"0"), (b"host", b"x")])
    assert wire == (b"POST /p HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\n\r\n")
    c = ClientConnection()
    assert c.send_request(RequestHead(b"GET", b"/", [(b"host", b"svc")])) == b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n"


RESPONSES = {
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
    "chunked+trailers": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nabc\r\n2;e=1\r\nde\r\n0\r\nGrpc-Status: 0\r\n\r\n"),
    "100 then 200": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "103 early hints": b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(RESPONSES))
def test_response_parsing_is_independent_of_chunking(name):
    data = RESPONSES[name]
    conn, whole = fetch(b"", [data])
    assert isinstance(whole[-1], EndOfMessage) and conn.reusable, whole
    assert fetch(b"", [data[i:i + 1] for i in range(len(data))])[1] == whole
    for i in range(1, len(data)):
        assert fetch(b"", [data[:i], data[i:]])[1] == whole, i


def test_response_events():
    _, evs = fetch(b"", [RESPONSES["chunked+trailers"]])
    head, body, eom = evs
    assert head.status == 200 and head.chunked and head.reason == b"OK" and head.keep_alive
    assert body == Data(b"abcde") and eom == EndOfMessage([(b"grpc-status", b"0")])
    _, evs = fetch(b"", [RESPONSES["100 then 200"]])
    assert [e.status for e in evs if isinstance(e, ResponseHead)] == [100, 200]
    assert evs[0].informational and not evs[1].informational


def test_head_response_has_no_body_whatever_its_length():
    head = RequestHead(b"HEAD", b"/", [(b"host", b"svc")])
    for resp in (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n",
                 b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                 b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"):
        for chunks in ([resp], [resp[i:i + 1] for i in range(len(resp))]):
            conn, evs = fetch(b"", chunks, head)
            assert isinstance(evs[-1], EndOfMessage) and not any(isinstance(e, Data) for e in evs), resp
            assert conn.reusable
    conn, evs = fetch(b"", [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"], head)  # a body anyway
    assert isinstance(evs[-1], EndOfMessage) and not conn.reusable


def test_close_delimited_response_ends_at_eof_and_is_not_reusable():
    conn, evs = fetch(b"", [b"HTTP/1.1 200 OK\r\n\r\nabc", b"def"])
    assert [type(e) for e in evs] == [ResponseHead, Data]
    assert not evs[0].keep_alive and evs[0].content_length is None and not evs[0].chunked
    assert conn.receive_eof() == [EndOfMessage([])]
    assert not conn.reusable


def test_upstream_eof_before_or_inside_a_response():
    conn = ClientConnection()
    conn.send_request(RequestHead(b"GET", b"/", [(b"host", b"a")]))
    conn.send_end()
    err = first_error(conn.receive_eof())
    assert (err.status, err.flag) == (503, "UC")
    conn, _ = fetch(b"", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"])
    err = first_error(conn.receive_eof())
    assert (err.status, err.flag) == (502, "UC") and not conn.reusable


def test_keep_alive_reuse_and_its_exceptions():
    conn, _ = fetch(b"", [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    assert conn.reusable and conn.idle
    conn.send_request(RequestHead(b"GET", b"/2", [(b"host", b"a")]))
    assert not conn.reusable  # busy
    for resp in (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                 b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"):
        assert not fetch(b"", [resp])[0].reusable
    assert fetch(b"", [b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"])[0].reusable
    # unsolicited bytes: after the response, or on an idle connection
    assert not fetch(b"", [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"])[0].reusable
    conn, _ = fetch(b"", [b"HTTP/1.1 204 No Content\r\n\r\n"])
    assert conn.receive_data(b"HTTP/1.1 408 Request Timeout\r\n\r\n") == [] and not conn.reusable


def test_early_response_before_the_request_body_was_sent():
    conn = ClientConnection()
    conn.send_request(RequestHead(b"POST", b"/", [(b"host", b"a")], content_length=10))
    evs = conn.receive_data(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
    assert [type(e) for e in evs] == [ResponseHead, EndOfMessage] and not conn.reusable


@pytest.mark.parametrize("resp", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: \x00\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 099 Weird\r\n\r\n",
    b"HTTP/1.1 600 Weird\r\n\r\n",
    b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    b"SSH-2.0-OpenSSH\r\n",
])
def test_bad_responses_are_502_upstream_protocol_errors(resp):
    conn, evs = fetch(b"", [resp])
    err = first_error(evs)
    assert (err.status, err.flag) == (502, "UPE") and not conn.reusable
    assert parse_response(errors.http1_response(err.flag, err.status, err.reason))[0] == 502


def test_response_header_limits_are_502():
    big = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%03d: v\r\n" % i for i in range(101)) + b"\r\n"
    assert first_error(fetch(b"", [big])[1]).status == 502


# ============================================================================ hypothesis fuzzing

VALID = [GET, POST_CL, POST_CHUNKED, WS, H2C_POST, b"GET / HTTP/1.0\r\n\r\n",
         b"HEAD /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"]
ALLOWED_STATUSES = {400, 405, 408, 414, 431, 501, 505}


def check_server_stream(chunks, eof):
    t0 = time.monotonic()
    events, _ = serve(chunks, eof=eof)
    assert time.monotonic() - t0 < 2.0
    errs = 0
    for ev in events:
        if isinstance(ev, tuple):  # raw bytes after an upgrade
            continue
        assert isinstance(ev, EVENT_TYPES), ev
        if isinstance(ev, ProtocolError):
            errs += 1
            assert ev.status in ALLOWED_STATUSES and ev.flag == "DPE"
    assert errs <= 1
    if errs:
        assert isinstance([e for e in events if not isinstance(e, tuple)][-1], ProtocolError)


def chunked_stream(data: bytes, cuts: list[int]):
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points + [len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=6), st.booleans())
def test_fuzz_request_parser_random_bytes(data, cuts, eof):
    check_server_stream(chunked_stream(data, cuts), eof)


@st.composite
def mutated_requests(draw):
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(VALID), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        i = draw(st.integers(0, len(data)))
        if op == "insert":
            data[i:i] = draw(st.sampled_from([b"\r", b"\n", b"\x00", b" ", b":", b",", b"0", b"chunked",
                                              b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
                                              b"\r\n\r\n", b"\xff", b"\t"]))
        elif data and i < len(data):
            if op == "flip":
                data[i] = draw(st.integers(0, 255))
            else:
                del data[i]
    return bytes(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_requests(), st.lists(st.integers(0, 2000), max_size=8), st.booleans())
def test_fuzz_request_parser_mutated_requests(data, cuts, eof):
    check_server_stream(chunked_stream(data, cuts), eof)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(RESPONSES.values()) + [b"HTTP/1.1 200 OK\r\n\r\nclose-delimited"]),
       st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=3),
       st.lists(st.integers(0, 400), max_size=5), st.booleans(), st.booleans())
def test_fuzz_response_parser(resp, flips, cuts, head_request, eof):
    data = bytearray(resp)
    for i, b in flips:
        if data:
            data[i % len(data)] = b
    conn = ClientConnection()
    conn.send_request(RequestHead(b"HEAD" if head_request else b"GET", b"/", [(b"host", b"a")]))
    conn.send_end()
    events = []
    for chunk in chunked_stream(bytes(data), cuts):
        events += conn.receive_data(chunk)
    if eof:
        events += conn.receive_eof()
    for ev in events:
        assert isinstance(ev, EVENT_TYPES)
        if isinstance(ev, ProtocolError):
            assert ev.status in (502, 503) and ev.flag in ("UPE", "UC")
    assert sum(isinstance(e, ProtocolError) for e in events) <= 1
    assert sum(isinstance(e, EndOfMessage) for e in events) <= 1


# ============================================================================ headers.py

def test_strip_hop_by_hop():
    h = [(b"host", b"a"), (b"connection", b"keep-alive, X-Secret, TE, Upgrade"), (b"keep-alive", b"timeout=5"),
         (b"proxy-connection", b"keep-alive"), (b"transfer-encoding", b"chunked"), (b"upgrade", b"websocket"),
         (b"http2-settings", b"AAA"), (b"x-secret", b"1"), (b"te", b"trailers, deflate;q=0.5"),
         (b"trailer", b"grpc-status"), (b"content-length", b"3"), (b"x-keep", b"yes")]
    assert hh.strip_hop_by_hop(h) == [(b"host", b"a"), (b"trailer", b"grpc-status"), (b"content-length", b"3"),
                                      (b"x-keep", b"yes"), (b"te", b"trailers")]
    kept = hh.strip_hop_by_hop(h, upgrade=True)
    assert (b"upgrade", b"websocket") in kept and not any(n == b"connection" for n, _ in kept)
    assert hh.strip_hop_by_hop([(b"te", b"gzip")]) == []
    assert h[1] == (b"connection", b"keep-alive, X-Secret, TE, Upgrade")  # input untouched


def test_connection_cannot_nominate_fields_meant_for_everyone():
    h = [(b"connection", b"Host, X-Forwarded-For, x-request-id, content-length, :path, x-other"),
         (b"host", b"a"), (b"x-forwarded-for", b"1.2.3.4"), (b"x-request-id", b"abc"), (b"content-length", b"0"),
         (b"x-other", b"gone")]
    assert hh.strip_hop_by_hop(h) == [(b"host", b"a"), (b"x-forwarded-for", b"1.2.3.4"), (b"x-request-id", b"abc"),
                                      (b"content-length", b"0")]


def test_forwarded_for_and_proto():
    assert hh.append_forwarded_for([(b"host", b"a")], "198.18.1.5") == [(b"host", b"a"),
                                                                       (b"x-forwarded-for", b"198.18.1.5")]
    h = [(b"x-forwarded-for", b"1.1.1.1, 2.2.2.2"), (b"host", b"a"), (b"x-forwarded-for", b"3.3.3.3")]
    assert hh.append_forwarded_for(h, b"198.18.1.5") == [(b"host", b"a"), (
        b"x-forwarded-for", b"1.1.1.1, 2.2.2.2, 3.3.3.3, 198.18.1.5")]
    out, rid = hh.prepare_request([(b"host", b"a")], client="10.0.0.1", new_id=lambda: b"gen")
    assert out == [(b"host", b"a"), (b"x-forwarded-for", b"10.0.0.1"), (b"x-forwarded-proto", b"http"),
                   (b"x-request-id", b"gen")] and rid == b"gen"
    out, _ = hh.prepare_request([(b"x-forwarded-proto", b"https")], client=None, proto="http",
                                forwarded_host=b"orig.example", via=b"1.1 hostmesh", new_id=lambda: b"g")
    assert out == [(b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"orig.example"),
                   (b"via", b"1.1 hostmesh"), (b"x-request-id", b"g")]


def test_request_id_kept_when_valid_generated_otherwise():
    h, rid = hh.ensure_request_id([(b"x-request-id", b"3f2b-AB_c.9")], new_id=lambda: b"new")
    assert rid == b"3f2b-AB_c.9" and h == [(b"x-request-id", b"3f2b-AB_c.9")]
    for bad in (b"", b"has space", b"x" * 129, b"semi;colon", b"\xff"):
        h, rid = hh.ensure_request_id([(b"x-request-id", bad)], new_id=lambda: b"new")
        assert rid == b"new" and h == [(b"x-request-id", b"new")], bad
    h, rid = hh.ensure_request_id([(b"x-request-id", b"bad id"), (b"x-request-id", b"good"),
                                   (b"x-request-id", b"second")])
    assert rid == b"good" and h == [(b"x-request-id", b"good")]
    _, generated = hh.ensure_request_id([])
    assert len(generated) == 36 and generated[14:15] == b"4"  # a UUID4
    assert hh.get([(b"a", b"1"), (b"a", b"2")], b"a") == b"1" and hh.get([], b"a") is None


_FIELD_NAMES = st.sampled_from([b"host", b"x-a", b"connection", b"te", b"upgrade", b"x-request-id",
                                b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via", b"keep-alive"])
_FIELD_VALUES = st.sampled_from([b"a", b"keep-alive", b"close", b"x-a", b"trailers", b"websocket", b"3f2b-ok",
                                 b"bad id", b"1.1.1.1", b""])


@given(st.lists(st.tuples(_FIELD_NAMES, _FIELD_VALUES), max_size=6), st.booleans(),
       st.sampled_from([None, b"orig.example"]), st.sampled_from([None, "10.0.0.1"]))
def test_prepare_request_short_cut_matches_the_general_pass(fields, upgrade, fhost, client):
    # a list takes the short cut when it can; any other iterable always takes the general pass
    fast = hh.prepare_request(list(fields), client=client, upgrade=upgrade, forwarded_host=fhost,
                              new_id=lambda: b"gen")
    general = hh.prepare_request(iter(fields), client=client, upgrade=upgrade, forwarded_host=fhost,
                                 new_id=lambda: b"gen")
    assert fast == general


def test_request_ids_batch_uuid4s_and_forget_them_in_a_forked_child():
    import os
    import uuid
    ids = hh.RequestIds(batch=4)
    seen = set()
    for _ in range(50):  # several refills
        rid = ids()
        u = uuid.UUID(rid.decode())
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u).encode() == rid
        seen.add(rid)
    assert len(seen) == 50
    pid = os.fork()
    if pid == 0:  # the child must not hand out the parent's remaining random bytes
        os._exit(0 if ids._hex == b"" else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and ids._hex != b""


def test_response_headers_prepared():
    h = [(b"connection", b"close"), (b"keep-alive", b"timeout=5"), (b"upgrade", b"websocket"), (b"x", b"1")]
    assert hh.prepare_response(h) == [(b"x", b"1")]
    assert hh.prepare_response(h, upgrade=True) == [(b"upgrade", b"websocket"), (b"x", b"1")]


# ============================================================================ errors.py

@pytest.mark.parametrize("flag,status,text", [
    ("UH", 503, b"no healthy upstream"), ("UF", 503, b"upstream connect error"),
    ("UT", 504, b"upstream request timeout"), ("NR", 404, b"no route"),
    ("URX", 503, b"upstream retry limit exceeded"), ("RL", 429, b"rate limited"),
    ("UO", 503, b"upstream overflow"), ("UC", 503, b"upstream connection terminated"),
    ("DC", 499, b"downstream connection terminated"), ("FI", 503, b"fault injected"),
    ("DPE", 400, b"bad request"), ("UPE", 502, b"upstream protocol error"), ("SI", 408, b"request timeout"),
])
def test_http1_error_responses_are_well_formed(flag, status, text):
    raw = errors.http1_response(flag)
    got_status, hdrs, body = parse_response(raw)
    assert (got_status, body) == (status, text)
    assert hdrs[b"x-hostmesh-flags"] == flag.encode() and hdrs[b"content-type"] == b"text/plain"
    assert int(hdrs[b"content-length"]) == len(body) and b"connection" not in hdrs
    assert raw.startswith(b"HTTP/1.1 %d " % status)


def test_http1_error_options():
    raw = errors.http1_response("FI", 418, "teapot fault", close=True)
    status, hdrs, body = parse_response(raw)
    assert status == 418 and body == b"teapot fault" and hdrs[b"connection"] == b"close"
    raw = errors.http1_response("UH", head_request=True)
    assert raw.endswith(b"content-length: 19\r\n\r\n")
    assert parse_response(errors.http1_response("AUTHZ", 403))[0:2] == (403, {
        b"content-type": b"text/plain", b"x-hostmesh-flags": b"AUTHZ", b"content-length": b"9"})
    with pytest.raises(ValueError):
        errors.local_reply("NEW")  # unknown flag needs a status
    with pytest.raises(ValueError):
        errors.local_reply("UH", 204)
    with pytest.raises(ValueError):
        errors.local_reply("bad flag", 500)


@pytest.mark.parametrize("flag,code", [("UH", 14), ("UF", 14), ("UT", 4), ("NR", 12), ("RL", 8), ("URX", 14),
                                       ("DC", 1), ("DPE", 13)])
def test_grpc_trailers_only_error(flag, code):
    h = errors.grpc_error(flag)
    assert h[:3] == [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"%d" % code)]
    assert dict(h)[b"x-hostmesh-flags"] == flag.encode()
    assert dict(h)[b"grpc-message"] == errors.FLAGS[flag].text.encode()


def test_grpc_message_percent_encoding_and_overrides():
    h = dict(errors.grpc_error("FI", errors.GRPC_RESOURCE_EXHAUSTED, "quota 100% ü\n"))
    assert h[b"grpc-status"] == b"8" and h[b"grpc-message"] == b"quota 100%25 %C3%BC%0A"
    assert errors.grpc_message_encode("plain ~text") == b"plain ~text"
    assert dict(errors.grpc_error("CUSTOM"))[b"grpc-status"] == b"2"
    with pytest.raises(ValueError):
        errors.grpc_error("UH", 17)
    assert [errors.grpc_status_for_http(s) for s in (400, 401, 403, 404, 429, 502, 503, 504, 500)] == \
        [13, 16, 7, 12, 14, 14, 14, 14, 2]


# ============================================================================ streaming and odd corners

def test_large_bodies_stream_through_without_accumulating():
    server = ServerConnection()
    client = ClientConnection()
    head = server.receive_data(b"POST /big HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")[0]
    client.send_request(head)
    piece = b"x" * 65536
    wire = b"%x\r\n%s\r\n" % (len(piece), piece)
    total = 0
    for _ in range(160):  # 10 MiB
        evs = server.receive_data(wire)
        assert all(isinstance(e, Data) for e in evs) and sum(len(e.data) for e in evs) == len(piece)
        for e in evs:
            total += len(client.send_data(e.data)) - len(b"10000\r\n\r\n")
        assert not server._ready and not server._later and not server._pending
    assert total == 160 * len(piece)
    assert server.receive_data(b"0\r\n\r\n") == [EndOfMessage([])]
    assert client.send_end() == b"0\r\n\r\n"


def test_declined_h2c_upgrade_with_chunked_body_and_trailers():
    raw = (b"POST /h HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
           b"HTTP2-Settings: AAA\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n" + GET)
    events, out = serve([raw])
    assert [type(e) for e in events] == [RequestHead, Data, EndOfMessage, RequestHead, EndOfMessage]
    assert events[0].chunked and events[0].upgrade is None and events[1] == Data(b"abc")
    assert events[2] == EndOfMessage([(b"x-t", b"1")])
    assert out.count(b"HTTP/1.1 200 OK") == 2 and b"101" not in out


def test_bytes_held_during_an_upgrade_are_bounded_by_paused():
    server = ServerConnection(Http1Limits(max_buffered=100))
    server.receive_data(WS)
    assert not server.paused
    server.receive_data(b"z" * 101)
    assert server.paused
    server.send_response(ResponseHead(101, [], upgrade=b"websocket"))
    assert server.next_events() == [Upgrade(b"z" * 101)]


def test_awaiting_head_tracks_the_header_timer_window():
    conn = ServerConnection()
    assert conn.awaiting_head and not conn.in_flight
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n")
    assert conn.awaiting_head  # the head is not complete yet
    conn.receive_data(b"\r\n")
    assert not conn.awaiting_head and conn.in_flight and not conn.response_started
    conn.send_response(ResponseHead(200, [], content_length=0))
    assert conn.response_started
    conn.send_end()
    assert conn.awaiting_head and not conn.in_flight


def test_http10_chunked_response_is_processed_then_closed():
    resp = (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n")
    conn, evs = fetch(b"", [resp])
    assert merge_data(evs)[1] == Data(b"ok") and isinstance(evs[-1], EndOfMessage)
    assert not conn.reusable  # RFC 9112 6.1: faulty framing in HTTP/1.0
