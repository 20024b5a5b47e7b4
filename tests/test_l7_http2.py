"""HTTP/2 codec (nodeagent.proxy.l7.http2) against h2's own connections and raw frames."""

from __future__ import annotations

import tracemalloc

import h2.config
import h2.connection
import h2.events as h2e
import hpack
import pytest
from h2.settings import SettingCodes
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame,
                              PriorityFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent.proxy.l7 import http2
from nodeagent.proxy.l7.http1 import LocalProtocolError
from nodeagent.proxy.l7.http2 import (ClientConnection, ConnectionTerminated, Data, EndOfMessage, Http2Limits, PingAck,
                                      ProtocolError, RequestHead, ResponseHead, ServerConnection, StreamReset,
                                      Writable)

REQ = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"web.shop"), (b":path", b"/a?b=1")]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def h2_client(**cfg) -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None, **cfg))
    c.initiate_connection()
    return c


def h2_server(**cfg) -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None, **cfg))
    c.initiate_connection()
    return c


def pair(limits: Http2Limits = http2.DEFAULT_LIMITS, clock=None, **cfg):
    """Our server and an h2 client with the handshake (SETTINGS both ways, ACKs) done."""
    srv = ServerConnection(limits, clock=clock or Clock())
    cli = h2_client(**cfg)
    assert srv.receive_data(cli.data_to_send()) == []
    cli.receive_data(srv.data_to_send())
    assert srv.receive_data(cli.data_to_send()) == []
    cli.receive_data(srv.data_to_send())
    return srv, cli


def to_srv(srv: ServerConnection, cli) -> list:
    return srv.receive_data(cli.data_to_send())


def to_cli(srv: ServerConnection, cli) -> list:
    return cli.receive_data(srv.data_to_send())


def frames(data: bytes) -> list[Frame]:
    out = []
    while data:
        f, length = Frame.parse_frame_header(memoryview(data[:9]))
        f.parse_body(memoryview(data[9:9 + length]))
        out.append(f)
        data = data[9 + length:]
    return out


def raw_server(limits: Http2Limits = http2.DEFAULT_LIMITS, clock=None) -> tuple[ServerConnection, hpack.Encoder]:
    """Our server after a raw client's preface + empty SETTINGS (frames are built by hand)."""
    srv = ServerConnection(limits, clock=clock or Clock())
    srv.data_to_send()
    assert srv.receive_data(http2.H2_PREFACE + SettingsFrame(0).serialize()) == []
    srv.data_to_send()
    return srv, hpack.Encoder()


def headers_frame(enc: hpack.Encoder, sid: int, fields, flags=("END_HEADERS", "END_STREAM")) -> bytes:
    return HeadersFrame(sid, data=enc.encode(fields), flags=flags).serialize()


def goaway(out: bytes) -> GoAwayFrame:
    gs = [f for f in frames(out) if isinstance(f, GoAwayFrame)]
    assert gs, f"no GOAWAY in {frames(out)}"
    return gs[-1]


def of(events, cls) -> list:
    return [e for e in events if isinstance(e, cls)]


# ------------------------------------------------------------------ basic exchange
def test_get_request_and_response_round_trip():
    srv, cli = pair()
    cli.send_headers(1, REQ + [(b"user-agent", b"t"), (b"cookie", b"a=1"), (b"cookie", b"b=2")], end_stream=True)
    evs = to_srv(srv, cli)
    assert evs == [RequestHead(1, b"GET", b"http", b"web.shop", b"/a?b=1",
                               [(b"user-agent", b"t"), (b"cookie", b"a=1; b=2")], True, None, False),
                   EndOfMessage(1, [])]
    out = srv.send_response(1, 200, [(b"content-type", b"text/plain")])
    out += srv.send_data(1, b"hello", end_stream=True)
    got = cli.receive_data(out)
    assert isinstance(got[0], h2e.ResponseReceived)
    assert got[0].headers == [(b":status", b"200"), (b"content-type", b"text/plain")]
    assert got[1].data == b"hello" and got[1].stream_ended is not None  # END_STREAM on the last DATA
    assert srv.active_streams == 0


def test_post_body_trailers_and_response_trailers():
    srv, cli = pair()
    cli.send_headers(3, REQ[:0] + [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/up"),
                                   (b"host", b"web.shop:8080"), (b"content-length", b"5"), (b"te", b"trailers")])
    cli.send_data(3, b"hel")
    cli.send_data(3, b"lo")
    cli.send_headers(3, [(b"x-sum", b"abc")], end_stream=True)
    evs = to_srv(srv, cli)
    head = evs[0]
    assert (head.method, head.scheme, head.authority, head.content_length) == (b"POST", b"https", b"web.shop:8080", 5)
    assert head.headers == [(b"content-length", b"5"), (b"te", b"trailers")]  # host folded into authority
    assert [e.data for e in of(evs, Data)] == [b"hel", b"lo"]
    assert evs[-1] == EndOfMessage(3, [(b"x-sum", b"abc")])
    out = srv.send_response(3, 200)
    out += srv.send_end(3, [(b"grpc-status", b"0")])
    got = cli.receive_data(out)
    assert isinstance(got[-2], h2e.TrailersReceived) and got[-2].headers == [(b"grpc-status", b"0")]


def test_informational_then_final_response():
    srv, cli = pair()
    cli.send_headers(1, REQ + [(b"expect", b"100-continue")])
    to_srv(srv, cli)
    out = srv.send_response(1, 100)
    out += srv.send_response(1, 204, end_stream=True)
    got = cli.receive_data(out)
    assert isinstance(got[0], h2e.InformationalResponseReceived)
    assert isinstance(got[1], h2e.ResponseReceived)
    with pytest.raises(LocalProtocolError):
        srv.send_data(1, b"x")


def test_driver_mistakes_raise_local_protocol_error():
    srv, cli = pair()
    cli.send_headers(1, REQ, end_stream=True)
    to_srv(srv, cli)
    with pytest.raises(LocalProtocolError):
        srv.send_data(1, b"x")  # head first
    with pytest.raises(LocalProtocolError):
        srv.send_response(1, 200, [(b"x-bad", b"a\r\nb")])
    with pytest.raises(LocalProtocolError):
        srv.send_response(1, 200, [(b"X-Upper", b"a")])
    with pytest.raises(LocalProtocolError):
        srv.send_response(1, 101)
    with pytest.raises(LocalProtocolError):
        srv.send_response(7, 200)


# ------------------------------------------------------------------ flow control
def test_inbound_window_opens_only_when_the_driver_consumed():
    srv, cli = pair()
    cli.send_headers(1, REQ[:1] + [(b":method", b"PUT")][:0] + REQ[1:])
    to_srv(srv, cli)
    before = cli.local_flow_control_window(1)
    sent = 0
    while cli.local_flow_control_window(1) >= 16384:
        cli.send_data(1, b"x" * 16384)
        sent += 16384
    evs = to_srv(srv, cli)
    assert sum(len(e.data) for e in of(evs, Data)) == sent
    assert srv.data_to_send() == b""  # nothing acknowledged: the client stays blocked
    assert cli.local_flow_control_window(1) == before - sent
    out = srv.consumed(1, sent)
    kinds = {type(f).__name__ for f in frames(out)}
    assert kinds == {"WindowUpdateFrame"}
    cli.receive_data(out)
    assert cli.local_flow_control_window(1) == before
    assert srv.consumed(1, 10**9) == b""  # never more than was delivered


def test_reset_stream_returns_its_unconsumed_bytes_to_the_connection_window():
    srv, cli = pair(Http2Limits(connection_window=65535))
    cli.send_headers(1, REQ)
    for _ in range(4):
        cli.send_data(1, b"x" * 15000)
    to_srv(srv, cli)
    cli.reset_stream(1, 8)
    evs = to_srv(srv, cli)
    assert evs == [StreamReset(1, 8, True, False)]
    cli.receive_data(srv.data_to_send())
    assert cli.outbound_flow_control_window >= 60000  # the connection window came back


def responding_with_client_window(window: int, limits: Http2Limits = http2.DEFAULT_LIMITS):
    """A pair whose client set INITIAL_WINDOW_SIZE=window, stream 1 answered with a 200 head."""
    srv, cli = pair(limits)
    cli.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
    to_srv(srv, cli)
    to_cli(srv, cli)
    cli.send_headers(1, REQ, end_stream=True)
    to_srv(srv, cli)
    return srv, cli, srv.send_response(1, 200)


def test_outgoing_data_queued_behind_the_peer_window_and_writable_event():
    srv, cli, out = responding_with_client_window(16384, Http2Limits(stream_buffer=32 * 1024))
    out += srv.send_data(1, b"a" * 100_000)
    out += srv.send_end(1, [(b"x-done", b"1")])
    sent = sum(len(f.data) for f in frames(out) if isinstance(f, DataFrame))
    assert sent == 16384
    assert srv.blocked(1) and srv.send_window(1) == 0 and srv.buffered == 100_000 - 16384
    got = cli.receive_data(out)
    received = sum(len(e.data) for e in of(got, h2e.DataReceived))
    writable = False
    trailers = None
    while trailers is None:
        cli.acknowledge_received_data(received, 1)
        evs = to_srv(srv, cli)
        writable = writable or Writable(1) in evs
        got = to_cli(srv, cli)
        received = sum(len(e.data) for e in of(got, h2e.DataReceived))
        trailers = next((e for e in got if isinstance(e, h2e.TrailersReceived)), None)
    assert writable and srv.buffered == 0 and trailers.headers == [(b"x-done", b"1")]
    assert srv.active_streams == 0


def test_connection_window_shared_by_streams_is_flushed_to_all_when_it_opens():
    srv, cli = pair()
    for sid in (1, 3):
        cli.send_headers(sid, REQ, end_stream=True)
    to_srv(srv, cli)
    out = b""
    for sid in (1, 3):
        out += srv.send_response(sid, 200)
        out += srv.send_data(sid, b"q" * 50_000, end_stream=True)
    assert srv.buffered == 100_000 - 65535  # the client's connection window is 65535
    got = cli.receive_data(out)
    done: set[int] = set()
    for _ in range(10):
        for e in of(got, h2e.DataReceived):
            cli.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        done |= {e.stream_id for e in of(got, h2e.StreamEnded)}
        if done == {1, 3}:
            break
        to_srv(srv, cli)
        got = to_cli(srv, cli)
    assert done == {1, 3} and srv.buffered == 0 and srv.active_streams == 0


def test_connection_window_is_shared_round_robin():
    srv, cli = pair()
    for sid in (1, 3, 5):
        cli.send_headers(sid, REQ, end_stream=True)
    to_srv(srv, cli)
    out = b""
    for sid in (1, 3, 5):
        out += srv.send_response(sid, 200)
        out += srv.send_data(sid, b"r" * 200_000)
    cli.receive_data(out)  # the first 65535 bytes went to stream 1 (first come)
    sent = {1: 0, 3: 0, 5: 0}
    for _ in range(6):  # the client reopens the connection window 32 KiB at a time
        cli.increment_flow_control_window(32768)
        for sid in (1, 3, 5):
            cli.increment_flow_control_window(32768, sid)
        to_srv(srv, cli)
        for f in frames(srv.data_to_send()):
            if isinstance(f, DataFrame):
                sent[f.stream_id] += len(f.data)
    assert min(sent.values()) >= 32768 and max(sent.values()) - min(sent.values()) <= 2 * 16384, sent


def test_settings_window_change_flushes_queued_data():
    srv, cli, out = responding_with_client_window(0)
    out += srv.send_data(1, b"z" * 1000)
    assert not [f for f in frames(out) if isinstance(f, DataFrame)]
    assert srv.send_window(1) == 0
    cli.receive_data(out)
    cli.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    to_srv(srv, cli)
    got = to_cli(srv, cli)
    assert sum(len(e.data) for e in of(got, h2e.DataReceived)) == 1000


# ------------------------------------------------------------------ limits: streams, resets, floods
def test_streams_beyond_the_limit_are_refused_not_the_connection():
    srv = ServerConnection(Http2Limits(max_concurrent_streams=3), clock=Clock())
    cli = h2_client()  # has not seen our SETTINGS yet: unlimited on its side
    for sid in (1, 3, 5, 7):
        cli.send_headers(sid, REQ, end_stream=True)
    evs = srv.receive_data(cli.data_to_send())
    assert [e.stream_id for e in of(evs, RequestHead)] == [1, 3, 5]
    got = cli.receive_data(srv.data_to_send())
    resets = of(got, h2e.StreamReset)
    assert [(r.stream_id, r.error_code) for r in resets] == [(7, http2.REFUSED_STREAM)]
    assert not srv.closed
    cli.receive_data(srv.send_response(1, 200, end_stream=True))
    cli.send_headers(9, REQ, end_stream=True)
    assert of(to_srv(srv, cli), RequestHead)[0].stream_id == 9


def test_rapid_reset_goaway_enhance_your_calm():
    clock = Clock()
    srv, cli = pair(Http2Limits(max_resets=20, window_s=10.0), clock)
    sid = 1
    for _ in range(20):
        cli.send_headers(sid, REQ)
        cli.reset_stream(sid, 8)
        sid += 2
    evs = to_srv(srv, cli)
    assert not srv.closed and evs == []  # opened and reset in one read: counted, not reported
    cli.send_headers(sid, REQ)
    cli.reset_stream(sid, 8)
    evs = to_srv(srv, cli)
    assert srv.closed
    term = of(evs, ConnectionTerminated)[0]
    assert term.error_code == http2.ENHANCE_YOUR_CALM and not term.remote
    assert goaway(srv.data_to_send()).error_code == http2.ENHANCE_YOUR_CALM


def test_a_client_that_keeps_opening_refused_streams_gets_goaway():
    srv = ServerConnection(Http2Limits(max_concurrent_streams=1, max_resets=5), clock=Clock())
    cli = h2_client()
    for sid in range(1, 30, 2):
        cli.send_headers(sid, REQ)
    evs = srv.receive_data(cli.data_to_send())
    assert len(of(evs, RequestHead)) == 1
    assert of(evs, ConnectionTerminated)[0].error_code == http2.ENHANCE_YOUR_CALM


def test_hpack_table_size_above_our_setting_is_a_connection_error():
    srv, _enc = raw_server()
    evs = srv.receive_data(HeadersFrame(1, data=b"\x3f\xe1\x3f" + hpack.Encoder().encode(REQ),  # size 8192
                                        flags=("END_HEADERS", "END_STREAM")).serialize())
    assert not of(evs, RequestHead) and of(evs, ConnectionTerminated) and srv.closed


def test_resets_at_a_normal_rate_are_fine():
    clock = Clock()
    srv, cli = pair(Http2Limits(max_resets=20, window_s=10.0), clock)
    sid = 1
    for _ in range(5):
        for _ in range(15):
            cli.send_headers(sid, REQ)
            cli.reset_stream(sid, 8)
            sid += 2
        to_srv(srv, cli)
        clock.t += 10.0
    assert not srv.closed
    # resets after the response ended are not premature
    for _ in range(30):
        cli.send_headers(sid, REQ, end_stream=True)
        to_srv(srv, cli)
        srv.send_response(sid, 200, end_stream=True)
        sid += 2
    assert not srv.closed


@pytest.mark.parametrize("frame,limit_field,reason", [
    (lambda: SettingsFrame(0).serialize(), "max_settings", "SETTINGS"),
    (lambda: PingFrame(0, opaque_data=b"12345678").serialize(), "max_pings", "PING"),
    (lambda: DataFrame(1, data=b"").serialize(), "max_empty_data", "empty DATA"),
    (lambda: PriorityFrame(1, depends_on=0, stream_weight=16).serialize(), "max_noop_frames", "PRIORITY"),
    (lambda: b"\x00\x00\x00\xfa\x00\x00\x00\x00\x00", "max_noop_frames", "unknown"),
])
def test_control_frame_floods_goaway(frame, limit_field, reason):
    limits = Http2Limits(**{limit_field: 10})
    srv, enc = raw_server(limits)
    srv.receive_data(headers_frame(enc, 1, REQ, ("END_HEADERS",)))
    evs = srv.receive_data(frame() * 9)  # the handshake sent one SETTINGS
    assert not srv.closed, evs
    out = srv.data_to_send()
    assert len(out) <= 10 * 17 + 100  # ACKs only: output bounded by input
    evs = srv.receive_data(frame() * 1000)
    assert srv.closed
    term = of(evs, ConnectionTerminated)[0]
    assert term.error_code == http2.ENHANCE_YOUR_CALM and reason in term.reason
    g = goaway(srv.data_to_send())
    assert g.error_code == http2.ENHANCE_YOUR_CALM
    assert srv.receive_data(frame()) == []  # dead: nothing more is parsed


def test_flood_budget_refills_per_window():
    clock = Clock()
    srv, _enc = raw_server(Http2Limits(max_pings=10), clock)
    for _ in range(5):
        srv.receive_data(PingFrame(0, opaque_data=b"12345678").serialize() * 10)
        clock.t += 10.0
    assert not srv.closed


# ------------------------------------------------------------------ limits: header blocks
def test_hpack_bomb_is_stopped_without_allocating_the_expanded_size():
    srv, enc = raw_server()
    big = b"v" * 4000  # fills the 4 KiB dynamic table
    block1 = enc.encode(REQ + [(b"x-big", big)])
    evs = srv.receive_data(HeadersFrame(1, data=block1, flags=("END_HEADERS", "END_STREAM")).serialize())
    assert of(evs, RequestHead)[0].headers == [(b"x-big", big)]
    idx = bytes([0x80 | 62])  # indexed field: the dynamic entry (~4 KiB each time)
    block2 = enc.encode(REQ) + idx * 16000  # 16 KB on the wire, 64 MB decoded
    frame = HeadersFrame(3, data=block2, flags=("END_HEADERS", "END_STREAM")).serialize()
    assert len(frame) < 16384 + 9
    tracemalloc.start()
    try:
        evs = srv.receive_data(frame)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, peak
    term = of(evs, ConnectionTerminated)[0]
    assert term.error_code == http2.ENHANCE_YOUR_CALM and srv.closed
    assert goaway(srv.data_to_send()).error_code == http2.ENHANCE_YOUR_CALM


def test_header_list_over_the_soft_limits_is_431_on_the_stream():
    srv, cli = pair()
    cli.send_headers(1, REQ + [(b"x-h%d" % i, b"v") for i in range(101)], end_stream=True)
    evs = to_srv(srv, cli)
    assert of(evs, ProtocolError) == [ProtocolError(1, 431, "too many header fields", "DPE")]
    got = to_cli(srv, cli)
    assert dict(got[0].headers)[b":status"] == b"431"
    cli.send_headers(3, REQ + [(b"x-big", b"v" * 61 * 1024)], end_stream=True)
    evs = to_srv(srv, cli)
    assert of(evs, ProtocolError)[0].status == 431 and not srv.closed


def test_continuation_flood_small_frames():
    srv, enc = raw_server()
    block = enc.encode(REQ)
    data = HeadersFrame(1, data=block[:1], flags=()).serialize()
    data += b"".join(ContinuationFrame(1, data=b"").serialize() for _ in range(1000))
    evs = srv.receive_data(data)
    term = of(evs, ConnectionTerminated)[0]
    assert term.error_code == http2.ENHANCE_YOUR_CALM and "CONTINUATION" in term.reason
    assert len(srv._h2.incoming_buffer._headers_buffer) <= 33  # what h2 buffered


def test_continuation_flood_large_frames_bounded_bytes():
    srv, enc = raw_server()
    block = enc.encode(REQ)
    srv.receive_data(HeadersFrame(1, data=block, flags=()).serialize())
    chunk = ContinuationFrame(1, data=b"\x00" * 16000).serialize()
    evs = []
    for _ in range(20):
        evs += srv.receive_data(chunk)
        if srv.closed:
            break
    term = of(evs, ConnectionTerminated)[0]
    assert "header block too large" in term.reason
    buffered = sum(len(f.data) for f in srv._h2.incoming_buffer._headers_buffer)
    assert buffered <= http2.DEFAULT_LIMITS.max_header_block


def test_oversized_frame_refused_on_its_header():
    srv, _enc = raw_server()
    evs = srv.receive_data(b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + b"x" * 100)
    assert of(evs, ConnectionTerminated)[0].error_code == http2.FRAME_SIZE_ERROR
    assert len(srv._h2.incoming_buffer._data) == 0  # never buffered toward 16 MiB
    assert goaway(srv.data_to_send()).error_code == http2.FRAME_SIZE_ERROR


def test_memory_of_closed_streams_is_bounded_and_late_frames_stay_stream_errors():
    srv, cli = pair(Http2Limits(closed_streams=64))
    for sid in range(1, 400, 2):
        cli.send_headers(sid, REQ, end_stream=True)
        for ev in to_srv(srv, cli):
            if isinstance(ev, RequestHead):
                cli.receive_data(srv.send_response(ev.stream_id, 200, end_stream=True))
    assert len(srv._h2._closed_streams) <= 64
    late = DataFrame(1, data=b"late").serialize() + RstStreamFrame(3, error_code=8).serialize()
    srv.receive_data(late)  # stream 1 ended long ago and was forgotten
    assert not srv.closed
    rst = [f for f in frames(srv.data_to_send()) if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in rst] == [(1, http2.STREAM_CLOSED)]


def test_window_update_and_reset_in_one_read_with_queued_output():
    srv, cli, out = responding_with_client_window(16384)
    out += srv.send_data(1, b"a" * 100_000)
    cli.receive_data(out)
    cli.increment_flow_control_window(30000, 1)
    cli.increment_flow_control_window(30000)
    cli.reset_stream(1, 8)
    evs = to_srv(srv, cli)  # h2 already closed stream 1 when the WINDOW_UPDATE event is handled
    assert evs == [StreamReset(1, 8, True, False)]
    assert srv.buffered == 0 and srv.active_streams == 0 and not srv.closed


def test_streams_opened_and_reset_in_one_read_count_as_rapid_resets():
    srv, cli = pair(Http2Limits(max_resets=5))
    for sid in range(1, 12, 2):  # 6 streams, each HEADERS + RST_STREAM in the same read
        cli.send_headers(sid, REQ)
        cli.reset_stream(sid, 8)
    evs = to_srv(srv, cli)
    assert not of(evs, RequestHead) and not of(evs, StreamReset)
    assert of(evs, ConnectionTerminated)[0].error_code == http2.ENHANCE_YOUR_CALM


def test_frame_header_split_across_reads():
    srv, enc = raw_server()
    data = headers_frame(enc, 1, REQ)
    evs = []
    for i in range(len(data)):
        evs += srv.receive_data(data[i:i + 1])
    assert of(evs, RequestHead) and of(evs, EndOfMessage)


# ------------------------------------------------------------------ malformed requests
MALFORMED = [
    ("uppercase name", REQ + [(b"X-Foo", b"1")]),
    ("connection header", REQ + [(b"connection", b"close")]),
    ("keep-alive", REQ + [(b"keep-alive", b"5")]),
    ("transfer-encoding", REQ + [(b"transfer-encoding", b"chunked")]),
    ("upgrade", REQ + [(b"upgrade", b"websocket")]),
    ("proxy-connection", REQ + [(b"proxy-connection", b"x")]),
    ("te gzip", REQ + [(b"te", b"gzip")]),
    ("missing :path", REQ[:3]),
    ("empty :path", REQ[:3] + [(b":path", b"")]),
    ("relative :path", REQ[:3] + [(b":path", b"a/b")]),
    ("missing :method", REQ[1:]),
    ("missing :scheme", [REQ[0]] + REQ[2:]),
    ("missing authority", REQ[:2] + REQ[3:]),
    ("duplicate :method", REQ + [(b":method", b"GET")]),
    ("pseudo after regular", REQ[:3] + [(b"x-a", b"1"), REQ[3]]),
    (":status in request", REQ + [(b":status", b"200")]),
    (":protocol", REQ + [(b":protocol", b"websocket")]),
    ("unknown pseudo", REQ + [(b":foo", b"1")]),
    ("CR in value", REQ + [(b"x-a", b"a\rb")]),
    ("LF in value", REQ + [(b"x-a", b"a\nb")]),
    ("NUL in value", REQ + [(b"x-a", b"a\x00b")]),
    ("leading space", REQ + [(b"x-a", b" a")]),
    ("space in name", REQ + [(b"x a", b"1")]),
    ("colon in name", REQ + [(b"x:a", b"1")]),
    ("host differs", REQ + [(b"host", b"other")]),
    ("bad authority", REQ[:2] + [(b":authority", b"a b")] + REQ[3:]),
    ("space in path", REQ[:3] + [(b":path", b"/a b")]),
]


@pytest.mark.parametrize("end_stream", [True, False])
@pytest.mark.parametrize("name,fields", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_is_a_400_stream_error(name, fields, end_stream):
    srv, cli = pair(validate_outbound_headers=False, normalize_outbound_headers=False)
    cli.send_headers(1, fields, end_stream=end_stream)
    evs = to_srv(srv, cli)
    assert not of(evs, RequestHead), evs
    err = of(evs, ProtocolError)[0]
    assert err.status == 400 and err.stream_id == 1
    out = srv.data_to_send()
    fs = frames(out)
    heads = [f for f in fs if isinstance(f, HeadersFrame)]
    assert heads and not srv.closed
    rst = [f for f in fs if isinstance(f, RstStreamFrame)]
    if end_stream:
        assert not rst
    else:
        assert [f.error_code for f in rst] == [http2.PROTOCOL_ERROR]
    got = cli.receive_data(out)
    resp = of(got, h2e.ResponseReceived)[0]
    assert (b":status", b"400") in resp.headers and (b"x-hostmesh-flags", b"DPE") in resp.headers
    # the connection still serves the next request
    cli.send_headers(3, REQ, end_stream=True)
    assert of(to_srv(srv, cli), RequestHead)[0].stream_id == 3


def test_differing_content_lengths_are_an_h2_connection_error():
    srv, cli = pair()
    cli.send_headers(1, REQ + [(b"content-length", b"1"), (b"content-length", b"2")], end_stream=True)
    evs = to_srv(srv, cli)
    assert of(evs, ConnectionTerminated)[0].error_code == http2.PROTOCOL_ERROR and srv.closed


def test_writes_to_a_stream_the_peer_reset_are_dropped():
    srv, cli = pair()
    cli.send_headers(1, REQ)
    assert [type(e) for e in to_srv(srv, cli)] == [RequestHead]
    cli.reset_stream(1, 8)
    assert [type(e) for e in to_srv(srv, cli)] == [StreamReset]
    assert srv.send_local_reply(1, "NR") == b""
    assert srv.send_data(1, b"x") == b"" and srv.send_end(1) == b""
    with pytest.raises(LocalProtocolError):
        srv.send_response(3, 200)  # never opened


def test_malformed_grpc_request_gets_a_trailers_only_internal():
    srv, cli = pair(validate_outbound_headers=False, normalize_outbound_headers=False)
    cli.send_headers(1, REQ + [(b"content-type", b"application/grpc"), (b"connection", b"x")], end_stream=True)
    to_srv(srv, cli)
    h = dict(of(to_cli(srv, cli), h2e.ResponseReceived)[0].headers)
    assert h[b":status"] == b"200" and h[b"grpc-status"] == b"13" and h[b"x-hostmesh-flags"] == b"DPE"


def test_connect_is_405_and_options_asterisk_is_fine():
    srv, cli = pair()
    cli.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"db:5432")], end_stream=True)
    evs = to_srv(srv, cli)
    assert of(evs, ProtocolError)[0].status == 405
    cli.send_headers(3, [(b":method", b"OPTIONS"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"*")],
                     end_stream=True)
    assert of(to_srv(srv, cli), RequestHead)[0].path == b"*"


def test_malformed_trailers_reset_the_stream():
    srv, cli = pair(validate_outbound_headers=False, normalize_outbound_headers=False)
    cli.send_headers(1, REQ)
    cli.send_data(1, b"abc")
    cli.send_headers(1, [(b"x-Bad", b"1")], end_stream=True)
    evs = to_srv(srv, cli)
    assert of(evs, StreamReset) == [StreamReset(1, http2.PROTOCOL_ERROR, False, False, "invalid header name b'x-Bad'")]
    assert not of(evs, EndOfMessage)
    rst = [f for f in frames(srv.data_to_send()) if isinstance(f, RstStreamFrame)]
    assert rst[0].error_code == http2.PROTOCOL_ERROR


def test_request_body_after_a_local_reply_is_discarded_and_acknowledged():
    srv, cli = pair(Http2Limits(connection_window=65535))
    cli.send_headers(1, REQ)
    to_srv(srv, cli)
    for _ in range(4):
        cli.send_data(1, b"x" * 12500)
    evs = to_srv(srv, cli)
    assert len(of(evs, Data)) >= 1
    out = srv.send_local_reply(1, "UH")
    fs = frames(out)
    assert isinstance(fs[-1], RstStreamFrame) and fs[-1].error_code == http2.NO_ERROR
    assert srv.active_streams == 0
    got = cli.receive_data(out)
    assert (b":status", b"503") in of(got, h2e.ResponseReceived)[0].headers
    assert cli.outbound_flow_control_window == 65535  # the discarded body was acknowledged


def test_grpc_local_reply_is_trailers_only():
    srv, cli = pair()
    cli.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc"),
                         (b":path", b"/pkg.Svc/Call"), (b"content-type", b"application/grpc"), (b"te", b"trailers")])
    cli.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
    head = of(to_srv(srv, cli), RequestHead)[0]
    assert head.grpc
    out = srv.send_local_reply(1, "UT")
    fs = frames(out)
    hs = [f for f in fs if isinstance(f, HeadersFrame)]
    assert len(hs) == 1 and "END_STREAM" in hs[0].flags
    got = cli.receive_data(out)
    h = dict(of(got, h2e.ResponseReceived)[0].headers)
    assert h[b"grpc-status"] == b"4" and h[b":status"] == b"200" and h[b"x-hostmesh-flags"] == b"UT"


# ------------------------------------------------------------------ GOAWAY, drain, close
def test_drain_lets_open_streams_finish_and_refuses_new_ones():
    srv = ServerConnection(clock=Clock())
    cli = ClientConnection(clock=Clock())
    srv.receive_data(cli.data_to_send())
    cli.receive_data(srv.data_to_send())
    srv.receive_data(cli.data_to_send())
    sid = cli.send_request(RequestHead(0, b"POST", b"http", b"web", b"/", []))
    srv.receive_data(cli.data_to_send())
    evs = cli.receive_data(srv.drain())
    term = of(evs, ConnectionTerminated)[0]
    assert term.remote and term.error_code == 0 and term.streams == (sid,)
    assert cli.capacity == 0 and not cli.closed
    with pytest.raises(LocalProtocolError):
        cli.send_request(RequestHead(0, b"GET", b"http", b"web", b"/", [], True))
    evs = srv.receive_data(cli.send_data(sid, b"body") + cli.send_end(sid))
    assert of(evs, Data)[0].data == b"body" and of(evs, EndOfMessage)
    out = srv.send_response(sid, 200)
    evs = cli.receive_data(out + srv.send_data(sid, b"ok") + srv.send_end(sid))
    assert of(evs, ResponseHead)[0].status == 200 and of(evs, EndOfMessage)
    assert srv.active_streams == 0 and cli.active_streams == 0
    g = goaway(srv.close())
    assert g.error_code == 0


def test_client_goaway_with_error_terminates():
    srv, _enc = raw_server()
    evs = srv.receive_data(GoAwayFrame(0, last_stream_id=0, error_code=2, additional_data=b"bye").serialize())
    assert of(evs, ConnectionTerminated) == [ConnectionTerminated(2, 0, "bye", True, ())]
    assert srv.closed


def test_h2_protocol_errors_become_connection_terminated():
    srv, _enc = raw_server()
    evs = srv.receive_data(DataFrame(2, data=b"x").serialize())  # DATA on an idle even stream
    term = of(evs, ConnectionTerminated)[0]
    assert term.error_code == http2.PROTOCOL_ERROR and srv.closed
    assert goaway(srv.data_to_send()).error_code == http2.PROTOCOL_ERROR


def test_bad_preface_is_a_protocol_error():
    srv = ServerConnection(clock=Clock())
    evs = srv.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert of(evs, ConnectionTerminated)[0].error_code == http2.PROTOCOL_ERROR


# ------------------------------------------------------------------ client side
def client_pair(srv_settings=None, clock=None):
    up = h2_server()
    if srv_settings:
        up.update_settings(srv_settings)
    cli = ClientConnection(clock=clock or Clock())
    up.receive_data(cli.data_to_send())
    cli.receive_data(up.data_to_send())
    up.receive_data(cli.data_to_send())
    return cli, up


def get(path=b"/", end=True) -> RequestHead:
    return RequestHead(0, b"GET", b"http", b"web.shop", path, [(b"accept", b"*/*")], end)


def test_client_multiplexes_requests_and_parses_responses():
    cli, up = client_pair()
    s1 = cli.send_request(get(b"/1"))
    s2 = cli.send_request(get(b"/2", end=False))
    out = cli.data_to_send() + cli.send_data(s2, b"body")
    out += cli.send_end(s2, [(b"x-t", b"1")])
    evs = up.receive_data(out)
    reqs = of(evs, h2e.RequestReceived)
    assert [dict(r.headers)[b":path"] for r in reqs] == [b"/1", b"/2"]
    assert dict(reqs[0].headers)[b":authority"] == b"web.shop"
    assert of(evs, h2e.TrailersReceived)[0].headers == [(b"x-t", b"1")]
    up.send_headers(s2, [(b":status", b"201"), (b"content-length", b"2")])
    up.send_data(s2, b"ok", end_stream=True)
    up.send_headers(s1, [(b":status", b"404")], end_stream=True)
    evs = cli.receive_data(up.data_to_send())
    assert evs[0] == ResponseHead(s2, 201, [(b"content-length", b"2")], False, 2)
    assert evs[1] == Data(s2, b"ok", True) and evs[2] == EndOfMessage(s2, [])
    assert evs[3] == ResponseHead(s1, 404, [], True, None) and evs[4] == EndOfMessage(s1, [])
    assert cli.active_streams == 0


def test_client_capacity_follows_peer_settings():
    cli, up = client_pair({SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    cli.receive_data(up.data_to_send())
    assert cli.capacity == 2
    a = cli.send_request(get())
    cli.send_request(get())
    assert cli.capacity == 0
    with pytest.raises(LocalProtocolError):
        cli.send_request(get())
    up.receive_data(cli.data_to_send())
    up.send_headers(a, [(b":status", b"200")], end_stream=True)
    cli.receive_data(up.data_to_send())
    assert cli.capacity == 1


def test_client_goaway_marks_unprocessed_streams_retryable():
    cli, up = client_pair()
    ids = [cli.send_request(get()) for _ in range(3)]
    up.receive_data(cli.data_to_send())
    up.close_connection(0, last_stream_id=ids[0])
    evs = cli.receive_data(up.data_to_send())
    resets = of(evs, StreamReset)
    assert [(r.stream_id, r.retryable) for r in resets] == [(ids[1], True), (ids[2], True)]
    term = of(evs, ConnectionTerminated)[0]
    assert term.remote and term.last_stream_id == ids[0] and term.streams == (ids[0],)
    assert cli.capacity == 0 and not cli.reusable


def test_client_graceful_goaway_in_one_read_with_ping_and_the_rest_of_a_response():
    cli, up = client_pair()
    s1 = cli.send_request(get())
    s3 = cli.send_request(get())
    up.receive_data(cli.data_to_send())
    up.send_headers(s1, [(b":status", b"200")])
    up.send_data(s1, b"done", end_stream=True)
    response = up.data_to_send()
    wire = (PingFrame(0, opaque_data=b"liveness").serialize()
            + GoAwayFrame(0, last_stream_id=s1, error_code=0, additional_data=b"max age").serialize()
            + response)
    evs = []
    for i in range(0, len(wire), 7):  # frame boundaries anywhere
        evs += cli.receive_data(wire[i:i + 7])
    kinds = [type(e).__name__ for e in evs]
    assert kinds == ["StreamReset", "ConnectionTerminated", "ResponseHead", "Data", "EndOfMessage"], kinds
    assert evs[0] == StreamReset(s3, http2.REFUSED_STREAM, True, True, "above GOAWAY last-stream-id")
    assert evs[1] == ConnectionTerminated(0, s1, "max age", True, (s1,))
    acks = [f for f in frames(cli.data_to_send()) if isinstance(f, PingFrame)]
    assert [(f.opaque_data, "ACK" in f.flags) for f in acks] == [(b"liveness", True)]  # kept across GOAWAY
    assert cli.active_streams == 0 and cli.capacity == 0 and not cli.closed


def test_client_refused_stream_is_retryable():
    cli, up = client_pair()
    sid = cli.send_request(get())
    up.receive_data(cli.data_to_send())
    up.reset_stream(sid, http2.REFUSED_STREAM)
    evs = cli.receive_data(up.data_to_send())
    assert evs == [StreamReset(sid, http2.REFUSED_STREAM, True, True)]


def test_client_ping_rtt_with_injected_clock():
    clock = Clock()
    cli, up = client_pair(clock=clock)
    out = cli.ping()
    assert cli.pings_outstanding == 1
    up.receive_data(out)
    clock.t += 0.25
    evs = cli.receive_data(up.data_to_send())
    assert evs == [PingAck(0.25)] and cli.pings_outstanding == 0


@pytest.mark.parametrize("fields,reason", [
    ([(b":status", b"abc")], "status"),
    ([(b":status", b"101")], "101"),
    ([(b"x-a", b"1")], "status"),
    ([(b":status", b"200"), (b":path", b"/")], "pseudo"),
    ([(b":status", b"200"), (b"Upper", b"1")], "name"),
    ([(b":status", b"200"), (b"connection", b"close")], "connection-specific"),
])
def test_client_malformed_response_is_502_and_reset(fields, reason):
    cli, up = client_pair()
    up.config.validate_outbound_headers = False
    up.config.normalize_outbound_headers = False
    sid = cli.send_request(get())
    up.receive_data(cli.data_to_send())
    up.send_headers(sid, fields, end_stream=fields[0][1] != b"101")
    evs = cli.receive_data(up.data_to_send())
    err = of(evs, ProtocolError)[0]
    assert err.status == 502 and err.flag == "UPE" and reason in err.reason
    assert not of(evs, ResponseHead) and not cli.closed
    assert cli.active_streams == 0


# ------------------------------------------------------------------ fuzzing
def _bounded(srv: ServerConnection, fed: int, out: int, sent: int = 0) -> None:
    conn = srv._h2
    assert len(conn.incoming_buffer._data) <= srv.limits.max_frame_size + 9
    assert sum(len(f.data) for f in conn.incoming_buffer._headers_buffer) <= srv.limits.max_header_block
    # what the peer makes us send is proportional to its input (besides what the driver sent)
    assert out <= 64 * fed + 4096 + sent


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_fuzz_server_raw_bytes(chunks):
    srv = ServerConnection(clock=Clock())
    srv.data_to_send()
    fed = out = 0
    for c in [http2.H2_PREFACE] + chunks:
        srv.receive_data(c)
        fed += len(c)
        out += len(srv.data_to_send())
        _bounded(srv, fed, out)


def _frame_bytes():
    """Plausible frames: a valid 9-byte header over random payloads, types and flags."""
    return st.builds(
        lambda t, f, sid, payload: len(payload).to_bytes(3, "big") + bytes([t, f]) + sid.to_bytes(4, "big") + payload,
        st.integers(0, 11), st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF]),
        st.binary(max_size=64))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_frame_bytes(), st.sampled_from([
    HeadersFrame(1, data=hpack.Encoder().encode(REQ), flags=("END_HEADERS",)).serialize(),
    HeadersFrame(3, data=hpack.Encoder().encode(REQ), flags=("END_HEADERS", "END_STREAM")).serialize(),
    DataFrame(1, data=b"abc").serialize(), RstStreamFrame(1, error_code=8).serialize(),
    RstStreamFrame(3, error_code=8).serialize(), WindowUpdateFrame(1, window_increment=1000).serialize(),
    WindowUpdateFrame(0, window_increment=70000).serialize(), WindowUpdateFrame(3, window_increment=5).serialize(),
    SettingsFrame(0, settings={SettingCodes.INITIAL_WINDOW_SIZE: 100}).serialize(),
    SettingsFrame(0).serialize(), PingFrame(0, opaque_data=b"8bytes!!").serialize(),
    GoAwayFrame(0, last_stream_id=1).serialize(),
])), max_size=20), st.integers(1, 50))
def test_fuzz_server_frames(fs, split):
    srv = ServerConnection(clock=Clock())
    srv.data_to_send()
    data = http2.H2_PREFACE + SettingsFrame(0).serialize() + b"".join(fs)
    fed = out = sent = 0
    for i in range(0, len(data), split):
        for ev in srv.receive_data(data[i:i + split]):
            if isinstance(ev, RequestHead):  # a response larger than the windows: queued output
                srv.send_response(ev.stream_id, 200)
                srv.send_data(ev.stream_id, b"x" * 70000)
                sent += 70100
            elif isinstance(ev, EndOfMessage):
                srv.send_end(ev.stream_id, [(b"x-t", b"1")])
        fed += split
        out += len(srv.data_to_send())
        _bounded(srv, fed, out, sent)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_frame_bytes(), st.binary(max_size=40)), max_size=16), st.integers(1, 40))
def test_fuzz_client_side(fs, split):
    """An upstream sending garbage: events or our GOAWAY, never an exception, bounded buffers."""
    cli = ClientConnection(clock=Clock())
    cli.send_request(get(end=False))
    cli.data_to_send()
    data = SettingsFrame(0).serialize() + b"".join(fs)
    fed = out = 0
    for i in range(0, len(data), split):
        cli.receive_data(data[i:i + split])
        fed += split
        out += len(cli.data_to_send())
        _bounded(cli, fed, out)
