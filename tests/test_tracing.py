"""nodeagent/tracing.py: propagation (W3C, B3), sampling, span records, header edits. No I/O."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.state import ConfigObject, NodeSnapshot, Workload
from nodeagent.tracing import (
    B3Format,
    Incoming,
    Peer,
    Sampler,
    SpanContext,
    SpanKind,
    SpanResource,
    Tracer,
    extract,
    inject,
    parse_b3_multi,
    parse_b3_single,
    parse_otlp_endpoint,
    parse_tracestate,
    parse_traceparent,
    resource_for,
    tracing_config,
    tracing_config_of,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
PARENT = "a3ce929d0e0e4736"
TP = f"00-{TRACE}-{SPAN}-01".encode()


def hx(s: str) -> bytes:
    return bytes.fromhex(s)


def header(headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


# ---------------------------------------------------------------- W3C traceparent

def test_the_specs_example_parses():
    inc = parse_traceparent(TP)
    assert inc == Incoming(hx(TRACE), hx(SPAN), True)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00".encode()).sampled is False
    # only the sampled bit is read
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-03".encode()).sampled is True
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-02".encode()).sampled is False


@pytest.mark.parametrize("value", [
    f"00-{TRACE.upper()}-{SPAN}-01",             # uppercase hex
    f"00-{TRACE}-{SPAN.upper()}-01",
    f"00-{TRACE}-{SPAN}-0A",
    f"00-{TRACE[:-1]}-{SPAN}-01",                # lengths
    f"00-{TRACE}0-{SPAN}-01",
    f"00-{TRACE}-{SPAN[:-1]}-01",
    f"00-{TRACE}-{SPAN}-1",
    f"0-{TRACE}-{SPAN}-01",
    f"00-{'0' * 32}-{SPAN}-01",                  # all-zero ids
    f"00-{TRACE}-{'0' * 16}-01",
    f"ff-{TRACE}-{SPAN}-01",                     # forbidden version
    f"00-{TRACE}-{SPAN}-01-extra",               # version 00 is exactly 55 characters
    f"00-{TRACE}-{SPAN}-01 ",
    f"00_{TRACE}-{SPAN}-01",
    f"00-{TRACE}-{SPAN}",
    f"zz-{TRACE}-{SPAN}-01",
    f"01-{TRACE}-{SPAN}-01x",                    # a future version: flags end or a dash follows
    f"01-{TRACE}-{SPAN}-0",                      # shorter than 55
    "",
])
def test_invalid_traceparent_is_absent(value):
    assert parse_traceparent(value.encode()) is None


def test_a_future_version_is_parsed_forward_and_re_emitted_as_00():
    for value in (f"01-{TRACE}-{SPAN}-01", f"cc-{TRACE}-{SPAN}-01-what-ever", f"01-{TRACE}-{SPAN}-00-"):
        inc = parse_traceparent(value.encode())
        assert inc is not None and inc.trace_id == hx(TRACE) and inc.span_id == hx(SPAN), value
    started = Tracer(Sampler(100), random.Random(1)).start(
        SpanKind.CLIENT, [(b"traceparent", f"cc-{TRACE}-{SPAN}-01-x".encode())], 0, resource=SpanResource())
    assert header(started.edits.add, b"traceparent")[0].startswith(f"00-{TRACE}-".encode())


def test_a_repeated_traceparent_restarts_the_trace():
    assert extract([(b"traceparent", TP), (b"traceparent", TP)]) is None


# ---------------------------------------------------------------- tracestate

def test_tracestate_is_kept_as_received_when_valid():
    assert parse_tracestate([b"congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"]) == b"congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"
    # several headers are one list, combined with commas
    assert parse_tracestate([b"a=1", b"b=2"]) == b"a=1,b=2"
    assert parse_tracestate([b"a=1,,b=2"]) == b"a=1,,b=2"   # empty list-members are allowed
    assert parse_tracestate([b"tenant@vendor=x", b"k*/_-9=v v"]) is not None
    assert parse_tracestate([b""]) == b""


@pytest.mark.parametrize("value", [
    b"a=1,a=2",                              # duplicate keys
    b"A=1",                                  # uppercase key
    b"1a=1",                                 # a simple key starts with a letter
    b"a=",                                   # empty value
    b"a=1 ",                                 # trailing space inside the member is stripped: fine...
    b"a=x=y",                                # '=' in a value
    b"a@b@c=1",
    b"t@" + b"v" * 15 + b"=1",               # system id longer than 14
    b"a=\x7f",
    b"k" * 257 + b"=1",                      # key longer than 256
])
def test_invalid_tracestate_is_dropped(value):
    if value == b"a=1 ":
        assert parse_tracestate([value]) == value    # OWS around a member is allowed
        return
    assert parse_tracestate([value]) is None


def test_tracestate_bounds():
    members = [f"k{i}=v" for i in range(32)]
    assert parse_tracestate([",".join(members).encode()]) is not None
    assert parse_tracestate([",".join(members + ["k32=v"]).encode()]) is None
    assert parse_tracestate([b"a=" + b"x" * 200, b"b=" + b"x" * 200]) is not None
    assert parse_tracestate([b"a=" + b"x" * 255, b"b=" + b"x" * 255]) is None    # 515 characters


def test_tracestate_travels_only_with_a_valid_traceparent():
    inc = extract([(b"traceparent", TP), (b"tracestate", b"congo=t61rcWkgMzE"), (b"tracestate", b"rojo=1")])
    assert inc.tracestate == b"congo=t61rcWkgMzE,rojo=1"
    assert extract([(b"traceparent", TP), (b"tracestate", b"bad key=1")]).tracestate == b""
    assert extract([(b"tracestate", b"congo=t61rcWkgMzE")]) is None
    # with B3 only, tracestate is not read either
    inc = extract([(b"b3", f"{TRACE}-{SPAN}-1".encode()), (b"tracestate", b"congo=1")])
    assert inc.tracestate == b""


# ---------------------------------------------------------------- B3

def test_b3_multi():
    inc = parse_b3_multi(TRACE.encode(), SPAN.encode(), PARENT.encode(), b"1", None)
    assert (inc.trace_id, inc.span_id, inc.sampled, inc.debug, inc.b3_narrow) == (hx(TRACE), hx(SPAN), True, False, False)
    narrow = parse_b3_multi(PARENT.encode(), SPAN.encode(), None, b"0", None)
    assert narrow.trace_id == bytes(8) + hx(PARENT) and narrow.b3_narrow and narrow.sampled is False
    assert parse_b3_multi(TRACE.encode(), SPAN.encode(), None, None, None).sampled is None   # deferred
    assert parse_b3_multi(TRACE.encode(), SPAN.encode(), None, b"true", None).sampled is True
    assert parse_b3_multi(TRACE.encode(), SPAN.encode(), None, b"False", None).sampled is False
    debug = parse_b3_multi(TRACE.encode(), SPAN.encode(), None, None, b"1")
    assert debug.debug and debug.sampled is True
    assert parse_b3_multi(TRACE.encode(), SPAN.encode(), None, None, b"0").debug is False   # other flags ignored
    # a decision alone
    assert parse_b3_multi(None, None, None, b"0", None) == Incoming(None, None, False, b3=B3Format.MULTI)


@pytest.mark.parametrize("args", [
    (TRACE.upper(), SPAN, None, "1", None),
    (TRACE, None, None, "1", None),          # span id missing
    (None, SPAN, None, "1", None),
    (TRACE[:20], SPAN, None, "1", None),
    (TRACE, SPAN, "xyz", "1", None),
    (TRACE, SPAN, None, "yes", None),
    ("0" * 32, SPAN, None, "1", None),
    (TRACE, "0" * 16, None, "1", None),
    (TRACE, SPAN, "0" * 16, "1", None),
    (None, None, None, None, None),
])
def test_invalid_b3_multi_is_absent(args):
    assert parse_b3_multi(*(a.encode() if a is not None else None for a in args)) is None


def test_b3_single():
    inc = parse_b3_single(f"{TRACE}-{SPAN}-1-{PARENT}".encode())
    assert (inc.trace_id, inc.span_id, inc.sampled, inc.b3) == (hx(TRACE), hx(SPAN), True, B3Format.SINGLE)
    assert parse_b3_single(f"{TRACE}-{SPAN}".encode()).sampled is None
    assert parse_b3_single(f"{PARENT}-{SPAN}-0".encode()).b3_narrow
    d = parse_b3_single(f"{TRACE}-{SPAN}-d".encode())
    assert d.debug and d.sampled
    assert parse_b3_single(b"0") == Incoming(None, None, False, b3=B3Format.SINGLE)
    assert parse_b3_single(b"d").debug
    for bad in (f"{TRACE}-{SPAN}-{PARENT}", f"{TRACE}-{SPAN}-2", f"{TRACE}-{SPAN}-1-", f"{TRACE}",
                f"{TRACE.upper()}-{SPAN}-1", "true", "", f"{TRACE}-{SPAN}-1-{PARENT}-x"):
        assert parse_b3_single(bad.encode()) is None, bad


def test_b3_single_wins_over_multi_and_falls_back_to_it_when_invalid():
    other = "1" * 32
    headers = [(b"b3", f"{TRACE}-{SPAN}-1".encode()), (b"x-b3-traceid", other.encode()),
               (b"x-b3-spanid", SPAN.encode()), (b"x-b3-sampled", b"0")]
    inc = extract(headers)
    assert inc.trace_id == hx(TRACE) and inc.sampled is True and inc.b3 == B3Format.SINGLE | B3Format.MULTI
    inc = extract([(b"b3", b"garbage")] + headers[1:])
    assert inc.trace_id == hx(other) and inc.sampled is False and inc.b3 == B3Format.MULTI


def test_traceparent_wins_over_b3():
    other = "1" * 32
    inc = extract([(b"x-b3-traceid", other.encode()), (b"x-b3-spanid", PARENT.encode()), (b"x-b3-sampled", b"0"),
                   (b"traceparent", TP)])
    assert (inc.trace_id, inc.span_id, inc.sampled) == (hx(TRACE), hx(SPAN), True)
    assert inc.b3 == B3Format.MULTI   # the B3 format is still written downstream, with the W3C ids
    # an invalid traceparent leaves the B3 context
    inc = extract([(b"traceparent", TP.upper()), (b"b3", f"{other}-{PARENT}-0".encode())])
    assert inc.trace_id == hx(other) and inc.sampled is False


# ---------------------------------------------------------------- fuzz: bytes in, a context or None out

_NAMES = st.sampled_from([b"traceparent", b"tracestate", b"b3", b"x-b3-traceid", b"x-b3-spanid",
                          b"x-b3-parentspanid", b"x-b3-sampled", b"x-b3-flags", b"other"])
_HEXISH = st.binary(max_size=80) | st.text("0123456789abcdefABCDEF-dxz ", max_size=80).map(str.encode)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.tuples(_NAMES, _HEXISH), max_size=8))
def test_any_headers_give_a_context_or_none(headers):
    inc = extract(headers)
    assert inc is None or isinstance(inc, Incoming)
    if inc is not None and inc.trace_id is not None:
        assert len(inc.trace_id) == 16 and inc.trace_id != bytes(16)
        assert len(inc.span_id) == 8 and inc.span_id != bytes(8)
        # and what the tracer makes of it is well-formed
        started = Tracer(Sampler(50), random.Random(0)).start(SpanKind.SERVER, headers, 1, resource=SpanResource())
        assert extract(started.edits.apply(headers)).trace_id == inc.trace_id


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=120))
def test_parsers_never_raise(value):
    for result in (parse_traceparent(value), parse_b3_single(value), parse_b3_multi(value, value, value, value, value)):
        assert result is None or isinstance(result, Incoming)
    assert parse_tracestate([value]) is None or isinstance(parse_tracestate([value]), bytes)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=16, max_size=16).filter(any), st.binary(min_size=8, max_size=8).filter(any),
       st.booleans(), st.booleans(), st.sampled_from([0, 1, 2, 3]))
def test_inject_then_extract_round_trips(trace_id, span_id, sampled, debug, b3):
    ctx = SpanContext(trace_id, span_id, sampled or debug, debug)
    edits = inject(ctx, parent_span_id=b"\x01" * 8, b3=b3)
    inc = extract(edits.apply([]))
    assert (inc.trace_id, inc.span_id, inc.sampled) == (trace_id, span_id, sampled or debug)
    if b3:
        b3_only = [h for h in edits.add if h[0] != b"traceparent"]
        got = extract(b3_only)
        assert (got.trace_id, got.span_id, got.debug) == (trace_id, span_id, debug)


# ---------------------------------------------------------------- sampling

def test_the_parents_decision_is_honoured():
    never, always = Sampler(0), Sampler(100)
    assert never.should_sample(True, hx(TRACE)) and not always.should_sample(False, hx(TRACE))


def test_the_ratio_is_opentelemetrys_trace_id_ratio_based():
    half = Sampler(50)
    # OTel: bound = round(rate * 2**64); sampled when the low 64 bits are below it
    assert half.should_sample(None, bytes(8) + (2 ** 63 - 1).to_bytes(8, "big"))
    assert not half.should_sample(None, bytes(8) + (2 ** 63).to_bytes(8, "big"))
    assert half.should_sample(None, b"\xff" * 8 + (2 ** 63 - 1).to_bytes(8, "big"))   # high bits do not count
    assert Sampler(100).should_sample(None, b"\xff" * 16)
    assert not Sampler(0).should_sample(None, bytes(15) + b"\x01")
    rand = random.Random(7)
    ids = [rand.getrandbits(128).to_bytes(16, "big") for _ in range(20000)]
    share = sum(Sampler(10).should_sample(None, t) for t in ids) / len(ids)
    assert 0.09 < share < 0.11
    with pytest.raises(ValueError):
        Sampler(100.5)


def test_two_proxies_agree_on_a_deferred_decision():
    source, destination = Tracer(Sampler(30), random.Random(1)), Tracer(Sampler(30), random.Random(2))
    agreed = 0
    rand = random.Random(3)
    for _ in range(500):
        trace = rand.getrandbits(128).to_bytes(16, "big").hex()
        deferred = [(b"b3", f"{trace}-{SPAN}".encode())]       # B3 without a decision
        a = source.start(SpanKind.CLIENT, deferred, 0, resource=SpanResource())
        b = destination.start(SpanKind.SERVER, deferred, 0, resource=SpanResource())
        assert a.context.sampled == b.context.sampled
        agreed += a.context.sampled
    assert 100 < agreed < 200


# ---------------------------------------------------------------- the tracer: decisions and header edits

APP = Workload("productpage-v1", "shop", "node1", "198.18.1.5", labels=(("app", "productpage"), ("version", "v1")))
REVIEWS = Workload("reviews-v2", "shop", "node2", "198.18.2.7",
                   labels=(("service.istio.io/canonical-name", "reviews"), ("version", "v2")))


def test_a_request_without_context_starts_a_trace():
    tracer = Tracer(Sampler(100), random.Random(5))
    headers = [(b":authority", b"reviews:9080"), (b"x-b3-sampled", b"maybe")]   # invalid B3: removed
    started = tracer.start(SpanKind.CLIENT, headers, 10, resource=resource_for(APP, "node1"))
    assert started.parent_span_id == b"" and started.span.parent_span_id == b""
    out = started.edits.apply(headers)
    assert header(out, b"x-b3-sampled") == [] and header(out, b":authority") == [b"reviews:9080"]
    assert header(out, b"traceparent") == [started.context.traceparent]
    assert extract(out).trace_id == started.context.trace_id == started.span.trace_id


def test_an_unsampled_request_still_propagates_the_decision():
    started = Tracer(Sampler(0), random.Random(5)).start(SpanKind.CLIENT, [], 0, resource=SpanResource())
    assert started.span is None
    assert header(started.edits.add, b"traceparent")[0].endswith(b"-00")
    # a B3 sampling decision alone: a new trace that keeps it
    started = Tracer(Sampler(100), random.Random(5)).start(SpanKind.CLIENT, [(b"b3", b"0")], 0,
                                                           resource=SpanResource())
    assert started.span is None and header(started.edits.add, b"b3")[0].endswith(b"-0")


def test_a_child_of_the_incoming_context_with_b3_mirrored():
    tracer = Tracer(Sampler(0), random.Random(9))
    headers = [(b"x-b3-traceid", PARENT.encode()), (b"x-b3-spanid", SPAN.encode()), (b"x-b3-flags", b"1"),
               (b"x-b3-sampled", b"1")]
    started = tracer.start(SpanKind.CLIENT, headers, 0, resource=SpanResource())
    assert started.span is not None                         # debug forces sampling at 0 %
    out = started.edits.apply(headers)
    assert header(out, b"x-b3-traceid") == [PARENT.encode()]        # 64-bit stays 64-bit
    assert header(out, b"x-b3-spanid") == [started.context.span_id.hex().encode()]
    assert header(out, b"x-b3-parentspanid") == [SPAN.encode()]
    assert header(out, b"x-b3-flags") == [b"1"] and header(out, b"x-b3-sampled") == []
    assert header(out, b"b3") == []
    assert header(out, b"traceparent") == [f"00-{'0' * 16}{PARENT}-{started.context.span_id.hex()}-01".encode()]


def test_tracestate_is_forwarded_and_b3_single_rewritten():
    tracer = Tracer(Sampler(100), random.Random(9))
    headers = [(b"traceparent", TP), (b"tracestate", b"congo=t61rcWkgMzE"), (b"b3", f"{TRACE}-{SPAN}-1".encode())]
    started = tracer.start(SpanKind.SERVER, headers, 0, resource=SpanResource())
    out = started.edits.apply(headers)
    span_hex = started.context.span_id.hex()
    assert header(out, b"tracestate") == [b"congo=t61rcWkgMzE"]
    assert header(out, b"b3") == [f"{TRACE}-{span_hex}-1-{SPAN}".encode()]
    assert started.span.tracestate == b"congo=t61rcWkgMzE" and started.span.parent_span_id == hx(SPAN)


def test_client_and_server_spans_across_two_proxies():
    """The app's span -> the source proxy's CLIENT span -> the destination's SERVER span -> the app."""
    source, destination = Tracer(Sampler(1), random.Random(1)), Tracer(Sampler(1), random.Random(2))
    app_headers = [(b":authority", b"reviews.shop:9080"), (b"traceparent", TP)]
    client = source.start(SpanKind.CLIENT, app_headers, 100, resource=resource_for(APP, "node1"))
    on_the_wire = client.edits.apply(app_headers)
    server = destination.start(SpanKind.SERVER, on_the_wire, 200, resource=resource_for(REVIEWS, "node2"))
    to_the_pod = server.edits.apply(on_the_wire)
    assert client.span.trace_id == server.span.trace_id == hx(TRACE)
    assert client.span.parent_span_id == hx(SPAN)
    assert server.span.parent_span_id == client.span.span_id
    assert extract(to_the_pod).span_id == server.span.span_id
    assert (client.span.kind, server.span.kind) == (SpanKind.CLIENT, SpanKind.SERVER)


# ---------------------------------------------------------------- spans

def _span(kind=SpanKind.CLIENT, **kw):
    defaults = dict(method=b"GET", path=b"/reviews/1?token=secret", authority=b"reviews.shop:9080",
                    protocol="1.1", request_id=b"rid-1")
    defaults.update(kw)
    started = Tracer(Sampler(100), random.Random(1)).start(kind, [], 1_000, resource=resource_for(APP, "node1"),
                                                           **defaults)
    return started.span


def test_span_attributes_follow_the_semantic_conventions():
    span = _span().finish(5_000, 200, upstream_cluster="outbound|9080||reviews.shop.svc.cluster.local",
                          service_host="reviews.shop.svc.cluster.local", service_port=9080, peer=Peer.of(REVIEWS))
    attrs = dict(span.attributes())
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/reviews/1"                   # never the query
    assert attrs["server.address"] == "reviews.shop" and attrs["server.port"] == 9080
    assert attrs["http.response.status_code"] == 200
    assert attrs["network.protocol.version"] == "1.1"
    assert attrs["upstream_cluster"] == "outbound|9080||reviews.shop.svc.cluster.local"
    assert attrs["hostmesh.response_flags"] == "-" and attrs["hostmesh.node"] == "node1"
    assert attrs["guid:x-request-id"] == "rid-1"
    assert (attrs["istio.canonical_service"], attrs["istio.canonical_revision"], attrs["istio.namespace"]) == \
        ("productpage", "v1", "shop")
    assert (attrs["hostmesh.peer.workload"], attrs["hostmesh.peer.canonical_service"]) == ("reviews-v2", "reviews")
    assert span.name() == "reviews.shop.svc.cluster.local:9080/*"   # Istio's span name
    assert (span.start_ns, span.end_ns) == (1_000, 5_000)
    assert span.status() == (0, "")


def test_span_names_and_odd_requests():
    assert _span(authority=b"example.com").finish(2_000, 200).name() == "example.com/*"
    assert _span(authority=b"[::1]:8080").finish(2_000, 200).name() == "[::1]:8080/*"
    grpc = _span(path=b"/helloworld.Greeter/SayHello", protocol="2", grpc=True).finish(2_000, 200, grpc_status=0)
    assert grpc.name() == "helloworld.Greeter/SayHello"
    attrs = dict(grpc.attributes())
    assert (attrs["rpc.system"], attrs["rpc.service"], attrs["rpc.method"], attrs["rpc.grpc.status_code"]) == \
        ("grpc", "helloworld.Greeter", "SayHello", 0)
    weird = dict(_span(method=b"PROPFIND", path=b"/" + b"x" * 5000).finish(0, 0).attributes())
    assert weird["http.request.method"] == "_OTHER" and weird["http.request.method_original"] == "PROPFIND"
    assert len(weird["url.path"]) == 1024 and "http.response.status_code" not in weird
    assert len(_span(authority=b"a" * 1000).finish(1, 200).name()) <= 256


def test_span_status():
    assert _span().finish(2, 503, response_flags="UH").status() == (2, "HTTP 503 (UH)")
    assert _span().finish(2, 0, response_flags="DC").status() == (2, "no response (DC)")
    assert _span().finish(2, 404).status() == (0, "")
    # gRPC: any error on a client span, the server's own errors on a server span
    assert _span(grpc=True).finish(2, 200, grpc_status=5).status()[0] == 2
    assert _span(SpanKind.SERVER, grpc=True).finish(2, 200, grpc_status=5).status()[0] == 0
    assert _span(SpanKind.SERVER, grpc=True).finish(2, 200, grpc_status=14).status()[0] == 2


def test_resources():
    assert resource_for(APP, "node1") == SpanResource("productpage.shop", "shop", "productpage-v1", "productpage",
                                                      "v1", "node1")
    assert resource_for(APP, "node1") is resource_for(APP, "node1")    # memoized on the workload
    assert dict(resource_for(REVIEWS, "n2").attributes())["service.name"] == "reviews.shop"
    assert dict(resource_for(None, "node1").attributes()) == {"service.name": "hostmesh-agent", "host.name": "node1"}


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("text, want", [
    ("http://otel-collector.observability:4318", ("otel-collector.observability", 4318, "/v1/traces")),
    ("http://10.0.0.5", ("10.0.0.5", 4318, "/v1/traces")),
    ("http://127.0.0.1:9/", ("127.0.0.1", 9, "/v1/traces")),
    ("http://collector:4318/otlp/v1/traces", ("collector", 4318, "/otlp/v1/traces")),
])
def test_otlp_endpoints(text, want):
    assert tuple(parse_otlp_endpoint(text)) == want


@pytest.mark.parametrize("text, words", [
    ("https://collector:4318", "https:// is not supported yet"),
    ("collector:4318", "not an http:// URL"),
    ("grpc://collector:4317", "not an http:// URL"),
    ("http://collector:0", "not a valid port"),
    ("http://collector:70000", "not a valid port"),
    ("http://collector:43a8", "not a valid port"),
    ("http://:4318", "has no host"),
    ("http://[::1]:4318", "IPv6"),
    ("http://user@collector:4318", "user information"),
    ("http://collector:4318/v1/traces?x=1", "query"),
    ("http://Collector:4318", "lowercase DNS name"),
    ("http://300.1.1.1:4318", "not an IPv4 address"),
    ("http://collector_1:4318", "lowercase DNS name"),
    ("http://collector:4318/a b", "not a valid URL path"),
])
def test_bad_otlp_endpoints(text, words):
    with pytest.raises(ValueError, match=words.replace("?", r"\?")):
        parse_otlp_endpoint(text)


def test_tracing_config_from_mesh_config():
    spec = {"tracing": {"samplingPercentage": 12.5, "otlp": {"endpoint": "http://c:4318", "timeout": "500ms"}}}
    cfg = tracing_config(spec)
    assert (cfg.sampling_percentage, cfg.endpoint.url, cfg.timeout_s) == (12.5, "http://c:4318/v1/traces", 0.5)
    assert tracing_config({"tracing": {"otlp": {"endpoint": "http://c"}}}).sampling_percentage == 1.0
    assert tracing_config({}) is None
    snap = NodeSnapshot("n1", config=(ConfigObject("MeshConfig", "mesh", "default", json.dumps(spec)),))
    assert tracing_config_of(snap) == cfg
    broken = NodeSnapshot("n1", config=(ConfigObject("MeshConfig", "mesh", "default",
                                                     json.dumps({"tracing": {"otlp": {"endpoint": "ftp://x"}}})),))
    assert tracing_config_of(broken) is None and tracing_config_of(NodeSnapshot("n1")) is None


# ---------------------------------------------------------------- the control plane's MeshConfig tracing

MESH_CONFIG = """\
apiVersion: hostmesh.io/v1alpha1
kind: MeshConfig
metadata:
  name: default
  namespace: mesh
spec:
  tracing:
{tracing}
"""


def _mesh_errors(tracing: str) -> list[str]:
    from controlplane.model import load_texts
    result = load_texts({"mesh.yaml": MESH_CONFIG.format(tracing=tracing)})
    return [str(e) for e in result.errors]


def test_mesh_config_tracing_is_refused_until_the_drivers_create_spans():
    from controlplane.model import kinds
    assert kinds.MESH_TRACING_SUPPORTED is False
    errs = _mesh_errors("    samplingPercentage: 10\n    otlp: {endpoint: 'http://otel-collector:4318'}")
    assert len(errs) == 1 and "spec.tracing: not supported yet: the agents' HTTP proxies do not create" in errs[0]
    # the value is still checked: every other mistake comes with the refusal
    errs = _mesh_errors("    samplingPercentage: 101\n    otlp: {endpoint: 'https://c:4318', timeout: 1m}")
    assert any("spec.tracing.samplingPercentage: 101 is not between 0 and 100" in e for e in errs), errs
    assert any("spec.tracing.otlp.endpoint: https:// is not supported yet" in e for e in errs), errs
    assert any('spec.tracing.otlp.timeout: "1m" is longer than the maximum 30s' in e for e in errs), errs
    assert any("spec.tracing: not supported yet" in e for e in errs), errs


def _check_tracing(value):
    from controlplane.model.fields import INVALID, Problems
    from controlplane.model.kinds import MESH_TRACING
    problems = Problems()
    out = MESH_TRACING.check(value, ("spec", "tracing"), problems)
    return (None if out is INVALID else out), [f"{'.'.join(map(str, p))}: {m}" for p, m in problems.items]


def test_the_tracing_schema_the_flip_will_accept():
    """What MESH_TRACING_SUPPORTED = True will let through: defaults filled, values the agent reads."""
    out, problems = _check_tracing({"otlp": {"endpoint": "http://10.0.0.5"}})
    assert problems == [] and out == {"samplingPercentage": 1, "otlp": {"endpoint": "http://10.0.0.5", "timeout": "2s"}}
    cfg = tracing_config({"tracing": out})
    assert (cfg.sampling_percentage, cfg.endpoint, cfg.timeout_s) == (1.0, ("10.0.0.5", 4318, "/v1/traces"), 2.0)
    assert _check_tracing({"samplingPercentage": 0.5, "otlp": {"endpoint": "http://c:1/x", "timeout": "250ms"}})[1] == []
    for value, message in [
        ({}, "spec.tracing.otlp: required field is missing (where spans are sent"),
        ({"otlp": {}}, "spec.tracing.otlp.endpoint: required field is missing"),
        ({"otlp": {"endpoint": "c:4318"}}, 'spec.tracing.otlp.endpoint: "c:4318" is not an http:// URL'),
        ({"otlp": {"endpoint": "http://c", "timeout": "0s"}}, 'spec.tracing.otlp.timeout: "0s" is shorter than'),
        ({"otlp": {"endpoint": "http://c", "timeout": "31s"}}, "is longer than the maximum 30s"),
        ({"samplingPercentage": "5", "otlp": {"endpoint": "http://c"}}, "spec.tracing.samplingPercentage: must be a number"),
        ({"otlp": {"endpoint": "http://c", "tls": {}}}, "spec.tracing.otlp.tls: unknown field"),
    ]:
        out, problems = _check_tracing(value)
        assert out is None and any(message in p for p in problems), (value, problems)
