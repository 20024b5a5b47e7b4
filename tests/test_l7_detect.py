"""Protocol detection on the first bytes of a connection: pure state machine, no sockets."""

from __future__ import annotations

import pytest

from nodeagent.proxy.l7.detect import (
    H2_PREFACE,
    HTTP1,
    HTTP2_PRIOR_KNOWLEDGE,
    HTTP_METHODS,
    NEED_MORE,
    OPAQUE,
    TLS,
    Detected,
    Detector,
    NeedMore,
    Protocol,
    detector_for,
)

# a TLS 1.2/1.3 ClientHello record header + the start of the handshake
CLIENT_HELLO = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03]) + b"\x00" * 32


def feed_bytewise(det: Detector, data: bytes):
    """Feed one byte at a time; return (results before the decision, the decision)."""
    seen = []
    for i in range(len(data)):
        r = det.feed(data[i:i + 1])
        if isinstance(r, Detected):
            return seen, r
        seen.append(r)
    return seen, None


# ------------------------------------------------------------------ HTTP/1.x

@pytest.mark.parametrize("method", HTTP_METHODS)
def test_every_method_with_a_target_is_http1(method):
    target = b"example.com:443" if method == b"CONNECT" else b"/index.html"
    r = Detector().feed(method + b" " + target + b" HTTP/1.1\r\n")
    assert r.protocol is HTTP1 and r.reason == "request line"


@pytest.mark.parametrize("line", [
    b"GET / HTTP/1.1\r\n", b"OPTIONS * HTTP/1.1\r\n", b"GET http://a/ HTTP/1.1\r\n",
    b"CONNECT [::1]:443 HTTP/1.1\r\n", b"M-SEARCH * HTTP/1.1\r\n",
])
def test_request_line_bytewise_needs_more_until_the_target_starts(line):
    det = Detector()
    before, decided = feed_bytewise(det, line)
    sp = line.index(b" ")
    assert len(before) == sp + 1  # "METHOD " then the first target byte decides
    assert all(r is NEED_MORE for r in before)
    assert decided.protocol is HTTP1
    assert decided.data == line[: sp + 2]  # every byte fed so far, to replay into the codec


@pytest.mark.parametrize("data", [
    b"get / HTTP/1.1\r\n",  # methods are case-sensitive
    b"GETX / HTTP/1.1\r\n",
    b"GET\t/ HTTP/1.1\r\n",
    b"GET  / HTTP/1.1\r\n",  # a second SP is not a target
    b"GET ~ HTTP/1.1\r\n",
    b"FOO / HTTP/1.1\r\n",  # extension methods llhttp refuses
    b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n",
    b"*1\r\n$4\r\nPING\r\n",  # redis RESP
    b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # postgres SSLRequest
    b"\r\n",
])
def test_non_http_bytes_are_opaque(data):
    det = Detector()
    _, decided = feed_bytewise(det, data)
    assert decided is not None and decided.protocol is OPAQUE


def test_opaque_is_decided_on_the_first_impossible_byte():
    r = Detector().feed(b"X")
    assert r.protocol is OPAQUE and r.data == b"X"
    assert Detector().feed(b"GEX").protocol is OPAQUE
    assert Detector().feed(b"GE") is NEED_MORE


# ------------------------------------------------------------------ HTTP/2 prior knowledge

def test_full_preface_is_h2():
    r = Detector().feed(H2_PREFACE + b"\x00\x00\x12\x04")
    assert r.protocol is HTTP2_PRIOR_KNOWLEDGE and r.data.startswith(H2_PREFACE)


def test_every_preface_prefix_needs_more():
    det = Detector()
    before, decided = feed_bytewise(det, H2_PREFACE)
    assert len(before) == len(H2_PREFACE) - 1 and all(r is NEED_MORE for r in before)
    assert decided.protocol is HTTP2_PRIOR_KNOWLEDGE and decided.data == H2_PREFACE


@pytest.mark.parametrize("data", [b"PRI / HTTP/1.1\r\n", b"PRI * HTTP/1.1\r\n\r\n", H2_PREFACE[:-1] + b"X"])
def test_diverging_preface_is_opaque(data):
    _, decided = feed_bytewise(Detector(), data)
    assert decided.protocol is OPAQUE


# ------------------------------------------------------------------ TLS

def test_client_hello_is_tls_after_six_bytes():
    before, decided = feed_bytewise(Detector(), CLIENT_HELLO)
    assert len(before) == 5 and decided.protocol is TLS and decided.data == CLIENT_HELLO[:6]


@pytest.mark.parametrize("data", [
    bytes([0x16, 0x03, 0x05, 0x00, 0x10, 0x01]),  # unknown record version
    bytes([0x16, 0x02, 0x01, 0x00, 0x10, 0x01]),
    bytes([0x16, 0x03, 0x01, 0x00, 0x00, 0x01]),  # empty record
    bytes([0x16, 0x03, 0x01, 0xFF, 0xFF, 0x01]),  # longer than a TLS record can be
    bytes([0x16, 0x03, 0x01, 0x00, 0x10, 0x02]),  # ServerHello, not ClientHello
    bytes([0x17, 0x03, 0x03, 0x00, 0x10, 0x01]),  # application data
])
def test_non_client_hello_records_are_opaque(data):
    _, decided = feed_bytewise(Detector(), data)
    assert decided.protocol is OPAQUE


# ------------------------------------------------------------------ timeout, eof, limits, repeat

def test_timeout_without_bytes_is_opaque():
    det = Detector(timeout_s=0.05)
    assert det.timeout_s == 0.05 and det.decision is None
    r = det.timeout()
    assert r == Detected(OPAQUE, b"", "timeout")
    assert det.decision.protocol is OPAQUE


def test_timeout_with_a_partial_prefix_keeps_the_bytes():
    det = Detector()
    assert det.feed(b"GE") is NEED_MORE
    r = det.timeout()
    assert r.protocol is OPAQUE and r.data == b"GE"


def test_eof_before_a_decision_is_opaque():
    det = Detector()
    det.feed(b"PRI * HTTP")
    r = det.eof()
    assert r.protocol is OPAQUE and r.data == b"PRI * HTTP" and r.reason == "eof"


def test_feed_after_a_decision_returns_only_new_bytes():
    det = Detector()
    first = det.feed(b"GET /x HTTP/1.1\r\n")
    assert first.protocol is HTTP1 and first.data == b"GET /x HTTP/1.1\r\n"
    again = det.feed(b"Host: a\r\n")
    assert again.protocol is HTTP1 and again.data == b"Host: a\r\n"
    assert det.timeout().data == b"" and det.eof().protocol is HTTP1


def test_empty_feed_needs_more_and_max_bytes_bounds_the_buffer():
    assert Detector().feed(b"") is NEED_MORE
    assert isinstance(NEED_MORE, NeedMore)
    with pytest.raises(ValueError):
        Detector(max_bytes=10)  # must hold the 24-byte preface
    with pytest.raises(ValueError):
        Detector(timeout_s=-1)


def test_decision_does_not_depend_on_how_bytes_are_split():
    samples = [b"POST /upload HTTP/1.1\r\n", H2_PREFACE, CLIENT_HELLO, b"SSH-2.0-x\r\n", b"MKCALENDAR /c HTTP/1.1"]
    for data in samples:
        whole = Detector().feed(data)
        for i in range(1, len(data)):
            det = Detector()
            r = det.feed(data[:i])
            if isinstance(r, NeedMore):
                r = det.feed(data[i:])
            assert r.protocol is whole.protocol, (data, i)


# ------------------------------------------------------------------ appProtocol overrides

@pytest.mark.parametrize("app_protocol,expected", [
    ("tcp", OPAQUE), ("mysql", OPAQUE), ("redis", OPAQUE), ("tls", TLS), ("https", TLS), ("kubernetes.io/wss", TLS),
])
def test_fixed_app_protocols_decide_before_any_byte(app_protocol, expected):
    det = detector_for(app_protocol)
    assert det.decision == Detected(expected, b"", "app_protocol")
    r = det.feed(b"GET / HTTP/1.1\r\n")  # whatever comes, the declaration wins
    assert r.protocol is expected and r.data == b"GET / HTTP/1.1\r\n"
    assert det.timeout().protocol is expected


@pytest.mark.parametrize("app_protocol", ["http", "HTTP", "http/1.1", "grpc-web", "kubernetes.io/ws"])
def test_http_app_protocol_still_recognises_the_h2_preface(app_protocol):
    det = detector_for(app_protocol)
    assert det.decision is None
    assert det.feed(b"G").protocol is HTTP1  # leaves the preface on the first byte
    det = detector_for(app_protocol)
    assert det.feed(b"PRI * HTTP/2.0\r\n") is NEED_MORE
    assert det.feed(b"\r\nSM\r\n\r\n").protocol is HTTP2_PRIOR_KNOWLEDGE
    det = detector_for(app_protocol)
    assert det.timeout().protocol is HTTP1  # declared HTTP: the codec's header timeout takes over
    det = detector_for(app_protocol)
    assert det.feed(b"\x16\x03\x01").protocol is HTTP1  # not HTTP: the codec answers 400


@pytest.mark.parametrize("app_protocol", ["grpc", "http2", "H2C", " h2c ", "kubernetes.io/h2c"])
def test_http2_app_protocols_tell_the_preface_from_http1_and_never_choose_tcp(app_protocol):
    det = detector_for(app_protocol)
    assert det.decision is None and det.http_only
    assert det.feed(b"PRI * HTTP/2.0\r\n") is NEED_MORE
    r = det.feed(b"\r\nSM\r\n\r\n\x00\x00")
    assert r == Detected(HTTP2_PRIOR_KNOWLEDGE, H2_PREFACE + b"\x00\x00", "preface")
    det = detector_for(app_protocol)  # an HTTP/1.1 client: its driver translates to HTTP/2 upstream
    r = det.feed(b"GET / HTTP/1.1\r\n")
    assert r.protocol is HTTP1 and r.data == b"GET / HTTP/1.1\r\n"
    det = detector_for(app_protocol)
    assert det.feed(b"P") is NEED_MORE  # PRI, or POST/PUT/PATCH
    assert det.feed(b"OST / HTTP/1.1\r\n").protocol is HTTP1
    det = detector_for(app_protocol)
    assert det.feed(b"\x16\x03\x01\x00\x05\x01").protocol is HTTP1  # not HTTP: the codec answers 400
    det = detector_for(app_protocol)
    assert det.timeout().protocol is HTTP2_PRIOR_KNOWLEDGE  # silent: the declared protocol's driver
    det = detector_for(app_protocol)
    assert det.eof().protocol is OPAQUE  # nothing at all: nothing to parse
    det = detector_for(app_protocol)
    det.feed(b"PRI * HT")
    assert det.eof() == Detected(HTTP2_PRIOR_KNOWLEDGE, b"PRI * HT", "eof")  # a truncated preface


@pytest.mark.parametrize("app_protocol", [None, "", "unknown-thing", " "])
def test_unknown_app_protocol_auto_detects(app_protocol):
    det = detector_for(app_protocol, timeout_s=0.3)
    assert det.decision is None and det.timeout_s == 0.3
    assert det.feed(CLIENT_HELLO).protocol is TLS


def test_protocol_values_are_metric_friendly_strings():
    assert [p.value for p in Protocol] == ["http/1.1", "h2c", "tls", "tcp"]
