"""HPACK (RFC 7541) for the HTTP/2 codec: a stateless encoder and a decoder, both plugged into h2.

h2 calls ``encoder.encode(headers)`` for every header block it sends and
``decoder.decode(block, raw=True)`` for every one it receives; the pure-Python ``hpack``
classes it uses by default cost a large share of a proxied request's CPU (a debug-log
call per field, a table search per field, Huffman coding of every literal). These two
classes are drop-in replacements (``http2._Connection`` installs them on its h2
connection) and do the same work for less:

* ``StatelessEncoder`` never adds to the dynamic table (HAProxy's choice): a field is
  a static-table index, or a literal without indexing (never-indexed for credentials)
  with a static-table name where there is one. The encoding of a field therefore depends
  on the field alone, so it is computed once per connection and then looked up (a small,
  bounded cache). Values that are not remembered (credentials, long ones, per-request
  ids: ``UNIQUE``) go out as plain literals, not Huffman-coded. Nothing the peer sees depends on our table state, so nothing can go
  out of sync; the cost is compression (a repeated field is a few literal bytes each
  time, not one index byte). A smaller SETTINGS_HEADER_TABLE_SIZE from the peer is
  acknowledged with the dynamic table size updates RFC 7541 4.2 requires.
* ``Decoder`` implements the full decoding side (the peer may use its dynamic table
  however it likes) with the same protections as ``hpack.Decoder``: the decoded size
  (name + value + 32 per field) is checked after each field against
  ``max_header_list_size`` (the HPACK bomb: indexed fields reference the table's bytes
  objects, so an expansion stops before it allocates), table size updates are bounded by
  ``max_allowed_table_size``, and a truncated block or bad index is an error; in
  addition an integer longer than 5 continuation bytes (> 2^35, more than any valid
  length or index) is refused before it costs quadratic time. A block decoded without
  changing the dynamic table is remembered (bounded): while the table stays unchanged,
  the same bytes decode to the same fields, which is what a client repeating a request
  (everything indexed) or a server repeating a response produces.

Errors are ``hpack`` exceptions, which h2 turns into connection errors (COMPRESSION_ERROR,
or ENHANCE_YOUR_CALM for an oversized list) exactly as with its own decoder.
"""

from __future__ import annotations

from collections import deque

from hpack.exceptions import HPACKDecodingError, InvalidTableIndexError, InvalidTableSizeError, \
    OversizedHeaderListError
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman
from hpack.struct import NeverIndexedHeaderTuple
from hpack.table import HeaderTable

STATIC = HeaderTable.STATIC_TABLE  # 61 (name, value) pairs, index 1..61
_STATIC_LEN = len(STATIC)
_STATIC_FIELD: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(STATIC, 1):
    _STATIC_FIELD.setdefault((_n, _v), _i)
    _STATIC_NAME.setdefault(_n, _i)
del _i, _n, _v

# fields h2's outbound normalisation marks never-indexed (credentials, RFC 7541 7.1.3)
_SENSITIVE = frozenset({b"authorization", b"proxy-authorization", b"cookie"})
# fields whose value is new on every request (ids, deadlines): remembering them would only
# push the fields that do repeat out of the per-connection caches
UNIQUE = frozenset({b"x-request-id", b"traceparent", b"tracestate", b"x-b3-traceid", b"x-b3-spanid",
                    b"x-b3-parentspanid", b"b3", b"x-amzn-trace-id", b"x-cloud-trace-context", b"grpc-timeout"})

DEFAULT_TABLE_SIZE = 4096
_FIELD_CACHE = 512  # encoded fields remembered per connection
_FIELD_CACHE_BYTES = 512  # longer fields are encoded every time (bounded memory)
_BLOCK_CACHE = 64  # decoded blocks remembered per connection
_BLOCK_CACHE_BYTES = 1024  # longer blocks are decoded every time
_MAX_INT_BYTES = 5  # continuation bytes of an HPACK integer (2^35: more than any valid value)


def encode_integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 5.1: ``value`` with an N-bit prefix, ``first`` the flag bits of the first byte."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def huffman_encode(data: bytes) -> bytes:
    """RFC 7541 5.2 Huffman coding (the static code of Appendix B), padded with ones."""
    codes, lengths = REQUEST_CODES, REQUEST_CODES_LENGTH
    acc = 0
    bits = 0
    for b in data:
        n = lengths[b]
        acc = (acc << n) | codes[b]
        bits += n
    pad = -bits % 8
    acc = (acc << pad) | ((1 << pad) - 1)
    return acc.to_bytes((bits + pad) // 8, "big")


def encode_string(data: bytes, huffman: bool = True) -> bytes:
    """A string literal, Huffman-coded when that is shorter (and ``huffman``)."""
    if huffman and data:
        h = huffman_encode(data)
        if len(h) < len(data):
            return encode_integer(len(h), 7, 0x80) + h
    return encode_integer(len(data), 7, 0) + data


def encode_field(name: bytes, value: bytes, sensitive: bool, huffman: bool = True) -> bytes:
    """One field without touching any dynamic table (static index, or a literal without
    indexing / never indexed, RFC 7541 6.1 / 6.2.2 / 6.2.3); ``huffman``: for the value
    (names are always Huffman-coded when shorter: few and remembered)."""
    if not sensitive:
        i = _STATIC_FIELD.get((name, value))
        if i is not None:
            return bytes((0x80 | i,))
    first = 0x10 if sensitive else 0x00
    i = _STATIC_NAME.get(name)
    if i is not None:
        return encode_integer(i, 4, first) + encode_string(value, huffman)
    return bytes((first,)) + encode_string(name) + encode_string(value, huffman)


class StatelessEncoder:
    """``hpack.Encoder``'s interface for h2 (``encode``, ``header_table_size``), never indexing."""

    __slots__ = ("_cache", "_table_size", "_pending")

    def __init__(self) -> None:
        self._cache: dict[tuple[bytes, bytes], bytes] = {}
        self._table_size = DEFAULT_TABLE_SIZE  # the size the peer's decoder assumes for our (empty) table
        self._pending = False

    @property
    def header_table_size(self) -> int:
        return self._table_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        # the peer's SETTINGS_HEADER_TABLE_SIZE. Our table stays empty, but a peer that
        # lowered its limit may insist on a size update at the start of the next block
        # (RFC 7541 4.2; nghttp2 does): remember the smallest; a larger limit changes nothing
        if value < self._table_size:
            self._table_size = value
            self._pending = True

    def encode(self, headers, huffman: bool = True) -> bytes:
        """A header block for ``headers`` (``(name, value)`` bytes pairs, lowercase names)."""
        cache = self._cache
        out = []
        if self._pending:
            self._pending = False
            out.append(encode_integer(self._table_size, 5, 0x20))
        append = out.append
        for hv in headers:
            plain = type(hv) is tuple  # a HeaderTuple may carry "never indexed": not cached
            if plain:
                b = cache.get(hv)
                if b is not None:
                    append(b)
                    continue
            name, value = hv[0], hv[1]
            if type(name) is not bytes:
                name = bytes(name, "utf-8") if type(name) is str else bytes(name)
            if type(value) is not bytes:
                value = bytes(value, "utf-8") if type(value) is str else bytes(value)
            sensitive = name in _SENSITIVE or (not plain and not getattr(hv, "indexable", True)) or (
                len(hv) > 2 and bool(hv[2]))
            keep = plain and not sensitive and len(name) + len(value) <= _FIELD_CACHE_BYTES and name not in UNIQUE
            # Huffman-code only what is remembered: a value encoded on every request costs
            # ~70 ns a byte to save a fifth of its bytes, a poor trade for a CPU-bound proxy
            b = encode_field(name, value, sensitive, keep)
            append(b)
            if keep:
                if len(cache) >= _FIELD_CACHE:
                    cache.clear()
                cache[hv] = b
        return b"".join(out)


class Decoder:
    """``hpack.Decoder``'s interface for h2 (``decode(block, raw=True)``, ``max_header_list_size``,
    ``max_allowed_table_size``, ``header_table_size``); returns ``(name, value)`` tuples
    (``hpack.NeverIndexedHeaderTuple`` for never-indexed literals)."""

    __slots__ = ("max_header_list_size", "max_allowed_table_size", "_maxsize", "_size", "_dynamic", "_gen",
                 "_blocks", "_blocks_gen")

    def __init__(self, max_header_list_size: int = 65536) -> None:
        self.max_header_list_size = max_header_list_size
        self.max_allowed_table_size = DEFAULT_TABLE_SIZE
        self._maxsize = DEFAULT_TABLE_SIZE
        self._size = 0
        self._dynamic: deque[tuple[bytes, bytes]] = deque()
        self._gen = 0  # changes whenever the dynamic table does (the block cache's validity)
        self._blocks: dict[bytes, tuple[list, int]] = {}  # block -> (fields, decoded size)
        self._blocks_gen = 0

    @property
    def header_table_size(self) -> int:
        return self._maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._resize(value)

    def _resize(self, value: int) -> None:
        self._maxsize = value
        self._gen += 1  # even without evictions: later additions behave differently
        dyn = self._dynamic
        while self._size > value:
            n, v = dyn.pop()
            self._size -= len(n) + len(v) + 32

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 32
        dyn = self._dynamic
        if size > self._maxsize:  # RFC 7541 4.4: an entry larger than the table empties it
            if dyn:
                dyn.clear()
                self._size = 0
                self._gen += 1
            # else nothing changed (nginx announces a 0-byte table and then "indexes" every
            # field): its blocks stay cacheable, and any resize invalidates them
            return
        self._gen += 1
        self._size += size
        dyn.appendleft((name, value))
        while self._size > self._maxsize:
            n, v = dyn.pop()
            self._size -= len(n) + len(v) + 32

    def _get(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= _STATIC_LEN:
            return STATIC[index - 1]
        i = index - _STATIC_LEN - 1
        if 0 <= i < len(self._dynamic):
            return self._dynamic[i]
        raise InvalidTableIndexError(f"invalid table index {index}")

    def decode(self, data: bytes, raw: bool = True) -> list:
        """The fields of one complete header block (raises ``hpack`` exceptions)."""
        if not raw:
            raise ValueError("only raw (bytes) decoding is supported")
        data = bytes(data)
        blocks = self._blocks
        if self._blocks_gen != self._gen:  # the table changed: remembered blocks may decode differently
            blocks.clear()
            self._blocks_gen = self._gen
        hit = blocks.get(data)
        if hit is not None:
            headers, inflated = hit
            if inflated > self.max_header_list_size:
                raise OversizedHeaderListError(f"A header list larger than {self.max_header_list_size} "
                                               "has been received")
            if self._maxsize > self.max_allowed_table_size:
                raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
            return list(headers)
        gen = self._gen
        headers, inflated = self._decode(data)
        if self._gen == gen and len(data) <= _BLOCK_CACHE_BYTES:
            if len(blocks) >= _BLOCK_CACHE:
                blocks.clear()
            blocks[data] = (headers, inflated)
            return list(headers)
        return headers

    def _decode(self, data: bytes) -> tuple[list, int]:
        headers: list = []
        append = headers.append
        limit = self.max_header_list_size
        inflated = 0
        i = 0
        n = len(data)
        while i < n:
            b = data[i]
            if b & 0x80:  # indexed field (6.1)
                index = b & 0x7F
                i += 1
                if index == 0x7F:
                    index, i = _integer(data, i, index)
                if index == 0:
                    raise InvalidTableIndexError("index 0 in an indexed field")
                field = self._get(index)
            elif b & 0x40:  # literal with incremental indexing (6.2.1)
                index = b & 0x3F
                i += 1
                if index == 0x3F:
                    index, i = _integer(data, i, index)
                field, i = self._literal(data, i, index)
                self._add(field[0], field[1])
            elif b & 0x20:  # dynamic table size update (6.3): only before the first field
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                size = b & 0x1F
                i += 1
                if size == 0x1F:
                    size, i = _integer(data, i, size)
                if size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self._resize(size)
                continue
            else:  # literal without indexing (6.2.2) or never indexed (6.2.3)
                index = b & 0x0F
                i += 1
                if index == 0x0F:
                    index, i = _integer(data, i, index)
                field, i = self._literal(data, i, index)
                if b & 0x10:
                    field = NeverIndexedHeaderTuple(field[0], field[1])
            append(field)
            inflated += len(field[0]) + len(field[1]) + 32
            if inflated > limit:
                raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
        if self._maxsize > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        return headers, inflated

    def _literal(self, data: bytes, i: int, index: int) -> tuple[tuple[bytes, bytes], int]:
        if index:
            name = self._get(index)[0]
        else:
            name, i = _string(data, i)
        value, i = _string(data, i)
        return (name, value), i


def _integer(data: bytes, i: int, value: int) -> tuple[int, int]:
    """The continuation bytes of an integer whose prefix was all ones (RFC 7541 5.1)."""
    shift = 0
    n = len(data)
    for _ in range(_MAX_INT_BYTES):
        if i >= n:
            raise HPACKDecodingError("Truncated header block")
        b = data[i]
        i += 1
        value += (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
    raise HPACKDecodingError("HPACK integer too large")


def _string(data: bytes, i: int) -> tuple[bytes, int]:
    if i >= len(data):
        raise HPACKDecodingError("Truncated header block")
    b = data[i]
    length = b & 0x7F
    i += 1
    if length == 0x7F:
        length, i = _integer(data, i, length)
    end = i + length
    if end > len(data):
        raise HPACKDecodingError("Truncated header block")
    s = data[i:end]
    if b & 0x80:
        s = decode_huffman(s)
    return s, end
