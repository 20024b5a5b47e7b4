"""The tunnel's frame format and its state checks: no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.identity import spiffe_id
from nodeagent.proxy import tunnel_wire as wire
from nodeagent.proxy.tunnel_wire import (CLIENT, DATA, EOF, EOF_FRAME, OPEN, RESET, SERVER, FrameReceiver,
                                         TunnelProtocolError, data_frames, encode_open, encode_reset, sni_for)


def server_events(*chunks: bytes) -> list:
    rx = FrameReceiver(SERVER)
    out = []
    for c in chunks:
        out += rx.feed(c)
    return out


def joined_data(events) -> bytes:
    return b"".join(v for k, v in events if k == DATA)


def test_open_frame_layout_is_documented_one():
    frame = encode_open("198.18.2.1", 8080, "198.18.1.1")
    assert frame == bytes([OPEN, 0, 0, 12, 1, 4, 198, 18, 2, 1, 0x1F, 0x90, 198, 18, 1, 1])
    assert encode_open("::1", 443, "fe80::1")[3] == 36


def test_a_whole_stream_in_one_chunk():
    wire_bytes = encode_open("10.0.0.1", 80, "10.0.0.2") + data_frames(b"hello") + data_frames(b" world") + EOF_FRAME
    events = server_events(wire_bytes)
    assert events[0] == (OPEN, ("10.0.0.1", 80, "10.0.0.2"))
    assert joined_data(events) == b"hello world"
    assert events[-1] == (EOF, None)


def test_byte_at_a_time_gives_the_same_stream():
    payload = bytes(range(256)) * 4
    wire_bytes = encode_open("10.0.0.1", 80, "10.0.0.2") + data_frames(payload) + EOF_FRAME
    events = server_events(*(wire_bytes[i:i + 1] for i in range(len(wire_bytes))))
    assert events[0][0] == OPEN and events[-1] == (EOF, None)
    assert joined_data(events) == payload


def test_data_payload_is_passed_through_not_copied_when_it_is_the_whole_chunk():
    rx = FrameReceiver(SERVER)
    rx.feed(encode_open("10.0.0.1", 80, "10.0.0.2") + wire.data_header(6))
    chunk = b"abcdef"
    ((kind, value),) = rx.feed(chunk)
    assert kind == DATA and value is chunk


def test_streams_follow_each_other_after_both_eofs():
    rx = FrameReceiver(SERVER)
    assert rx.feed(encode_open("10.0.0.1", 80, "10.0.0.2") + EOF_FRAME)[-1] == (EOF, None)
    with pytest.raises(TunnelProtocolError, match="OPEN frame while a stream is still open"):
        FrameReceiver(SERVER).feed(encode_open("10.0.0.1", 80, "10.0.0.2") * 2)
    rx.end_stream()
    assert rx.idle
    assert rx.feed(encode_open("10.0.0.3", 81, "10.0.0.2"))[0] == (OPEN, ("10.0.0.3", 81, "10.0.0.2"))


def test_client_side_expects_answers_only_inside_a_stream():
    rx = FrameReceiver(CLIENT)
    with pytest.raises(TunnelProtocolError, match="DATA frame outside a stream"):
        rx.feed(data_frames(b"x"))
    rx = FrameReceiver(CLIENT)
    rx.start_stream()
    assert rx.feed(data_frames(b"x") + EOF_FRAME) == [(DATA, b"x"), (EOF, None)]
    with pytest.raises(TunnelProtocolError, match="the server sent an OPEN frame"):
        FrameReceiver(CLIENT).feed(encode_open("10.0.0.1", 80, "10.0.0.2"))


def test_reset_ends_everything():
    rx = FrameReceiver(SERVER)
    events = rx.feed(encode_open("10.0.0.1", 80, "10.0.0.2") + encode_reset(wire.RESET_CONNECT_FAILED) + b"junk")
    assert events[-1] == (RESET, wire.RESET_CONNECT_FAILED)
    assert rx.dead
    with pytest.raises(TunnelProtocolError):
        rx.feed(b"more")


@pytest.mark.parametrize("bad, message", [
    (data_frames(b"x"), "DATA frame outside a stream"),
    (EOF_FRAME, "EOF frame outside a stream"),
    (encode_open("10.0.0.1", 80, "10.0.0.2") + EOF_FRAME + data_frames(b"x"), "DATA frame after the peer's EOF"),
    (encode_open("10.0.0.1", 80, "10.0.0.2") + EOF_FRAME + EOF_FRAME, "second EOF"),
    (encode_open("10.0.0.1", 80, "10.0.0.2") + wire.data_header(0), "empty DATA frame"),
    (bytes([0x09, 0, 0, 0]), "unknown frame type 0x09"),
    (bytes([OPEN, 0, 1, 0]), "control frame 0x01 of 256 bytes"),
    (bytes([OPEN, 0, 0, 12, 2, 4]) + bytes(10), "version 2"),
    (bytes([OPEN, 0, 0, 12, 1, 5]) + bytes(10), "address family 5"),
    (bytes([OPEN, 0, 0, 10, 1, 4]) + bytes(8), "must be 12 bytes"),
    (bytes([OPEN, 0, 0, 12, 1, 4, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4]), "destination port 0"),
    (encode_open("10.0.0.1", 80, "10.0.0.2") + bytes([EOF, 0, 0, 1, 0]), "EOF frame with a 1-byte payload"),
    (encode_open("10.0.0.1", 80, "10.0.0.2") + bytes([RESET, 0, 0, 0]), "RESET frame must carry a 1-byte code"),
])
def test_protocol_violations_are_named(bad, message):
    with pytest.raises(TunnelProtocolError, match=message):
        server_events(bad)


def test_oversized_chunks_are_split_into_valid_frames():
    big = b"z" * (wire.MAX_DATA + 10)
    frames = data_frames(big)
    rx = FrameReceiver(SERVER)
    rx.feed(encode_open("10.0.0.1", 80, "10.0.0.2"))
    assert joined_data(rx.feed(frames)) == big


def test_encode_open_rejects_mixed_families_and_bad_ports():
    with pytest.raises(ValueError, match="different address families"):
        encode_open("10.0.0.1", 80, "::1")
    with pytest.raises(ValueError, match="not a port"):
        encode_open("10.0.0.1", 0, "10.0.0.2")


def test_sni_names_the_identity_linkerd_style():
    ident = spiffe_id("cluster.local", "shop", "web")
    assert sni_for(ident) == "web.shop.serviceaccount.identity.cluster.local"
    assert sni_for(spiffe_id("cluster.local", "shop", "w" * 64)) is None  # label too long: no SNI


# ------------------------------------------------------------------ fuzz

@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=12), st.sampled_from([CLIENT, SERVER]), st.booleans())
def test_fuzz_parse_or_raise_our_protocol_error(chunks, role, started):
    rx = FrameReceiver(role)
    if role == CLIENT and started:
        rx.start_stream()
    for chunk in chunks:
        try:
            events = rx.feed(chunk)
        except TunnelProtocolError:
            return
        for kind, value in events:
            assert kind in (OPEN, DATA, EOF, RESET)
            if kind == DATA:
                assert isinstance(value, bytes) and value
        if rx.dead:
            return


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8), st.data())
def test_fuzz_any_split_of_valid_frames_round_trips(payloads, data):
    wire_bytes = (encode_open("10.1.2.3", 9090, "10.1.2.4") + b"".join(data_frames(p) for p in payloads)
                  + EOF_FRAME)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire_bytes)), max_size=10)))
    pieces = [wire_bytes[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire_bytes)])]
    events = server_events(*pieces)
    assert events[0] == (OPEN, ("10.1.2.3", 9090, "10.1.2.4"))
    assert joined_data(events) == b"".join(payloads)
    assert events[-1] == (EOF, None)


# ------------------------------------------------------------------ GOAWAY

def test_goaway_reaches_a_client_between_and_inside_streams():
    rx = FrameReceiver(wire.CLIENT)
    assert rx.feed(wire.GOAWAY_FRAME) == [(wire.GOAWAY, None)]
    rx.start_stream()
    events = rx.feed(data_frames(b"hi") + wire.GOAWAY_FRAME + EOF_FRAME)
    assert events[-2:] == [(wire.GOAWAY, None), (EOF, None)]
    assert not rx.dead


@pytest.mark.parametrize("role,bad,message", [
    (SERVER, wire.GOAWAY_FRAME, "the client sent a GOAWAY frame"),
    (wire.CLIENT, bytes([wire.GOAWAY, 0, 0, 1, 0]), "GOAWAY frame with a 1-byte payload"),
])
def test_goaway_misuse_is_named(role, bad, message):
    rx = FrameReceiver(role)
    with pytest.raises(TunnelProtocolError, match=message):
        rx.feed(bad)
    assert rx.dead
