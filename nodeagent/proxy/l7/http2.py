"""HTTP/2 connection codec on h2: plain protocol logic, no I/O.

Two sans-I/O wrappers around ``h2.connection.H2Connection``, one per side of a proxied
HTTP/2 connection, in the style of ``http1`` (bytes in -> events out; calls -> bytes out):

* ``ServerConnection`` — the downstream side: requests in, responses out.
* ``ClientConnection`` — the upstream side: requests out (multiplexed), responses in.

Driver loop (downstream side)::

    server = ServerConnection(limits, clock=loop.time)
    down.write(server.data_to_send())                  # our SETTINGS and connection WINDOW_UPDATE
    for ev in server.receive_data(chunk):              # then down.write(server.data_to_send()):
                                                       # ACKs, RST_STREAMs, queued DATA, GOAWAY
        RequestHead   -> route; sid = client.send_request(head')    (ev.end_stream: no body)
        Data          -> up.write(client.send_data(sid, ev.data)); once the upstream took
                         the bytes (its transport is not paused):
                         down.write(server.consumed(ev.stream_id, len(ev.data))) — only
                         then is the client's window reopened
        EndOfMessage  -> up.write(client.send_end(sid, ev.trailers))
        StreamReset   -> reset the upstream stream (client.reset(sid)); error_code NO_ERROR
                         after the response ended means "send no more of the body"
        Writable      -> resume reading the upstream stream that was paused on blocked()
        ProtocolError -> log it: the codec already answered (400/431/405) or reset the stream
        ConnectionTerminated -> flush data_to_send(), then close (ev.remote and not
                         ev.error_code: a graceful GOAWAY, finish ev.streams first)
    every other call returns the bytes it produced (and any pending before): write them
    while the downstream transport is paused for writing: stop reading from it (this is
    what bounds the control frames we owe a peer that does not read: PING/SETTINGS ACKs)

Output for a stream: ``send_response``/``send_data``/``send_end``/``send_local_reply``/
``reset``. ``send_data`` never blocks and never drops: what the peer's flow-control window
does not admit is queued per stream and sent when WINDOW_UPDATE arrives; ``blocked(sid)``
turns true once ``limits.stream_buffer`` bytes are queued (pause the source of that
stream) and a ``Writable`` event says when it drained. ``send_window(sid)`` is the number of
bytes that would go out at once. Every ``send_*`` returns the bytes to write (all pending
output of the connection).

Upstream side: ``capacity`` (streams that may be opened now: the peer's
SETTINGS_MAX_CONCURRENT_STREAMS capped by ours, 0 after GOAWAY) and ``send_request(head)``
-> stream id (it refuses at capacity 0: queueing is the pool's job); ``StreamReset.retryable``
marks requests the upstream never processed (REFUSED_STREAM, or above a GOAWAY's
last-stream-id) — safe to retry on another connection. ``ping()`` -> ``PingAck(rtt)`` for
liveness (``pings_outstanding`` tells a timer whether the peer still answers). Server side:
``drain()`` sends a graceful GOAWAY and lets open streams finish; both sides: ``close(code)``
(GOAWAY, nothing more is processed).

Inbound flow control is explicit: h2 never acknowledges DATA by itself and neither does
this codec until the driver calls ``consumed(sid, n)``, so a slow upstream back-pressures
the client through its stream and connection windows (``limits.stream_window``,
``limits.connection_window``). Padding and bytes of streams that were reset or refused are
acknowledged by the codec (nobody else could).

Events::

    RequestHead(stream_id, method, scheme, authority, path, headers, end_stream,
                content_length, grpc)         server side
    ResponseHead(stream_id, status, headers, end_stream, content_length)
                                              client side (1xx too: ``informational``)
    Data(stream_id, data, end_stream)        end_stream: the last piece (EndOfMessage follows,
                                             without trailers): forward it with
                                             send_data(..., end_stream=True), one frame
    EndOfMessage(stream_id, trailers)        always, also after a head with end_stream
    StreamReset(stream_id, error_code, remote, retryable, reason)
    Writable(stream_id)
    ProtocolError(stream_id, status, reason, flag)
    PingAck(rtt)
    ConnectionTerminated(error_code, last_stream_id, reason, remote, streams)

Header lists are ``list[tuple[bytes, bytes]]`` with lowercase names (as ``http1``); the
pseudo-headers are mapped to fields of the heads and never appear in ``headers``; a
request's ``host`` field is folded into ``authority`` (and must agree with ``:authority``).

Safe defaults (``Http2Limits``), enforced here and not left to h2:

* Frame headers are pre-scanned before h2 sees the bytes: a frame longer than our
  SETTINGS_MAX_FRAME_SIZE is refused on its 9-byte header (h2 would buffer up to 16 MiB
  first); a header block (HEADERS + CONTINUATION) is bounded in bytes
  (``max_header_block``) and frames (``max_continuation_frames``): the CONTINUATION flood
  -> GOAWAY ENHANCE_YOUR_CALM.
* HPACK bomb: the decoder (``http2_hpack``) checks the decoded size (name + value + 32
  per field) after each field and stops at ``decoder_limit`` (advertised as SETTINGS_MAX_HEADER_LIST_SIZE);
  indexed fields reference the table's bytes objects, so a small block that expands
  hugely stops after a few fields without allocating the expanded size -> GOAWAY
  ENHANCE_YOUR_CALM (the HPACK state is lost, so the connection must go). Below that
  cap, more than ``max_headers`` fields or ``max_header_bytes`` of names + values -> 431
  on the stream.
* Max concurrent streams (100): a stream beyond it gets RST_STREAM REFUSED_STREAM, a
  stream error as RFC 9113 5.1.2 requires (h2 itself would tear the connection down).
* Rapid Reset (CVE-2023-44487): more than ``max_resets`` streams reset by the client
  before their response ended (or refused) within ``window_s`` -> GOAWAY
  ENHANCE_YOUR_CALM. SETTINGS, PING, empty DATA frames, and PRIORITY/unknown frames have
  their own budgets per window (floods -> GOAWAY ENHANCE_YOUR_CALM).
* Malformed requests (RFC 9113 8.1.1, 8.2, 8.3): missing/duplicate/unknown/late
  pseudo-headers, uppercase or invalid names, CR/LF/NUL or surrounding whitespace in
  values, connection-specific fields (connection, keep-alive, proxy-connection,
  transfer-encoding, upgrade), ``te`` other than ``trailers``, ``host`` differing from
  ``:authority``, a bad ``:path`` or duplicate differing content-length: a 400 response
  and RST_STREAM PROTOCOL_ERROR (when the client's half is still open); CONNECT -> 405
  (no tunnelling, as in ``http1``). Malformed trailers: RST_STREAM PROTOCOL_ERROR.
  Responses from an upstream are checked the same way (-> ``ProtocolError`` 502 UPE).
* Memory per connection: received, unconsumed DATA <= the connection window; queued
  outgoing DATA <= ``stream_buffer`` per stream plus one write (if the driver honours
  ``blocked``); h2's input buffer <= one frame; the header block buffer <= its cap; h2's
  record of closed streams <= ``closed_streams`` entries (h2 keeps 65536 by default), its
  closed streams not yet pruned <= 64; the per-connection caches of checked fields (512
  of <= 256 bytes, each direction), encoded fields (512 of <= 512 bytes) and decoded
  blocks (64 of <= 1 KiB, all of one table state) are emptied when full.

Deliberate h2 workarounds (h2 4.x): h2's connection state machine closes on any GOAWAY,
so after a *graceful* GOAWAY (NO_ERROR, either direction) the state is put back to open
and this codec refuses new streams itself, letting streams up to the last stream id
finish (python-hyper/h2#1181). h2 treats malformed headers and an exceeded stream limit as
connection errors; its inbound validation is off and the checks here make them stream
errors. A non-numeric content-length, differing duplicate values and a body longer or
shorter than the content-length stay h2 connection errors (PROTOCOL_ERROR): h2 checks
them before any hook runs.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events as h2e
import h2.exceptions
import h2.settings
from h2.settings import SettingCodes
from hyperframe.frame import RstStreamFrame

from nodeagent.proxy.l7.errors import grpc_error, local_reply
from nodeagent.proxy.l7.grpc import is_grpc
from nodeagent.proxy.l7.http1 import _HOST, LocalProtocolError
from nodeagent.proxy.l7.http2_hpack import UNIQUE, Decoder, StatelessEncoder

Headers = list[tuple[bytes, bytes]]

# RFC 9113 7 error codes
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types and flags the pre-scan looks at (RFC 9113 6)
_DATA, _HEADERS, _PRIORITY, _SETTINGS, _PING, _GOAWAY, _CONTINUATION = 0x0, 0x1, 0x2, 0x4, 0x6, 0x7, 0x9
_KNOWN_TYPES = 0x9
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4


@dataclass(frozen=True, slots=True)
class Http2Limits:
    max_concurrent_streams: int = 100
    max_headers: int = 100  # fields per header/trailer section (-> 431)
    max_header_bytes: int = 60 * 1024  # names + values per section (-> 431), as http1
    max_header_block: int = 96 * 1024  # encoded HEADERS+CONTINUATION bytes buffered (-> GOAWAY)
    max_continuation_frames: int = 32  # h2 itself stops at 64 with a less clear error
    max_frame_size: int = 16384  # our SETTINGS_MAX_FRAME_SIZE
    stream_window: int = 256 * 1024  # SETTINGS_INITIAL_WINDOW_SIZE
    connection_window: int = 1024 * 1024
    stream_buffer: int = 64 * 1024  # queued outgoing bytes per stream before blocked()
    window_s: float = 10.0  # the window of the flood budgets below
    max_resets: int = 200  # premature resets + refused streams (Rapid Reset)
    max_settings: int = 50
    max_pings: int = 100
    max_empty_data: int = 100  # DATA frames without payload and without END_STREAM
    max_noop_frames: int = 1000  # PRIORITY and unknown frame types
    closed_streams: int = 1024  # how many closed streams h2 remembers (memory per connection)

    @property
    def decoder_limit(self) -> int:
        """The HPACK decoded-size cap (RFC 7541 accounting: name + value + 32 per field)."""
        return self.max_header_bytes + 32 * self.max_headers + 4096

    def __post_init__(self) -> None:
        if not 16384 <= self.max_frame_size <= 16777215:
            raise ValueError(f"max_frame_size {self.max_frame_size} outside 16384..16777215")
        if not 65535 <= self.stream_window <= 2**31 - 1 or not 65535 <= self.connection_window <= 2**31 - 1:
            raise ValueError("flow-control windows must be between 65535 and 2^31-1")
        if self.max_concurrent_streams < 1:
            raise ValueError("max_concurrent_streams must be at least 1")


DEFAULT_LIMITS = Http2Limits()


# ----------------------------------------------------------------------------- events
@dataclass(slots=True)
class RequestHead:
    stream_id: int
    method: bytes
    scheme: bytes
    authority: bytes
    path: bytes
    headers: Headers
    end_stream: bool = False
    content_length: int | None = None
    grpc: bool = False


@dataclass(slots=True)
class ResponseHead:
    stream_id: int
    status: int
    headers: Headers
    end_stream: bool = False
    content_length: int | None = None

    @property
    def informational(self) -> bool:
        return self.status < 200


@dataclass(slots=True)
class Data:
    stream_id: int
    data: bytes
    end_stream: bool = False  # the frame had END_STREAM: an EndOfMessage without trailers follows


@dataclass(slots=True)
class EndOfMessage:
    stream_id: int
    trailers: Headers = field(default_factory=list)


@dataclass(slots=True)
class StreamReset:
    stream_id: int
    error_code: int
    remote: bool
    retryable: bool = False  # the peer never processed it (REFUSED_STREAM, above a GOAWAY's last id)
    reason: str = ""


@dataclass(slots=True)
class Writable:
    stream_id: int


@dataclass(slots=True)
class ProtocolError:
    stream_id: int
    status: int
    reason: str
    flag: str = "DPE"


@dataclass(slots=True)
class PingAck:
    rtt: float


@dataclass(slots=True)
class ConnectionTerminated:
    error_code: int
    last_stream_id: int
    reason: str
    remote: bool
    streams: tuple[int, ...] = ()  # our active streams at that moment


# ------------------------------------------------------------------------- internals
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")  # a lowercase token (RFC 9113 8.2.1)
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*")
_BAD_PATH = re.compile(rb"[\x00-\x20\x7f]")
_STATUS = re.compile(rb"[1-5][0-9][0-9]")
_CONNECTION_SPECIFIC = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
})
_FIELD_CACHE = 512  # checked fields remembered per connection and direction (then forgotten)
_FIELD_CACHE_BYTES = 256  # longer fields are checked every time (bounded memory)
_NOTHING: frozenset[int] = frozenset()


class _Malformed(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _H2(h2.connection.H2Connection):
    """h2 with its stream limits lifted and its HPACK replaced.

    Stream limits: the wrapper refuses excess inbound streams with RST_STREAM
    REFUSED_STREAM (a stream error) instead of h2's connection error, and ``capacity``
    keeps outbound streams within the peer's SETTINGS_MAX_CONCURRENT_STREAMS before h2 is
    asked. h2 counts open streams by walking every stream it holds, for every new stream
    (O(streams) per stream): here closed streams are pruned once ``_PRUNE_SLACK`` of
    them accumulated (amortised O(1); a closed stream still held answers late frames
    exactly as a pruned one does, h2 prunes lazily too).

    h2 remembers how each closed stream ended, up to MAX_CLOSED_STREAMS (2^16 by default:
    about 7 MiB on a long-lived connection); a late frame for a stream forgotten from that
    list is still a stream error (RST_STREAM STREAM_CLOSED), so a short memory is safe.

    HPACK: ``http2_hpack``'s stateless encoder and its decoder (same limits, less CPU).
    """

    _PRUNE_SLACK = 64

    def __init__(self, config: h2.config.H2Configuration, closed_streams: int) -> None:
        self.MAX_CLOSED_STREAMS = closed_streams  # read by H2Connection.__init__
        super().__init__(config=config)
        self.encoder = StatelessEncoder()
        self.decoder = Decoder()
        self._prune_at = self._PRUNE_SLACK

    def _prune(self) -> None:
        if len(self.streams) >= self._prune_at:
            self._open_streams(0)  # deletes every closed stream (the count is not used)
            self._prune_at = len(self.streams) + self._PRUNE_SLACK

    @property
    def open_inbound_streams(self) -> int:
        self._prune()
        return 0

    @property
    def open_outbound_streams(self) -> int:
        self._prune()
        return 0

    def _receive_frame(self, frame):
        """h2 4.x's ``H2Connection._receive_frame`` without its first line, a trace log whose
        argument ``repr(frame)`` is built eagerly for every frame (a twentieth of a gRPC
        call's CPU) and thrown away by h2's no-op logger. Otherwise the same code."""
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as e:
            # closed by RST_STREAM: a stream error (RST_STREAM); otherwise a connection error
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except h2.exceptions.StreamIDTooLowError as e:
            # a stream closed by reset: a stream error; closed by END_STREAM: a connection
            # error; closed implicitly (a higher id was opened): PROTOCOL_ERROR
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = h2.errors.ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise h2.exceptions.StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events


class _Gate:
    """A budget of ``limit`` events per fixed window of ``window`` seconds."""

    __slots__ = ("limit", "window", "start", "count")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.start = -1e18
        self.count = 0

    def hit(self, now: float) -> bool:
        """Count one event; True when the budget is exceeded."""
        if now - self.start >= self.window:
            self.start = now
            self.count = 0
        self.count += 1
        return self.count > self.limit


class _Stream:
    __slots__ = ("sid", "remote_done", "local_done", "head_sent", "out", "out_bytes",
                 "end", "blocked", "unacked", "trailers", "grpc", "rejected", "reset_after")

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.remote_done = False
        self.local_done = False
        self.head_sent = False  # a final (non-1xx) head went out
        self.out: deque[bytes] = deque()
        self.out_bytes = 0
        self.end: Headers | None = None  # send_end() called: trailers (maybe []) after `out`
        self.blocked = False
        self.unacked = 0  # DATA bytes delivered to the driver and not consumed yet
        self.trailers: Headers = []
        self.grpc = False
        self.rejected = False  # answered locally: the rest of the request is discarded
        self.reset_after: int | None = None  # RST_STREAM code once the local reply is out


def _check_fields(raw, limits: Http2Limits, good: set, status: int, trailers: bool) -> Headers:
    """The regular fields of a received section, checked (raises _Malformed).

    ``good``: fields (name, value) of this connection that passed before — a field is a
    pure function of its bytes, and most repeat on every request — checked again only
    for the section's count and size limits.
    """
    out: Headers = []
    n = size = 0
    for hv in raw:
        name, value = hv
        n += 1
        size += len(name) + len(value)
        if hv not in good:
            _check_field(name, value, status, trailers)
            if len(good) >= _FIELD_CACHE:
                good.clear()
            if len(name) + len(value) <= _FIELD_CACHE_BYTES and name not in UNIQUE:
                good.add((name, value))
        out.append((name, value))
    if n > limits.max_headers:
        raise _Malformed(431 if status == 400 else status, f"too many {'trailer' if trailers else 'header'} fields")
    if size > limits.max_header_bytes:
        raise _Malformed(431 if status == 400 else status, f"{'trailer' if trailers else 'header'} section too large")
    return out


def _check_field(name: bytes, value: bytes, status: int, trailers: bool) -> None:
    if name[:1] == b":":
        raise _Malformed(status, "pseudo-header in trailers" if trailers else "pseudo-header after a regular field")
    if _NAME.fullmatch(name) is None:
        raise _Malformed(status, f"invalid header name {name[:64]!r}")
    if value and _BAD_VALUE.search(value) is not None:
        raise _Malformed(status, f"invalid value for header {name.decode('latin-1')!r}")
    if name in _CONNECTION_SPECIFIC:
        raise _Malformed(status, f"connection-specific header {name.decode('latin-1')!r}")
    if name == b"te" and value.lower() != b"trailers":
        raise _Malformed(status, "te other than trailers")


def _content_length(headers: Headers, status: int) -> tuple[Headers, int | None]:
    """The content-length: duplicates must agree (RFC 9110 8.6) and only the first is kept."""
    cl = None
    dup = False
    for name, value in headers:
        if name != b"content-length":
            continue
        if not value.isdigit() or len(value) > 18:
            raise _Malformed(status, "invalid content-length")
        v = int(value)
        if cl is None:
            cl = v
        elif v != cl:
            raise _Malformed(status, "differing content-length values")
        else:
            dup = True
    if dup:
        seen = False
        out: Headers = []
        for hv in headers:
            if hv[0] == b"content-length":
                if seen:
                    continue
                seen = True
            out.append(hv)
        headers = out
    return headers, cl


def _check_outgoing(headers, good: set) -> None:
    """Refuse what the driver must never send (header injection toward HTTP/1 hops, fields
    RFC 9113 8.2.2 forbids). This is the only outbound check: h2's own validation and
    normalisation are off (they cost about a tenth of a proxied request's CPU). ``good``:
    the connection's fields that passed before (most repeat on every request or response)."""
    for hv in headers:
        if hv in good:
            continue
        name, value = hv
        if value and _BAD_VALUE.search(value) is not None:
            raise LocalProtocolError(f"invalid value for header {name!r}")
        if name[:1] == b":" or _NAME.fullmatch(name) is None:
            raise LocalProtocolError(f"invalid header name {name!r}")
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            raise LocalProtocolError(f"connection-specific header {name!r} in HTTP/2")
        if len(good) >= _FIELD_CACHE:
            good.clear()
        if type(name) is bytes and type(value) is bytes and len(name) + len(value) <= _FIELD_CACHE_BYTES \
                and name not in UNIQUE:
            good.add((name, value))


# ============================================================================ base
class _Connection:
    """What both sides share: the pre-scan, flood budgets, flow control, output queues."""

    _client_side = False

    def __init__(self, limits: Http2Limits = DEFAULT_LIMITS, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        cfg = h2.config.H2Configuration(
            client_side=self._client_side, header_encoding=None,
            validate_inbound_headers=False,  # checked here, as stream errors
            normalize_inbound_headers=True,  # joins cookie fields (RFC 9113 8.2.3)
            validate_outbound_headers=False,  # _check_outgoing (and the pseudo-headers are ours)
            normalize_outbound_headers=False,  # names are checked lowercase; the encoder marks
            # authorization/cookie never-indexed itself (and never indexes anything)
        )
        conn = _H2(cfg, limits.closed_streams)
        initial = {
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.decoder_limit,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
        }
        if self._client_side:
            initial[SettingCodes.ENABLE_PUSH] = 0
        conn.local_settings = h2.settings.Settings(client=self._client_side, initial_values=initial)
        conn.decoder.max_header_list_size = limits.decoder_limit
        conn.max_inbound_frame_size = limits.max_frame_size
        conn.initiate_connection()
        if limits.connection_window > 65535:
            conn.increment_flow_control_window(limits.connection_window - 65535)
        self._h2 = conn
        self._streams: dict[int, _Stream] = {}
        self._waiting: dict[int, _Stream] = {}  # streams with queued output (window closed)
        self._queued = 0
        self._ready: list = []
        self._dead = False
        self._goaway_last: int | None = None  # a GOAWAY was sent or received (no new streams)
        self._good: set[tuple[bytes, bytes]] = set()  # received fields that passed _check_fields
        self._good_out: set[tuple[bytes, bytes]] = set()  # fields we sent that passed _check_outgoing
        # pre-scan state
        self._preface = 0 if self._client_side else len(H2_PREFACE)
        self._hdr = bytearray()
        self._skip = 0
        self._in_block = False
        self._block_bytes = 0
        self._block_frames = 0
        w = limits.window_s
        self._settings_gate = _Gate(limits.max_settings, w)
        self._ping_gate = _Gate(limits.max_pings, w)
        self._empty_gate = _Gate(limits.max_empty_data, w)
        self._noop_gate = _Gate(limits.max_noop_frames, w)
        self._reset_gate = _Gate(limits.max_resets, w)
        self._violation: tuple[int, str] | None = None
        self._goaway_marks: list[tuple[int, int]] = []  # (start, end) of GOAWAY frames in this read
        self._goaway_pending = False  # a GOAWAY whose payload continues in the next read
        self._saved = bytearray()  # output h2 would drop on GOAWAY
        self._resetting: set[int] | frozenset[int] = _NOTHING  # streams reset in the batch being handled
        self._pings: dict[bytes, float] = {}
        self._ping_seq = 0
        self._dispatch = {
            h2e.DataReceived: self._on_data,
            h2e.StreamEnded: self._on_end,
            h2e.TrailersReceived: self._on_trailers,
            h2e.StreamReset: self._on_reset,
            h2e.WindowUpdated: self._on_window,
            h2e.RemoteSettingsChanged: self._on_settings,
            h2e.ConnectionTerminated: self._on_goaway,
            h2e.PingAckReceived: self._on_ping_ack,
        }

    # ---------------------------------------------------------------- public: state
    @property
    def closed(self) -> bool:
        """No more frames are processed: flush ``data_to_send()`` and close the socket."""
        return self._dead

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def buffered(self) -> int:
        """Outgoing DATA bytes queued behind closed flow-control windows."""
        return self._queued

    @property
    def goaway(self) -> bool:
        """A GOAWAY was sent or received: no new streams on this connection."""
        return self._goaway_last is not None or self._dead

    def blocked(self, stream_id: int) -> bool:
        st = self._streams.get(stream_id)
        return st is not None and st.out_bytes >= self.limits.stream_buffer

    def send_window(self, stream_id: int) -> int:
        """Bytes ``send_data`` would put on the wire right now for this stream."""
        st = self._streams.get(stream_id)
        if st is None or self._dead:
            return 0
        try:
            window = self._h2.local_flow_control_window(stream_id)
        except h2.exceptions.NoSuchStreamError:
            return 0
        return max(0, window - st.out_bytes)

    def data_to_send(self) -> bytes:
        out = self._h2.data_to_send()
        if self._saved:
            out = bytes(self._saved) + out
            self._saved.clear()
        return out

    # ---------------------------------------------------------------- public: input
    def receive_data(self, data: bytes) -> list:
        """Feed the peer's bytes; returns events. Never raises on bad peer input."""
        if self._dead or not data:
            return self._take()
        cut = self._scan(data)
        if cut is not None:
            data = data[:cut]
        marks = self._goaway_marks
        if not marks:
            self._feed(data)
        else:
            # h2 closes its state machine on GOAWAY and drops its pending output: feed each
            # GOAWAY frame on its own, keep the output so far, and let _on_goaway reopen a
            # graceful one before the frames that follow are fed
            self._goaway_marks = []
            pos = 0
            for start, end in marks:
                self._feed(data[pos:start])
                if not self._dead:
                    self._saved += self._h2.data_to_send()
                self._feed(data[start:end])
                pos = end
            self._feed(data[pos:])
        if cut is not None and not self._dead:
            code, reason = self._violation
            self._terminate(code, reason)
        return self._take()

    def _feed(self, data: bytes) -> None:
        if not data or self._dead:
            return
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:  # h2 queued its GOAWAY already
            self._terminated(int(exc.error_code), str(exc) or "protocol error")
            return
        self._handle(events)

    def consumed(self, stream_id: int, n: int) -> bytes:
        """The driver passed ``n`` received bytes of this stream on: reopen the windows."""
        st = self._streams.get(stream_id)
        if st is None or n <= 0 or self._dead:
            return self.data_to_send()
        n = min(n, st.unacked)
        if n:
            st.unacked -= n
            self._h2.acknowledge_received_data(n, stream_id)
        return self.data_to_send()

    def ping(self) -> bytes:
        """Send a PING (liveness); a ``PingAck(rtt)`` event follows when it comes back."""
        if self._dead:
            return b""
        self._ping_seq += 1
        opaque = self._ping_seq.to_bytes(8, "big")
        if len(self._pings) >= 16:  # a peer that never answers: keep the newest
            self._pings.pop(next(iter(self._pings)))
        self._pings[opaque] = self._clock()
        self._h2.ping(opaque)
        return self.data_to_send()

    @property
    def pings_outstanding(self) -> int:
        return len(self._pings)

    def close(self, error_code: int = NO_ERROR, reason: str = "") -> bytes:
        """GOAWAY and stop: the driver flushes the bytes and closes the socket."""
        if not self._dead:
            self._terminate(error_code, reason or "closing")
        self._take()
        return self.data_to_send()

    # ---------------------------------------------------------------- public: output
    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> bytes:
        """Queue and send what the windows admit; ``end_stream`` = ``send_end`` in the same frame."""
        st = self._sendable(stream_id)
        if st is not None:
            self._send_data(st, data, end_stream)
        return self.data_to_send()

    def _send_data(self, st: _Stream, data: bytes, end_stream: bool) -> None:
        if end_stream:
            st.end = []
        if data:
            st.out.append(data)
            st.out_bytes += len(data)
            self._queued += len(data)
            self._flush(st)
            if st.out_bytes >= self.limits.stream_buffer:
                st.blocked = True
        elif end_stream:
            self._flush(st)

    def send_end(self, stream_id: int, trailers: Headers = ()) -> bytes:
        """End our half of the stream (trailers optional) once queued data went out."""
        st = self._sendable(stream_id)
        if st is None:
            return self.data_to_send()
        trailers = list(trailers)
        if trailers:
            _check_outgoing(trailers, self._good_out)
        st.end = trailers
        self._flush(st)
        return self.data_to_send()

    def reset(self, stream_id: int, error_code: int = CANCEL) -> bytes:
        """RST_STREAM (e.g. the other side of the proxy went away)."""
        st = self._streams.get(stream_id)
        if st is None or self._dead:
            return self.data_to_send()
        self._reset(st, error_code)
        return self.data_to_send()

    # ---------------------------------------------------------------- internals: output
    def _gone(self, stream_id: int) -> bool:
        """The stream existed and ended or was reset (or the connection died): writes are
        dropped, as a closed transport drops them — the driver may still be handling events
        of the same batch (a request and its RST_STREAM arrive together)."""
        if self._dead:
            return True
        conn = self._h2
        highest = conn.highest_outbound_stream_id if self._client_side else conn.highest_inbound_stream_id
        return 0 < stream_id <= highest and stream_id not in self._streams

    def _stream(self, stream_id: int) -> _Stream | None:
        st = self._streams.get(stream_id)
        if st is None and not self._gone(stream_id):
            raise LocalProtocolError(f"no stream {stream_id}")
        return st

    def _sendable(self, stream_id: int) -> _Stream | None:
        st = self._stream(stream_id)
        if st is None:
            return None
        if not st.head_sent:
            raise LocalProtocolError("send the head first")
        if st.end is not None or st.local_done:
            raise LocalProtocolError("stream already ended")
        return st

    def _flush(self, st: _Stream, frames: int = -1) -> None:
        """Send queued DATA as the windows allow (at most ``frames`` frames when >= 0)."""
        conn = self._h2
        out = st.out
        while out:
            if frames == 0:  # its turn is over: to the back of the queue (round robin)
                self._waiting.pop(st.sid, None)
                self._waiting[st.sid] = st
                return
            frames -= 1
            window = conn.local_flow_control_window(st.sid)
            if window <= 0:
                self._waiting[st.sid] = st
                return
            chunk = out[0]
            n = min(window, len(chunk), conn.max_outbound_frame_size)
            if n == len(chunk):
                out.popleft()
                piece = chunk
            else:
                piece = chunk[:n]
                out[0] = chunk[n:]
            st.out_bytes -= n
            self._queued -= n
            last = not out and st.end is not None and not st.end
            conn.send_data(st.sid, piece, end_stream=last)
            if last:
                self._local_done(st)
                return
        self._waiting.pop(st.sid, None)
        if st.blocked and st.out_bytes < self.limits.stream_buffer:
            st.blocked = False
            self._ready.append(Writable(st.sid))
        if st.end is not None and not st.local_done:
            if st.end:
                conn.send_headers(st.sid, st.end, end_stream=True)
            else:
                conn.end_stream(st.sid)
            self._local_done(st)

    def _local_done(self, st: _Stream) -> None:
        st.local_done = True
        if st.reset_after is not None and not st.remote_done:
            self._reset(st, st.reset_after)
            return
        self._maybe_forget(st)

    def _maybe_forget(self, st: _Stream) -> None:
        if st.local_done and st.remote_done:
            self._forget(st)

    def _forget(self, st: _Stream) -> None:
        if self._streams.pop(st.sid, None) is None:
            return
        self._waiting.pop(st.sid, None)
        if st.out_bytes:
            self._queued -= st.out_bytes
            st.out.clear()
            st.out_bytes = 0
        if st.unacked:  # the connection window must not leak with the stream
            n, st.unacked = st.unacked, 0
            self._h2.acknowledge_received_data(n, st.sid)

    def _reset(self, st: _Stream, code: int) -> None:
        try:
            self._h2.reset_stream(st.sid, code)
        except h2.exceptions.StreamClosedError:
            pass  # already closed in h2 (both halves ended): nothing to reset
        self._forget(st)

    # ---------------------------------------------------------------- internals: input
    def _take(self) -> list:
        r = self._ready
        self._ready = []
        return r

    def _handle(self, events) -> None:
        # h2 has processed every frame of the read before we see its events: a stream reset
        # later in this batch is already closed in h2, so nothing may be sent on it while
        # the events before its StreamReset are handled (h2 would raise StreamClosedError)
        self._resetting = {ev.stream_id for ev in events if type(ev) is h2e.StreamReset}
        dispatch = self._dispatch
        try:
            for ev in events:
                fn = dispatch.get(type(ev))
                if fn is not None:
                    fn(ev)
                if self._dead:
                    return
        finally:
            self._resetting = _NOTHING

    def _on_data(self, ev) -> None:
        sid = ev.stream_id
        data = ev.data
        pad = ev.flow_controlled_length - len(data)
        st = self._streams.get(sid)
        if st is None or st.rejected:
            if ev.flow_controlled_length:  # nobody will consume these bytes
                self._h2.acknowledge_received_data(ev.flow_controlled_length, sid)
            return
        if pad:
            self._h2.acknowledge_received_data(pad, sid)
        if data:
            st.unacked += len(data)
            self._ready.append(Data(sid, data, ev.stream_ended is not None))

    def _on_trailers(self, ev) -> None:
        st = self._streams.get(ev.stream_id)
        if st is None or st.rejected:
            return
        try:
            st.trailers = _check_fields(ev.headers, self.limits, self._good, self._err_status, True)
        except _Malformed as m:
            st.remote_done = True
            self._ready.append(StreamReset(st.sid, PROTOCOL_ERROR, False, False, m.reason))
            self._reset(st, PROTOCOL_ERROR)

    def _on_end(self, ev) -> None:
        st = self._streams.get(ev.stream_id)
        if st is None:
            return
        st.remote_done = True
        if st.rejected:
            self._maybe_forget(st)
            return
        self._ready.append(EndOfMessage(st.sid, st.trailers))
        self._maybe_forget(st)

    def _on_reset(self, ev) -> None:
        st = self._streams.get(ev.stream_id)
        if st is None:
            return
        premature = not st.local_done if not self._client_side else False
        self._forget(st)
        if not st.rejected:
            self._ready.append(StreamReset(st.sid, int(ev.error_code), True,
                                           int(ev.error_code) == REFUSED_STREAM))
        if premature and self._reset_gate.hit(self._clock()):
            self._terminate(ENHANCE_YOUR_CALM, "too many streams reset by the client")

    def _on_window(self, ev) -> None:
        sid = ev.stream_id
        if sid:
            st = self._waiting.get(sid)
            if st is not None and sid not in self._resetting:
                self._flush(st)
            return
        self._flush_all()

    def _flush_all(self) -> None:
        """The connection window opened: share it among the waiting streams, a frame each
        per round, so one large response cannot starve the others."""
        conn = self._h2
        waiting = self._waiting
        while waiting and conn.outbound_flow_control_window > 0:
            queued = self._queued
            for st in list(waiting.values()):
                if conn.outbound_flow_control_window <= 0:
                    return
                if st.sid in self._resetting:
                    continue
                if st.sid in self._streams:
                    self._flush(st, 1)
                else:
                    waiting.pop(st.sid, None)
            if self._queued == queued:  # every waiting stream is blocked on its own window
                return

    def _on_settings(self, ev) -> None:
        if SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
            self._flush_all()

    def _on_ping_ack(self, ev) -> None:
        t0 = self._pings.pop(bytes(ev.ping_data), None)
        if t0 is not None:
            self._ready.append(PingAck(self._clock() - t0))

    def _on_goaway(self, ev) -> None:
        code = int(ev.error_code)
        last = ev.last_stream_id
        reason = bytes(ev.additional_data or b"").decode("utf-8", "replace")
        ours = [sid for sid in self._streams if (sid % 2 == 1) == self._client_side]
        for sid in ours:  # never processed by the peer (RFC 9113 6.8): safe to retry
            if sid > last:
                st = self._streams[sid]
                self._forget(st)
                self._ready.append(StreamReset(sid, REFUSED_STREAM, True, True, "above GOAWAY last-stream-id"))
        if code == NO_ERROR and self._streams:
            # graceful: keep h2 open so streams up to `last` finish (python-hyper/h2#1181)
            self._goaway_last = last
            self._reopen()
            self._ready.append(ConnectionTerminated(code, last, reason, True, tuple(self._streams)))
            return
        self._dead = True
        self._ready.append(ConnectionTerminated(code, last, reason, True, tuple(self._streams)))
        self._streams.clear()
        self._waiting.clear()
        self._queued = 0

    def _reopen(self) -> None:
        state = h2.connection.ConnectionState
        self._h2.state_machine.state = state.CLIENT_OPEN if self._client_side else state.SERVER_OPEN

    def _terminated(self, code: int, reason: str) -> None:
        """h2 raised a connection error (and queued GOAWAY)."""
        self._dead = True
        self._ready.append(ConnectionTerminated(code, self._h2.highest_inbound_stream_id, reason, False,
                                                tuple(self._streams)))
        self._streams.clear()
        self._waiting.clear()
        self._queued = 0

    def _terminate(self, code: int, reason: str) -> None:
        """Our own connection error (or close): GOAWAY with a reason, then stop."""
        try:
            self._h2.close_connection(code, additional_data=reason.encode("utf-8")[:256])
        except h2.exceptions.ProtocolError:
            pass
        self._terminated(code, reason)

    # ---------------------------------------------------------------- the pre-scan
    def _scan(self, data: bytes) -> int | None:
        """Walk frame headers before h2 parses; returns where a violating frame starts."""
        i = 0
        n = len(data)
        if self._preface:
            k = min(self._preface, n)
            self._preface -= k
            i = k
        hdr = self._hdr
        lim = self.limits
        while i < n:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                if not self._skip and self._goaway_pending:
                    self._goaway_pending = False
                    self._goaway_marks.append((0, i))
                continue
            start = i
            if hdr or n - i < 9:
                k = min(9 - len(hdr), n - i)
                hdr += data[i:i + k]
                i += k
                if len(hdr) < 9:
                    return None
                h = bytes(hdr)
                hdr.clear()
                start = 0 if i < 9 else i - 9
            else:
                h = data[i:i + 9]
                i += 9
            length = (h[0] << 16) | (h[1] << 8) | h[2]
            ftype = h[3]
            flags = h[4]
            err = self._check_frame(length, ftype, flags, lim)
            if err is not None:
                self._violation = err
                return start
            self._skip = length
            if ftype == _GOAWAY:
                if n - i >= length:
                    self._goaway_marks.append((start, i + length))
                else:
                    self._goaway_pending = True
        return None

    def _check_frame(self, length: int, ftype: int, flags: int, lim: Http2Limits) -> tuple[int, str] | None:
        if length > lim.max_frame_size:
            return FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds SETTINGS_MAX_FRAME_SIZE"
        if self._in_block:
            if ftype != _CONTINUATION:
                return None  # h2 rejects the interleaved frame as a PROTOCOL_ERROR
            self._block_frames += 1
            self._block_bytes += length
            if self._block_frames > lim.max_continuation_frames:
                return ENHANCE_YOUR_CALM, "too many CONTINUATION frames"
            if self._block_bytes > lim.max_header_block:
                return ENHANCE_YOUR_CALM, "header block too large"
            if flags & _END_HEADERS:
                self._in_block = False
            return None
        if ftype == _DATA:
            if length == 0 and not flags & _END_STREAM and self._empty_gate.hit(self._clock()):
                return ENHANCE_YOUR_CALM, "too many empty DATA frames"
        elif ftype == _HEADERS:
            if not flags & _END_HEADERS:
                self._in_block = True
                self._block_bytes = length
                self._block_frames = 0
        elif ftype == _SETTINGS:
            if not flags & _ACK and self._settings_gate.hit(self._clock()):
                return ENHANCE_YOUR_CALM, "too many SETTINGS frames"
        elif ftype == _PING:
            if not flags & _ACK and self._ping_gate.hit(self._clock()):
                return ENHANCE_YOUR_CALM, "too many PING frames"
        elif ftype == _PRIORITY or ftype > _KNOWN_TYPES:
            if self._noop_gate.hit(self._clock()):
                return ENHANCE_YOUR_CALM, "too many PRIORITY or unknown frames"
        return None

    _err_status = 400


# ============================================================================ server side
class ServerConnection(_Connection):
    """The downstream side of one HTTP/2 client connection: requests in, responses out."""

    _client_side = False
    _err_status = 400

    def __init__(self, limits: Http2Limits = DEFAULT_LIMITS, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(limits, clock=clock)
        self._dispatch[h2e.RequestReceived] = self._on_request

    # ---------------------------------------------------------------- output
    def send_response(self, stream_id: int, status: int, headers: Headers = (), *,
                      end_stream: bool = False) -> bytes:
        """A response head (1xx included); ``end_stream`` for a response without a body."""
        self._send_response(stream_id, status, headers, end_stream)
        return self.data_to_send()

    def _send_response(self, stream_id: int, status: int, headers: Headers, end_stream: bool) -> None:
        st = self._stream(stream_id)
        if st is None:
            return
        if st.head_sent:
            raise LocalProtocolError("response head already sent")
        if not 100 <= status <= 599 or status == 101:
            raise LocalProtocolError(f"invalid status {status} for HTTP/2")
        if status < 200 and end_stream:
            raise LocalProtocolError("a 1xx response cannot end the stream")
        headers = list(headers)
        _check_outgoing(headers, self._good_out)
        headers.insert(0, (b":status", b"%d" % status))
        try:
            self._h2.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None
        if status >= 200:
            st.head_sent = True
            if end_stream:
                st.end = []
                self._local_done(st)

    def send_local_reply(self, stream_id: int, flag: str, status: int | None = None,
                         message: str | None = None, extra: tuple[tuple[bytes, bytes], ...] = (),
                         grpc_status: int | None = None) -> bytes:
        """A proxy-made reply (errors.local_reply; gRPC: a trailers-only response with
        ``grpc_status``, by default the flag's)."""
        st = self._stream(stream_id)
        if st is None:
            return self.data_to_send()
        if st.head_sent:
            raise LocalProtocolError("a response was already started")
        self._local_reply(st, flag, status, message, extra, grpc_status)
        return self.data_to_send()

    def drain(self) -> bytes:
        """Graceful shutdown: GOAWAY(NO_ERROR); streams already open finish, new ones are refused.

        Once ``active_streams`` is 0 the driver calls ``close()`` and closes the socket.
        """
        if self._dead or self._goaway_last is not None:
            return self.data_to_send()
        last = self._h2.highest_inbound_stream_id
        self._h2.close_connection(NO_ERROR, last_stream_id=last)
        self._goaway_last = last
        self._reopen()
        return self.data_to_send()

    # ---------------------------------------------------------------- internals
    def _local_reply(self, st: _Stream, flag: str, status: int | None, message: str | None,
                     extra: tuple[tuple[bytes, bytes], ...] = (), grpc_status: int | None = None) -> None:
        if not st.remote_done:
            st.rejected = True  # the rest of the request is not wanted
            if st.unacked:
                n, st.unacked = st.unacked, 0
                self._h2.acknowledge_received_data(n, st.sid)
            if st.reset_after is None:
                st.reset_after = NO_ERROR  # RFC 9113 8.1: stop sending, without error
        if st.grpc:
            self._h2.send_headers(st.sid, grpc_error(flag, grpc_status, message) + list(extra), end_stream=True)
            st.head_sent = True
            st.end = []
            self._local_done(st)
            return
        r = local_reply(flag, status, message, extra)
        self._send_response(st.sid, r.status, r.headers + [(b"content-length", b"%d" % len(r.body))], False)
        self._send_data(st, r.body, True)

    def _on_request(self, ev) -> None:
        sid = ev.stream_id
        if sid in self._resetting:  # opened and reset in one read: nothing to do but count it
            if self._reset_gate.hit(self._clock()):
                self._terminate(ENHANCE_YOUR_CALM, "too many streams reset by the client")
            return
        if self._goaway_last is not None and sid > self._goaway_last:
            self._h2.reset_stream(sid, REFUSED_STREAM)
            return
        if len(self._streams) >= self.limits.max_concurrent_streams:
            self._h2.reset_stream(sid, REFUSED_STREAM)
            if self._reset_gate.hit(self._clock()):
                self._terminate(ENHANCE_YOUR_CALM, "too many refused streams")
            return
        st = _Stream(sid)
        self._streams[sid] = st
        try:
            head = self._request_head(sid, ev.headers)
        except _Malformed as m:
            st.remote_done = ev.stream_ended is not None
            st.grpc = is_grpc(ev.headers)  # a gRPC client gets a trailers-only INTERNAL
            self._ready.append(ProtocolError(sid, m.status, m.reason, "DPE"))
            if m.status == 400:
                st.reset_after = PROTOCOL_ERROR  # RFC 9113 8.1.1: a stream error
            self._local_reply(st, "DPE", m.status, m.reason)
            return
        head.end_stream = ev.stream_ended is not None
        st.grpc = head.grpc
        self._ready.append(head)

    def _request_head(self, sid: int, raw) -> RequestHead:
        method = scheme = authority = path = None
        i = 0
        n = len(raw)
        while i < n:
            name, value = raw[i]
            if name[:1] != b":":
                break
            i += 1
            if value and _BAD_VALUE.search(value) is not None:
                raise _Malformed(400, f"invalid value for {name.decode('latin-1')!r}")
            if name == b":method":
                if method is not None:
                    raise _Malformed(400, "duplicate :method")
                method = value
            elif name == b":path":
                if path is not None:
                    raise _Malformed(400, "duplicate :path")
                path = value
            elif name == b":scheme":
                if scheme is not None:
                    raise _Malformed(400, "duplicate :scheme")
                scheme = value
            elif name == b":authority":
                if authority is not None:
                    raise _Malformed(400, "duplicate :authority")
                authority = value
            else:  # :status, :protocol (extended CONNECT is not offered), anything else
                raise _Malformed(400, f"invalid pseudo-header {name[:32].decode('latin-1')!r}")
        headers = _check_fields(raw[i:] if i else raw, self.limits, self._good, 400, False)
        if method is None or _METHOD.fullmatch(method) is None:
            raise _Malformed(400, "missing or invalid :method")
        if method == b"CONNECT":
            raise _Malformed(405, "CONNECT is not supported")
        if scheme is None or _SCHEME.fullmatch(scheme) is None:
            raise _Malformed(400, "missing or invalid :scheme")
        if not path:
            raise _Malformed(400, "missing or empty :path")
        if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
            raise _Malformed(400, "invalid :path")
        if _BAD_PATH.search(path) is not None or b"#" in path:
            raise _Malformed(400, "invalid :path")
        host = None
        nhost = 0
        for name, value in headers:
            if name == b"host":
                host = value
                nhost += 1
        if nhost:
            if nhost > 1:
                raise _Malformed(400, "duplicate host header")
            if authority is not None and host != authority:
                raise _Malformed(400, "host differs from :authority")
            authority = host
            headers = [hv for hv in headers if hv[0] != b"host"]
        if not authority or _HOST.fullmatch(authority) is None:
            raise _Malformed(400, "missing or invalid :authority")
        headers, cl = _content_length(headers, 400)
        return RequestHead(sid, method, scheme, authority, path, headers, False, cl, is_grpc(headers))


# ============================================================================ client side
class ClientConnection(_Connection):
    """The upstream side: requests multiplexed over one HTTP/2 connection to a server.

    ``capacity`` is how many more streams may be opened now (the peer's
    SETTINGS_MAX_CONCURRENT_STREAMS, capped by ours; 0 after GOAWAY). ``send_request``
    refuses when it is 0: the pool queues the request or opens another connection.
    """

    _client_side = True
    _err_status = 502

    def __init__(self, limits: Http2Limits = DEFAULT_LIMITS, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(limits, clock=clock)
        d = self._dispatch
        d[h2e.ResponseReceived] = self._on_response
        d[h2e.InformationalResponseReceived] = self._on_response

    @property
    def capacity(self) -> int:
        if self._dead or self._goaway_last is not None:
            return 0
        peer = self._h2.remote_settings.max_concurrent_streams
        return max(0, min(peer, self.limits.max_concurrent_streams) - len(self._streams))

    @property
    def reusable(self) -> bool:
        return not self._dead and self._goaway_last is None

    def send_request(self, head: RequestHead) -> int:
        """Open a stream for ``head`` (its ``stream_id`` is ignored); returns the new id.

        ``head.end_stream`` sends a request without a body; otherwise ``send_data`` /
        ``send_end`` follow. Output: ``data_to_send()``.
        """
        if self.capacity <= 0:
            raise LocalProtocolError("no stream capacity on this connection")
        if not head.method or _METHOD.fullmatch(head.method) is None:
            raise LocalProtocolError(f"invalid method {head.method!r}")
        if not head.path or _BAD_PATH.search(head.path) is not None:
            raise LocalProtocolError(f"invalid path {head.path!r}")
        if not head.authority or _BAD_VALUE.search(head.authority) is not None:
            raise LocalProtocolError(f"invalid authority {head.authority!r}")
        _check_outgoing(head.headers, self._good_out)
        fields = [(b":method", head.method), (b":scheme", head.scheme or b"http"),
                  (b":authority", head.authority), (b":path", head.path)]
        fields.extend(hv for hv in head.headers if hv[0] != b"host")
        conn = self._h2
        sid = conn.get_next_available_stream_id()
        try:
            conn.send_headers(sid, fields, end_stream=head.end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None
        st = _Stream(sid)
        st.head_sent = True
        self._streams[sid] = st
        if head.end_stream:
            st.end = []
            st.local_done = True
        return sid

    def _on_response(self, ev) -> None:
        st = self._streams.get(ev.stream_id)
        if st is None:
            return
        try:
            head = self._response_head(ev.stream_id, ev.headers)
        except _Malformed as m:
            self._ready.append(ProtocolError(st.sid, 502, m.reason, "UPE"))
            self._reset(st, PROTOCOL_ERROR)
            return
        if head.status >= 200:
            head.end_stream = getattr(ev, "stream_ended", None) is not None
        self._ready.append(head)

    def _response_head(self, sid: int, raw) -> ResponseHead:
        status = None
        i = 0
        for name, value in raw:
            if name[:1] != b":":
                break
            i += 1
            if name != b":status" or status is not None:
                raise _Malformed(502, f"invalid or duplicate pseudo-header {name[:32]!r} in a response")
            status = value
        if status is None or _STATUS.fullmatch(status) is None:
            raise _Malformed(502, "missing or invalid :status")
        code = int(status)
        if code == 101:
            raise _Malformed(502, "101 is not allowed in HTTP/2")
        headers = _check_fields(raw[i:] if i else raw, self.limits, self._good, 502, False)
        headers, cl = _content_length(headers, 502)
        return ResponseHead(sid, code, headers, False, cl)
