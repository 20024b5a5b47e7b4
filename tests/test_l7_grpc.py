"""gRPC helpers (nodeagent.proxy.l7.grpc) and gRPC through the HTTP/2 codec."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.proxy.l7 import errors, grpc, http2
from tests.test_l7_translate import h2_link


@pytest.mark.parametrize("value,ok", [
    (b"application/grpc", True), (b"application/grpc+proto", True), (b"application/grpc+json", True),
    (b"application/grpc;charset=utf-8", True), (b"Application/GRPC", True),
    (b"application/grpc-web", False), (b"application/grpc-web+proto", False), (b"application/json", False),
    (b"application/grpcx", False), (None, False),
])
def test_is_grpc_content_type(value, ok):
    assert grpc.is_grpc_content_type(value) is ok
    assert grpc.is_grpc([] if value is None else [(b"content-type", value)]) is ok


@pytest.mark.parametrize("value,seconds", [
    (b"1H", 3600.0), (b"2M", 120.0), (b"3S", 3.0), (b"250m", 0.25), (b"5u", 5e-6), (b"7n", 7e-9),
    (b"99999999S", 99999999.0), (b"0S", 0.0), (b"00000001m", 1e-3),
])
def test_parse_timeout(value, seconds):
    assert grpc.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [
    b"", b"S", b"1", b"123456789S", b"1s", b"1h", b"-1S", b"1.5S", b" 1S", b"1S ", b"1SS", b"1 S", b"0x1S",
])
def test_malformed_timeout_is_ignored(value):
    assert grpc.parse_timeout(value) is None
    # the route timeout applies instead
    assert grpc.request_timeout([(b"grpc-timeout", value)], 15.0) == 15.0


@given(st.floats(min_value=1e-9, max_value=3.5e11, allow_nan=False))
def test_encode_timeout_round_trips_upward(seconds):
    enc = grpc.encode_timeout(seconds)
    assert 2 <= len(enc) <= 9
    back = grpc.parse_timeout(enc)
    assert back is not None and back >= seconds * (1 - 1e-12)
    unit = grpc.parse_timeout(b"1" + enc[-1:])
    assert back - seconds <= unit * (1 + 1e-9)  # at most one unit of the chosen precision


def test_encode_timeout_picks_the_finest_unit():
    assert grpc.encode_timeout(0.05) == b"50000000n"
    assert grpc.encode_timeout(1.5) == b"1500000u"
    assert grpc.encode_timeout(0) == b"1n"
    assert grpc.encode_timeout(10**12) == b"99999999H"


def test_request_timeout_and_deadline():
    h = [(b"grpc-timeout", b"2S")]
    assert grpc.request_timeout(h, None) == 2.0
    assert grpc.request_timeout(h, 1.0) == 1.0  # the route is stricter
    assert grpc.request_timeout(h, 5.0) == 2.0
    assert grpc.request_timeout(h, None, max_grpc_timeout=0.5) == 0.5
    assert grpc.request_timeout([], None) is None
    assert grpc.request_timeout([], 3.0) == 3.0
    assert grpc.deadline(h, 100.0) == 102.0
    assert grpc.deadline([], 100.0) is None
    out = grpc.with_timeout([(b"grpc-timeout", b"10S"), (b"x", b"1")], 0.25)
    assert out == [(b"x", b"1"), (b"grpc-timeout", b"250000u")]


@pytest.mark.parametrize("status,code", [
    (400, errors.GRPC_INTERNAL), (401, errors.GRPC_UNAUTHENTICATED), (403, errors.GRPC_PERMISSION_DENIED),
    (404, errors.GRPC_UNIMPLEMENTED), (429, errors.GRPC_UNAVAILABLE), (502, errors.GRPC_UNAVAILABLE),
    (503, errors.GRPC_UNAVAILABLE), (504, errors.GRPC_UNAVAILABLE), (500, errors.GRPC_UNKNOWN),
    (418, errors.GRPC_UNKNOWN),
])
def test_http_status_of_a_non_grpc_answer_maps_per_the_spec(status, code):
    assert grpc.response_status(status, [(b"content-type", b"text/html")]) == code
    reply = dict(grpc.non_grpc_reply(status, []))
    assert reply[b":status"] == b"200" and reply[b"grpc-status"] == b"%d" % code
    assert reply[b"x-hostmesh-flags"] == b"UPE" and reply[b"content-type"] == b"application/grpc"


def test_a_real_grpc_response_passes_and_a_200_without_grpc_is_unknown():
    assert grpc.response_status(200, [(b"content-type", b"application/grpc+proto")]) is None
    assert grpc.non_grpc_reply(200, [(b"content-type", b"application/grpc")]) is None
    assert grpc.response_status(200, [(b"content-type", b"text/plain")]) == errors.GRPC_UNKNOWN


@pytest.mark.parametrize("flag,code", [
    ("UH", errors.GRPC_UNAVAILABLE), ("UF", errors.GRPC_UNAVAILABLE), ("UC", errors.GRPC_UNAVAILABLE),
    ("UT", errors.GRPC_DEADLINE_EXCEEDED), ("NR", errors.GRPC_UNIMPLEMENTED),
    ("RL", errors.GRPC_RESOURCE_EXHAUSTED), ("DPE", errors.GRPC_INTERNAL), ("XYZ", errors.GRPC_UNKNOWN),
])
def test_proxy_flags_map_to_grpc_status(flag, code):
    assert grpc.grpc_status_for_flag(flag) == code


def test_grpc_deadline_reply_through_the_codec_is_trailers_only():
    cli, srv = h2_link()
    sid = cli.send_request(http2.RequestHead(0, b"POST", b"http", b"svc", b"/pkg.Svc/M",
                                             [(b"content-type", b"application/grpc"), (b"te", b"trailers"),
                                              (b"grpc-timeout", b"100m")]))
    evs = srv.receive_data(cli.data_to_send())
    head = evs[0]
    assert head.grpc and grpc.deadline(head.headers, 50.0) == pytest.approx(50.1)
    evs = cli.receive_data(srv.send_local_reply(sid, "UT"))
    resp, end, reset = evs
    assert resp.end_stream and resp.status == 200
    h = dict(resp.headers)
    assert h[b"grpc-status"] == b"4" and h[b"grpc-message"] == b"upstream request timeout"
    assert end == http2.EndOfMessage(sid, [])
    # the client's half was still open: the proxy asks it to stop (RST_STREAM NO_ERROR)
    assert reset == http2.StreamReset(sid, http2.NO_ERROR, True, False)
    assert srv.active_streams == 0 and cli.active_streams == 0
