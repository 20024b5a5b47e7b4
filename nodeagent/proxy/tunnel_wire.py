"""The wire format inside the node-to-node mTLS tunnel (port 15008): sans-I/O.

One TLS 1.3 connection between two node proxies carries a sequence of *streams*, one at
a time; each stream is one proxied TCP connection. Every byte inside TLS is a frame::

    +--------+------------------------+-----------------+
    | type 1 | length 3 (big endian)  | payload (length)|
    +--------+------------------------+-----------------+

    0x01 OPEN   client -> server, starts a stream. Payload (IPv4: 12 bytes, IPv6: 36):
                version u8 (=1) | family u8 (4 or 6) | original destination address
                (4 or 16 bytes) | original destination port u16 | source address
                (4 or 16 bytes; the client pod, for the server's labels)
    0x02 DATA   either way: stream bytes (length >= 1; at most 2^24 - 1 per frame)
    0x03 EOF    either way, empty: the sender will send no more DATA (TCP FIN)
    0x04 RESET  either way, 1 byte code: the stream failed (TCP RST); the sender closes
                the TLS connection after it. Codes: 0 reset, 1 connect failed,
                2 not allowed (identity, limits), 3 protocol error, 4 denied by an
                AuthorizationPolicy (a peer that predates 4 reports it as a reset).
    0x05 GOAWAY server -> client, empty, at any time: the server is going away (draining
                for a restart, or closing an idle connection). The client sends no new
                OPEN on this connection and closes it once its current stream (if any)
                ends; an OPEN that crossed the GOAWAY is still served. Closing an idle
                connection outright instead races with a client that is just reusing it
                (the stream would fail before reaching the server), as HTTP/2's GOAWAY
                avoids for its streams. A peer that predates 5 treats it as a protocol
                error and drops the connection, which for an idle one is what was asked.

A stream is over when each side has sent and received EOF; the connection is then idle
and the client may send the next OPEN (HTTP/1.1 keep-alive style reuse). The client
sends OPEN and its first DATA without waiting for an answer (no extra round trip); a
server that cannot deliver answers RESET. Anything else — a frame before OPEN, a second
OPEN in a stream, DATA after EOF, an unknown type, a control frame with a bad length, a
server sending OPEN — is a ``TunnelProtocolError`` and the connection is dropped.

Why frames and not a header then raw bytes (Linkerd's transport header): TLS transports
in asyncio/uvloop cannot half-close (no ``write_eof``), and L4 relaying must carry each
direction's FIN separately. Why not HTTP/2 CONNECT (Istio's HBONE): measured with the
Python ``h2`` state machine at both ends, framing + parsing a chunk costs 25-40x
what this 4-byte header costs (see ``bench/tunnel.py``), and we need one stream at a time
per connection, not multiplexing. Per chunk the sender does one ``struct.pack`` and one
write; the receiver hands DATA payloads through without buffering them.

The SNI a client sends names the identity it expects the server to present, Linkerd
style: ``<service-account>.<namespace>.serviceaccount.identity.<trust-domain>`` (see
``sni_for``). It lets a server presenting several workload identities (the node-addressed
15008 listener) choose the certificate; connections captured to a pod's IP choose by
the original destination instead.
"""

from __future__ import annotations

import ipaddress
import struct

from nodeagent.errors import ProxyError
from nodeagent.identity import SpiffeId

OPEN = 0x01
DATA = 0x02
EOF = 0x03
RESET = 0x04
GOAWAY = 0x05

VERSION = 1
HEADER_LEN = 4
MAX_DATA = (1 << 24) - 1
MAX_CONTROL = 64  # OPEN and RESET payloads are tiny: never buffer more than this for them

RESET_RESET = 0
RESET_CONNECT_FAILED = 1
RESET_NOT_ALLOWED = 2
RESET_PROTOCOL_ERROR = 3
RESET_DENIED = 4
RESET_CODES = {RESET_RESET: "reset", RESET_CONNECT_FAILED: "connect failed",
               RESET_NOT_ALLOWED: "not allowed", RESET_PROTOCOL_ERROR: "protocol error",
               RESET_DENIED: "denied by an AuthorizationPolicy"}

_HDR = struct.Struct(">I")
EOF_FRAME = _HDR.pack(EOF << 24)
GOAWAY_FRAME = _HDR.pack(GOAWAY << 24)

CLIENT = "client"
SERVER = "server"


class TunnelProtocolError(ProxyError):
    """The peer sent something this format does not allow; the message says what."""


def data_header(n: int) -> bytes:
    """The 4-byte header of a DATA frame of ``n`` bytes (1 <= n <= MAX_DATA)."""
    return _HDR.pack((DATA << 24) | n)


def data_frames(data: bytes) -> bytes:
    """``data`` as DATA frames: one frame unless it exceeds MAX_DATA (never for socket reads)."""
    n = len(data)
    if n <= MAX_DATA:
        return _HDR.pack((DATA << 24) | n) + data
    view = memoryview(data)
    return b"".join(data_header(len(part)) + bytes(part)
                    for part in (view[i:i + MAX_DATA] for i in range(0, n, MAX_DATA)))


def encode_open(dst_ip: str, dst_port: int, src_ip: str) -> bytes:
    dst = ipaddress.ip_address(dst_ip)
    src = ipaddress.ip_address(src_ip)
    if dst.version != src.version:
        raise ValueError(f"OPEN: source {src_ip} and destination {dst_ip} are of different address families")
    if not 0 < dst_port < 65536:
        raise ValueError(f"OPEN: {dst_port!r} is not a port")
    payload = bytes((VERSION, dst.version)) + dst.packed + dst_port.to_bytes(2, "big") + src.packed
    return _HDR.pack((OPEN << 24) | len(payload)) + payload


def encode_reset(code: int = RESET_RESET) -> bytes:
    return _HDR.pack((RESET << 24) | 1) + bytes((code & 0xFF,))


def parse_open(payload: bytes) -> tuple[str, int, str]:
    """OPEN payload -> (destination ip, destination port, source ip)."""
    if len(payload) < 2:
        raise TunnelProtocolError(f"OPEN frame too short ({len(payload)} bytes)")
    version, family = payload[0], payload[1]
    if version != VERSION:
        raise TunnelProtocolError(f"OPEN frame has version {version}, this proxy speaks {VERSION}")
    if family == 4:
        size = 4
    elif family == 6:
        size = 16
    else:
        raise TunnelProtocolError(f"OPEN frame has address family {family}, expected 4 or 6")
    if len(payload) != 2 + size + 2 + size:
        raise TunnelProtocolError(f"OPEN frame for IPv{family} must be {4 + 2 * size} bytes, got {len(payload)}")
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    dst = cls(payload[2:2 + size])
    port = int.from_bytes(payload[2 + size:4 + size], "big")
    src = cls(payload[4 + size:])
    if port == 0:
        raise TunnelProtocolError("OPEN frame has destination port 0")
    return str(dst), port, str(src)


class FrameReceiver:
    """Turns the decrypted byte stream from the peer into checked events.

    ``feed(data)`` returns a list of ``(type, value)``: ``(OPEN, (dst_ip, dst_port,
    src_ip))``, ``(DATA, bytes)`` (a DATA frame may arrive as several events; payloads are
    passed through, not buffered), ``(EOF, None)``, ``(RESET, code)``, ``(GOAWAY, None)``
    (a client only; in or between streams). It raises
    ``TunnelProtocolError`` for anything the format forbids; after that (or after RESET)
    the receiver is dead and must not be fed again.

    ``role`` is what *this* side is: a SERVER receives OPENs; a CLIENT must have called
    ``start_stream()`` (it sent OPEN) before the server may send anything.
    """

    __slots__ = ("role", "_buf", "_remaining", "open", "peer_eof", "dead")

    def __init__(self, role: str) -> None:
        if role not in (CLIENT, SERVER):
            raise ValueError(f"role must be {CLIENT!r} or {SERVER!r}, got {role!r}")
        self.role = role
        self._buf = b""
        self._remaining = 0  # bytes of the current DATA payload still to come
        self.open = False  # a stream is in progress
        self.peer_eof = False
        self.dead = False

    def start_stream(self) -> None:
        """Client side: an OPEN was sent, the server may now answer."""
        if self.role != CLIENT or self.open or self.dead:
            raise TunnelProtocolError("start_stream: a stream is already open on this tunnel connection")
        self.open = True
        self.peer_eof = False

    def end_stream(self) -> None:
        """Both directions are done: the next stream may start."""
        self.open = False
        self.peer_eof = False

    @property
    def idle(self) -> bool:
        """No stream in progress and no partial frame held."""
        return not self.open and not self._buf and not self._remaining and not self.dead

    def feed(self, data: bytes) -> list:
        if self.dead:
            raise TunnelProtocolError("data after the tunnel connection failed")
        events: list = []
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pos = 0
        n = len(data)
        while pos < n:
            remaining = self._remaining
            if remaining:
                take = n - pos if n - pos < remaining else remaining
                events.append((DATA, data if take == n else data[pos:pos + take]))
                self._remaining = remaining - take
                pos += take
                continue
            if n - pos < HEADER_LEN:
                self._buf = data[pos:]
                break
            word = _HDR.unpack_from(data, pos)[0]
            ftype, length = word >> 24, word & 0xFFFFFF
            if ftype == DATA:
                self._check_data(length)
                pos += HEADER_LEN
                self._remaining = length
                continue
            if ftype not in (OPEN, EOF, RESET, GOAWAY):
                self.dead = True
                raise TunnelProtocolError(f"unknown frame type {ftype:#04x}")
            if length > MAX_CONTROL:
                self.dead = True
                raise TunnelProtocolError(f"control frame {ftype:#04x} of {length} bytes (at most {MAX_CONTROL})")
            if n - pos < HEADER_LEN + length:
                self._buf = data[pos:]
                break
            payload = data[pos + HEADER_LEN:pos + HEADER_LEN + length]
            pos += HEADER_LEN + length
            events.append(self._control(ftype, payload))
            if ftype == RESET:
                break  # nothing may follow a RESET
        return events

    def _check_data(self, length: int) -> None:
        if not self.open:
            self.dead = True
            raise TunnelProtocolError("DATA frame outside a stream (no OPEN before it)")
        if self.peer_eof:
            self.dead = True
            raise TunnelProtocolError("DATA frame after the peer's EOF")
        if length == 0:
            self.dead = True
            raise TunnelProtocolError("empty DATA frame")

    def _control(self, ftype: int, payload: bytes):
        if ftype == OPEN:
            if self.role != SERVER:
                self.dead = True
                raise TunnelProtocolError("the server sent an OPEN frame")
            if self.open:
                self.dead = True
                raise TunnelProtocolError("OPEN frame while a stream is still open")
            try:
                value = parse_open(payload)
            except TunnelProtocolError:
                self.dead = True
                raise
            self.open = True
            self.peer_eof = False
            return (OPEN, value)
        if ftype == GOAWAY:
            if self.role != CLIENT:
                self.dead = True
                raise TunnelProtocolError("the client sent a GOAWAY frame")
            if payload:
                self.dead = True
                raise TunnelProtocolError(f"GOAWAY frame with a {len(payload)}-byte payload")
            return (GOAWAY, None)
        if not self.open:
            self.dead = True
            raise TunnelProtocolError(f"{'EOF' if ftype == EOF else 'RESET'} frame outside a stream")
        if ftype == EOF:
            if payload:
                self.dead = True
                raise TunnelProtocolError(f"EOF frame with a {len(payload)}-byte payload")
            if self.peer_eof:
                self.dead = True
                raise TunnelProtocolError("second EOF frame in one stream")
            self.peer_eof = True
            return (EOF, None)
        if len(payload) != 1:
            self.dead = True
            raise TunnelProtocolError(f"RESET frame must carry a 1-byte code, got {len(payload)} bytes")
        self.dead = True
        return (RESET, payload[0])


# ------------------------------------------------------------------ SNI

def sni_for(identity: SpiffeId) -> str | None:
    """The server name a client sends for ``identity``; None when it is no valid DNS name
    (a label over 63 characters or a name over 253), so no SNI is sent and the server
    chooses by original destination."""
    name = f"{identity.service_account}.{identity.namespace}.serviceaccount.identity.{identity.trust_domain}"
    if len(name) > 253 or any(not 0 < len(label) <= 63 for label in name.split(".")):
        return None
    return name
