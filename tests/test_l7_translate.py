"""HTTP/1.1 <-> HTTP/2 translation, checked through both codecs (bytes in, bytes out)."""

from __future__ import annotations

import pytest

from nodeagent.proxy.l7 import http1, http2
from nodeagent.proxy.l7.translate import (TranslationError, accepts_trailers, h1_request_to_h2, h1_response_to_h2,
                                          h1_trailers, h2_request_to_h1, h2_response_to_h1, split_absolute)


def h1_request(raw: bytes) -> tuple[http1.RequestHead, list]:
    evs = http1.ServerConnection().receive_data(raw)
    assert isinstance(evs[0], http1.RequestHead), evs
    return evs[0], evs[1:]


def h2_link():
    """Our HTTP/2 client wired to our HTTP/2 server, handshake done."""
    cli = http2.ClientConnection()
    srv = http2.ServerConnection()
    srv.receive_data(cli.data_to_send())
    cli.receive_data(srv.data_to_send())
    srv.receive_data(cli.data_to_send())
    return cli, srv


def test_h1_request_to_h2_through_both_codecs():
    head, rest = h1_request(b"POST /up?x=1 HTTP/1.1\r\nHost: web.shop:8080\r\nConnection: keep-alive, x-hop\r\n"
                            b"X-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers, deflate\r\nContent-Length: 3\r\n"
                            b"X-Keep: yes\r\n\r\nabc")
    h2head = h1_request_to_h2(head)
    assert (h2head.method, h2head.scheme, h2head.authority, h2head.path) == (b"POST", b"http", b"web.shop:8080",
                                                                             b"/up?x=1")
    assert h2head.headers == [(b"content-length", b"3"), (b"x-keep", b"yes"), (b"te", b"trailers")]
    assert not h2head.end_stream and h2head.content_length == 3
    cli, srv = h2_link()
    sid = cli.send_request(h2head)
    out = cli.data_to_send() + cli.send_data(sid, rest[0].data) + cli.send_end(sid)
    evs = srv.receive_data(out)
    got = evs[0]
    assert (got.method, got.authority, got.path, got.content_length) == (b"POST", b"web.shop:8080", b"/up?x=1", 3)
    assert got.headers == h2head.headers
    assert evs[1] == http2.Data(sid, b"abc") and evs[2] == http2.EndOfMessage(sid, [])


def test_h1_chunked_request_to_h2_has_no_length_and_keeps_trailers():
    head, rest = h1_request(b"PUT /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"3\r\nabc\r\n0\r\nx-sum: 1\r\n\r\n")
    h2head = h1_request_to_h2(head, scheme=b"https")
    assert h2head.content_length is None and not h2head.end_stream and h2head.scheme == b"https"
    assert all(n != b"transfer-encoding" for n, _ in h2head.headers)
    cli, srv = h2_link()
    sid = cli.send_request(h2head)
    out = cli.data_to_send() + cli.send_data(sid, rest[0].data) + cli.send_end(sid, rest[1].trailers)
    evs = srv.receive_data(out)
    assert evs[-1] == http2.EndOfMessage(sid, [(b"x-sum", b"1")])


def test_h1_absolute_form_and_asterisk():
    head, _ = h1_request(b"GET http://user@api.shop:81?q=1 HTTP/1.1\r\nHost: ignored\r\n\r\n")
    h2head = h1_request_to_h2(head)
    assert (h2head.authority, h2head.path, h2head.end_stream) == (b"api.shop:81", b"/?q=1", True)
    head, _ = h1_request(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h1_request_to_h2(head).path == b"*"
    assert split_absolute(b"https://h/p/q") == (b"h", b"/p/q")


def test_h1_upgrade_is_not_translated():
    head, _ = h1_request(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    with pytest.raises(TranslationError):
        h1_request_to_h2(head)


def test_h1_0_request_without_host_is_refused():
    head, _ = h1_request(b"GET / HTTP/1.0\r\n\r\n")
    with pytest.raises(TranslationError):
        h1_request_to_h2(head)


def parse_h1_request(raw: bytes) -> list:
    return http1.ServerConnection().receive_data(raw)


def test_h2_request_to_h1_through_both_codecs():
    cli, srv = h2_link()
    sid = cli.send_request(http2.RequestHead(0, b"POST", b"http", b"web.shop", b"/a?b=1",
                                             [(b"content-type", b"text/plain"), (b"te", b"trailers")]))
    out = cli.data_to_send() + cli.send_data(sid, b"hello") + cli.send_end(sid, [(b"x-t", b"1")])
    evs = srv.receive_data(out)
    h1head = h2_request_to_h1(evs[0])
    assert h1head.chunked and h1head.content_length is None
    up = http1.ClientConnection()
    raw = up.send_request(h1head) + up.send_data(evs[1].data) + up.send_end(evs[2].trailers)
    assert raw.startswith(b"POST /a?b=1 HTTP/1.1\r\nhost: web.shop\r\n")
    got = parse_h1_request(raw)
    assert got[0].headers[0] == (b"host", b"web.shop") and got[0].chunked
    assert (b"te", b"trailers") in got[0].headers
    assert got[1].data == b"hello" and got[2].trailers == [(b"x-t", b"1")]


@pytest.mark.parametrize("method,length", [(b"GET", None), (b"POST", 0)])
def test_h2_bodyless_request_to_h1(method, length):
    cli, srv = h2_link()
    cli.send_request(http2.RequestHead(0, method, b"http", b"a", b"/", [], True))
    h1head = h2_request_to_h1(srv.receive_data(cli.data_to_send())[0])
    assert h1head.content_length == length and not h1head.chunked
    up = http1.ClientConnection()
    got = parse_h1_request(up.send_request(h1head) + up.send_end())
    assert got[0].content_length == length and isinstance(got[-1], http1.EndOfMessage)


def test_h2_request_with_length_to_h1():
    cli, srv = h2_link()
    sid = cli.send_request(http2.RequestHead(0, b"PUT", b"http", b"a", b"/", [(b"content-length", b"2")]))
    evs = srv.receive_data(cli.data_to_send() + cli.send_data(sid, b"hi") + cli.send_end(sid))
    h1head = h2_request_to_h1(evs[0])
    assert h1head.content_length == 2 and not h1head.chunked
    up = http1.ClientConnection()
    raw = up.send_request(h1head) + up.send_data(b"hi") + up.send_end()
    assert raw.count(b"content-length") == 1 and raw.endswith(b"\r\n\r\nhi")


def h1_exchange(request: bytes, head: http1.ResponseHead, body: bytes, trailers) -> bytes:
    down = http1.ServerConnection()
    evs = down.receive_data(request)
    out = down.send_response(head)
    if body:
        out += down.send_data(body)
    out += down.send_end(h1_trailers(trailers, evs[0].headers))
    return out


def parse_h1_response(raw: bytes, method=b"GET") -> list:
    c = http1.ClientConnection()
    c.send_request(http1.RequestHead(method, b"/", [(b"host", b"a")]))
    c.send_end()
    return c.receive_data(raw)


def test_h2_response_to_h1_chunked_with_trailers_when_te_trailers():
    cli, srv = h2_link()
    sid = cli.send_request(http2.RequestHead(0, b"GET", b"http", b"a", b"/", [], True))
    srv.receive_data(cli.data_to_send())
    out = srv.send_response(sid, 200, [(b"content-type", b"application/grpc")])
    out += srv.send_data(sid, b"payload") + srv.send_end(sid, [(b"grpc-status", b"0")])
    evs = cli.receive_data(out)
    h1head = h2_response_to_h1(evs[0])
    assert h1head.content_length is None
    raw = h1_exchange(b"GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n", h1head, evs[1].data, evs[2].trailers)
    assert b"transfer-encoding: chunked" in raw
    got = parse_h1_response(raw)
    assert got[1].data == b"payload" and got[2].trailers == [(b"grpc-status", b"0")]
    raw = h1_exchange(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", h1head, evs[1].data, evs[2].trailers)
    assert b"grpc-status" not in raw  # dropped: the client did not ask for trailers


def test_h2_response_with_length_and_bodyless_to_h1():
    head = h2_response_to_h1(http2.ResponseHead(1, 200, [(b"content-length", b"3")], False, 3))
    raw = h1_exchange(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", head, b"abc", [(b"x", b"1")])
    assert raw.endswith(b"content-length: 3\r\n\r\nabc")
    head = h2_response_to_h1(http2.ResponseHead(1, 200, [], True, None))
    raw = h1_exchange(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", head, b"", [])
    assert b"content-length: 0\r\n" in raw
    got = parse_h1_response(raw)
    assert got[0].status == 200 and isinstance(got[-1], http1.EndOfMessage)


def test_h1_response_to_h2_through_both_codecs():
    up = http1.ClientConnection()
    up.send_request(http1.RequestHead(b"GET", b"/", [(b"host", b"a")]))
    up.send_end()
    evs = up.receive_data(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
                          b"Transfer-Encoding: chunked\r\nX-A: 1\r\n\r\n2\r\nhi\r\n0\r\nx-t: 2\r\n\r\n")
    status, fields = h1_response_to_h2(evs[0])
    assert (status, fields) == (200, [(b"x-a", b"1")])
    cli, srv = h2_link()
    sid = cli.send_request(http2.RequestHead(0, b"GET", b"http", b"a", b"/", [], True))
    srv.receive_data(cli.data_to_send())
    out = srv.send_response(sid, status, fields) + srv.send_data(sid, evs[1].data) + srv.send_end(sid, evs[2].trailers)
    got = cli.receive_data(out)
    assert got[0] == http2.ResponseHead(sid, 200, [(b"x-a", b"1")], False, None)
    assert got[1] == http2.Data(sid, b"hi") and got[2] == http2.EndOfMessage(sid, [(b"x-t", b"2")])


def test_h1_101_is_not_translated_and_te_detection():
    with pytest.raises(TranslationError):
        h1_response_to_h2(http1.ResponseHead(101, []))
    assert accepts_trailers([(b"te", b"deflate;q=0.5, trailers")])
    assert not accepts_trailers([(b"te", b"deflate")])
