"""HPACK for the HTTP/2 codec (nodeagent.proxy.l7.http2_hpack) against the ``hpack`` library."""

from __future__ import annotations

import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.proxy.l7 import http2_hpack as hp

names = st.one_of(st.sampled_from([b"content-type", b"cookie", b"authorization", b"x-request-id", b"date",
                                   b"user-agent", b":path", b"x-custom"]),
                  st.binary(min_size=1, max_size=20).map(lambda b: b.lower()))
values = st.one_of(st.sampled_from([b"", b"gzip, deflate", b"text/plain", b"/"]), st.binary(max_size=300))
fields = st.lists(st.tuples(names, values), max_size=12)


@given(st.binary(max_size=200))
def test_huffman_encoding_matches_the_hpack_library_and_decodes_back(data):
    assert hp.huffman_encode(data) == HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(data)
    assert hpack.hpack.decode_huffman(hp.huffman_encode(data)) == data


@settings(max_examples=200)
@given(st.lists(fields, min_size=1, max_size=5))
def test_stateless_blocks_decode_with_the_hpack_library_and_never_touch_its_table(blocks):
    enc, dec = hp.StatelessEncoder(), hpack.Decoder()
    for headers in blocks + blocks:  # the second time from the field cache
        block = enc.encode(headers)
        out = dec.decode(block, raw=True)
        assert [tuple(h) for h in out] == headers
        assert len(dec.header_table.dynamic_entries) == 0
        for h in out:  # credentials are never-indexed for every hop after us too
            assert h.indexable == (h[0] not in (b"authorization", b"proxy-authorization", b"cookie"))


def test_field_encodings_static_index_static_name_new_name_and_never_indexed():
    enc = hp.StatelessEncoder()
    assert enc.encode([(b":method", b"GET"), (b":path", b"/")]) == b"\x82\x84"
    # :path is static index 4: literal without indexing with a static name, value Huffman-coded
    assert enc.encode([(b":path", b"/a")])[:1] == b"\x04"
    block = enc.encode([(b"x-a", b"1")])
    assert block[0] == 0x00 and hpack.Decoder().decode(block, raw=True) == [(b"x-a", b"1")]
    assert enc.encode([(b"authorization", b"t")])[:2] == b"\x1f\x08"  # never indexed, static name 23 (15 + 8)
    marked = hpack.NeverIndexedHeaderTuple(b"x-secret", b"s")
    assert enc.encode([marked])[0] == 0x10
    assert enc.encode([(b"x-secret", b"s")])[0] == 0x00  # the marked one was not cached for it


def test_uncached_values_are_plain_literals_and_stay_out_of_the_cache():
    enc = hp.StatelessEncoder()
    rid = b"0f0e0d0c-0b0a-4908-8706-050403020100"
    block = enc.encode([(b"x-request-id", rid), (b"x-long", b"v" * 1000)])
    assert rid in block and b"v" * 1000 in block  # not Huffman-coded
    assert enc._cache == {}
    enc.encode([(b"x-n", b"repeat")])
    assert (b"x-n", b"repeat") in enc._cache


def test_a_smaller_peer_table_size_is_announced_once_a_larger_one_changes_nothing():
    enc, dec = hp.StatelessEncoder(), hpack.Decoder()
    enc.header_table_size = 8192
    assert enc.encode([(b":method", b"GET")]) == b"\x82"
    enc.header_table_size = 256
    enc.header_table_size = 0
    enc.header_table_size = 1024
    block = enc.encode([(b":method", b"GET")])
    assert block == b"\x20\x82"  # the smallest since the last block (RFC 7541 4.2)
    dec.max_allowed_table_size = 0
    assert dec.decode(block, raw=True) == [(b":method", b"GET")] and dec.header_table_size == 0
    assert enc.encode([(b":method", b"GET")]) == b"\x82"


@settings(max_examples=150)
@given(st.lists(st.tuples(fields, st.sampled_from([None, None, None, 0, 64, 300, 4096])), min_size=1, max_size=8))
def test_decoder_matches_the_hpack_library_encoder_with_its_dynamic_table(blocks):
    enc, dec = hpack.Encoder(), hp.Decoder()
    for headers, size in blocks:
        for _ in range(2):  # the same fields again: mostly indexed, often the very same bytes
            if size is not None:
                enc.header_table_size = size
            block = enc.encode(headers)
            out = dec.decode(block)
            assert [tuple(h) for h in out] == headers
            assert list(dec._dynamic) == list(enc.header_table.dynamic_entries)


def test_a_remembered_block_is_invalidated_when_the_table_changes():
    dec = hp.Decoder()
    add = hpack.Encoder()
    dec.decode(add.encode([(b"x", b"1")]))  # literal with indexing: now index 62
    assert dec.decode(b"\xbe") == [(b"x", b"1")]
    assert dec.decode(b"\xbe") == [(b"x", b"1")] and b"\xbe" in dec._blocks  # remembered
    dec.decode(add.encode([(b"y", b"2")]))  # a new entry: 62 is now y
    assert dec.decode(b"\xbe") == [(b"y", b"2")]


def test_zero_size_table_blocks_are_remembered_until_the_table_is_resized():
    # nginx: a size update to 0, then "literal with incremental indexing" for every field
    dec = hp.Decoder()
    assert dec.decode(b"\x20\x40\x01a\x01b") == [(b"a", b"b")]
    block = b"\x40\x01a\x01b"
    assert dec.decode(block) == [(b"a", b"b")] and block in dec._blocks
    assert dec.decode(block) == [(b"a", b"b")] and not dec._dynamic
    assert dec.decode(b"\x3f\xe1\x1f") == []  # size update to 4096: the same bytes now add an entry
    assert dec.decode(block) == [(b"a", b"b")] and list(dec._dynamic) == [(b"a", b"b")]
    assert dec.decode(b"\xbe") == [(b"a", b"b")]


def test_decoder_limits_and_malformed_blocks():
    big = hpack.Encoder().encode([(b"x", b"a" * 3000)] * 3)
    with pytest.raises(hpack.OversizedHeaderListError):
        hp.Decoder(max_header_list_size=5000).decode(big)
    # an indexed field repeated: stops after the limit, never builds the expanded list
    dec = hp.Decoder(max_header_list_size=10000)
    dec.decode(hpack.Encoder().encode([(b"x", b"a" * 3000)]))
    with pytest.raises(hpack.OversizedHeaderListError):
        dec.decode(b"\xbe" * 100_000)
    # a remembered block is checked against a limit lowered since
    dec = hp.Decoder()
    block = b"\x00\x01x\x10" + b"v" * 16
    assert dec.decode(block) == [(b"x", b"v" * 16)]
    dec.max_header_list_size = 40
    with pytest.raises(hpack.OversizedHeaderListError):
        dec.decode(block)
    for bad in (b"\x80",  # index 0
                b"\xbe",  # empty dynamic table
                b"\xff\xff\xff\xff\xff\xff\xff\x01",  # an integer beyond 5 continuation bytes
                b"\x00\x05ab",  # truncated name
                b"\x00\x01a\x85ab",  # truncated value
                b"\x00\x01a\x81\x00",  # invalid Huffman (EOS padding of zeros)
                b"\x82\x20",  # table size update after a field
                b"\x3f\xe2\x1f"):  # table size update above the allowed 4096
        with pytest.raises(hpack.HPACKDecodingError):
            hp.Decoder().decode(bad)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=120), min_size=1, max_size=4), st.integers(min_value=0, max_value=4096))
def test_arbitrary_blocks_decode_or_raise_an_hpack_error_and_stay_bounded(blocks, limit):
    """The parser invariant: any bytes decode into a bounded header list or raise HPACK's error
    (which h2 turns into COMPRESSION_ERROR); nothing else escapes, for a fresh or a used table."""
    dec = hp.Decoder(max_header_list_size=limit)
    for block in blocks:
        try:
            out = dec.decode(block)
        except hpack.HPACKError:
            continue
        assert sum(len(n) + len(v) + 32 for n, v in out) <= limit
        assert dec.header_table_size <= 4096
