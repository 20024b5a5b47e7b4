"""The lab's test workload (meshlab.testapp): unit tests of the pure logic, then the real
app as a subprocess on 127.0.0.1 exercised with curl, nghttp, http.client, raw sockets
and a grpcio client. No privileges needed."""
from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshlab.testapp import behaviour as bh
from tests.generated_code import without_version_stamps
from meshlab.testapp.behaviour import Behaviour, BehaviourError, parse_behaviour

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


# =========================================================================== unit tests
class TestParseBehaviour:
    def test_empty_query_is_the_default(self):
        assert parse_behaviour("") == Behaviour()
        assert parse_behaviour("foo=bar&x") == Behaviour()          # unknown params ignored

    def test_combined(self):
        b = parse_behaviour("status=503&delay=0.25&size=1024&reset=0&header=X-A:1&header=x-b:%20two%20")
        assert b == Behaviour(status=503, delay=0.25, size=1024, reset=False,
                              headers=(("X-A", "1"), ("x-b", "two")))

    @pytest.mark.parametrize("text,expected", [
        ("0", 0), ("1024", 1024), ("64k", 65536), ("10M", 10 << 20), ("1G", 1 << 30),
        ("2KiB", 2048), ("3mib", 3 << 20), ("10G", 10 << 30),
    ])
    def test_size_units(self, text, expected):
        assert parse_behaviour(f"size={text}").size == expected

    def test_status_range_and_informational(self):
        assert parse_behaviour("status=599").status == 599
        assert parse_behaviour("status=200").status == 200
        b = parse_behaviour("status=103")
        assert (b.status, b.informational) == (200, 103)

    def test_reset_values(self):
        assert parse_behaviour("reset=1").reset is True
        assert parse_behaviour("reset=true").reset is True
        assert parse_behaviour("reset=0").reset is False

    def test_header_value_may_contain_colons(self):
        assert parse_behaviour("header=Location:http://x:80/y").headers == (("Location", "http://x:80/y"),)

    @pytest.mark.parametrize("query,fragment", [
        ("status=99", "from 100 to 599"),
        ("status=600", "from 100 to 599"),
        ("status=abc", "expected an integer"),
        ("status=2_00", "expected an integer"),
        ("status=", "expected an integer"),
        ("status=101", "switching protocols"),
        ("delay=-1", "expected seconds"),
        ("delay=61", "from 0 to 60"),
        ("delay=nan", "expected seconds"),
        ("delay=inf", "expected seconds"),
        ("delay=1e3", "expected seconds"),
        ("size=-5", "byte count"),
        ("size=11G", "at most"),
        ("size=1T", "byte count"),
        ("size=" + "9" * 5000, "byte count"),
        ("reset=maybe", "expected 1 or 0"),
        ("header=NoColon", "Name:Value"),
        ("header=Bad Name:x", "not a valid header name"),
        ("header=:x", "not a valid header name"),
        ("header=Content-Length:5", "cannot be set"),
        ("header=transfer-encoding:chunked", "cannot be set"),
        ("header=X:a%0d%0ab", "printable ASCII"),
        ("header=X:%C3%A9", "printable ASCII"),
        ("status=200&status=201", "more than once"),
        ("delay=1&delay=1", "more than once"),
        ("&".join(["header=X:1"] * 65), "too many"),
    ])
    def test_invalid(self, query, fragment):
        with pytest.raises(BehaviourError) as err:
            parse_behaviour(query)
        assert fragment in str(err.value)
        assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("target,expected", [
    ("/", ("/", "")),
    ("/a/b?x=1&y=2", ("/a/b", "x=1&y=2")),
    ("/a?x=1#frag", ("/a", "x=1")),
    ("http://host:80/p?q", ("/p", "q")),
    ("http://host?q", ("/", "q")),
    ("http://host", ("/", "")),
    ("*", ("*", "")),
    ("example.com:443", ("example.com:443", "")),
])
def test_split_target(target, expected):
    assert bh.split_target(target) == expected


def test_route_and_join_headers():
    assert bh.route("/echo") == bh.ECHO
    assert bh.route("/healthz") == bh.HEALTHZ
    assert bh.route("/echo/x") == bh.route("/") == bh.DEFAULT
    assert bh.join_headers([("X-A", "1"), ("x-a", "2"), ("B", "3")]) == {"x-a": "1, 2", "b": "3"}


def test_describe_shape():
    doc = json.loads(bh.describe(pod="p", node="n", protocol="HTTP/2", method="GET", path="/x",
                                 query="a=1", host="h", headers={"a": "b"},
                                 source=("10.0.0.1", 1234), destination=("10.0.0.2", 80, 0, 0),
                                 body_bytes=7))
    assert doc == {"pod": "p", "node": "n", "protocol": "HTTP/2", "method": "GET", "path": "/x",
                   "query": "a=1", "host": "h", "headers": {"a": "b"},
                   "source": {"address": "10.0.0.1", "port": 1234},
                   "destination": {"address": "10.0.0.2", "port": 80}, "body_bytes": 7}


# --------------------------------------------------------------------------- protocols, no sockets
class FakeTransport(asyncio.Transport):
    """Just enough transport to drive the HTTP protocols without sockets."""

    def __init__(self):
        super().__init__()
        self.out = bytearray()
        self.closed = self.aborted = self.paused = False
        self.protocol = None

    def write(self, data):
        assert not self.closed, "write after close"
        self.out += data

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = self.aborted = True

    def is_closing(self):
        return self.closed

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_extra_info(self, name, default=None):
        return {"peername": ("10.1.2.3", 5555), "sockname": ("10.9.9.9", 8080)}.get(name, default)

    def set_protocol(self, protocol):
        self.protocol = protocol

    def get_protocol(self):
        return self.protocol


async def _feed(data: bytes, split: int) -> FakeTransport:
    from meshlab.testapp.httpserver import HTTPApp
    app = HTTPApp("pod-x", "node-y")
    t = FakeTransport()
    t.protocol = app.protocol_factory()
    t.protocol.connection_made(t)
    for i in range(0, len(data), split):
        for _ in range(1000):               # a paused transport delivers nothing
            if not t.paused:
                break
            await asyncio.sleep(0)
        assert not t.paused, "reading never resumed"
        t.protocol.data_received(data[i:i + split])
    for _ in range(10):
        await asyncio.sleep(0)
    return t


def _responses(raw: bytes) -> list[tuple[int, dict, bytes]]:
    """Decode HTTP/1.1 responses with httptools (handles chunked framing)."""
    import httptools
    out = []

    class P:
        def on_message_begin(self):
            out.append([0, {}, bytearray()])

        def on_header(self, n, v):
            out[-1][1][n.decode().lower()] = v.decode()

        def on_headers_complete(self):
            out[-1][0] = parser.get_status_code()

        def on_body(self, b):
            out[-1][2] += b

    parser = httptools.HttpResponseParser(P())
    parser.feed_data(raw)
    return [(s, h, bytes(b)) for s, h, b in out]


H1_PIPELINE = (
    b"POST /a?x=1&header=X-T:1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nworld\r\n3\r\n!!!\r\n0\r\n\r\n"
    b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nabcd"
    b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n"
    b"GET /bad?status=1000 HTTP/1.1\r\nHost: h\r\n\r\n"
    b"GET /?size=300000 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    b"GET /never HTTP/1.1\r\nHost: h\r\n\r\n"
)


@pytest.mark.parametrize("split", [len(H1_PIPELINE), 1, 2, 7, 64, 1000])
def test_h1_pipeline_any_split(split):
    t = asyncio.run(_feed(H1_PIPELINE, split))
    resps = _responses(bytes(t.out))
    assert [r[0] for r in resps] == [200, 200, 200, 200, 400, 200]
    doc = json.loads(resps[0][2])
    assert (doc["pod"], doc["node"], doc["path"], doc["query"], doc["body_bytes"]) == \
        ("pod-x", "node-y", "/a", "x=1&header=X-T:1", 5)
    assert doc["source"] == {"address": "10.1.2.3", "port": 5555}
    assert doc["destination"] == {"address": "10.9.9.9", "port": 8080}
    assert resps[0][1]["x-t"] == "1"
    assert resps[1][2] == b"world!!!" and resps[1][1]["transfer-encoding"] == "chunked"
    assert resps[2][2] == b"abcd" and resps[2][1]["content-length"] == "4"
    assert resps[3][2] == b"ok"
    assert "status" in json.loads(resps[4][2])["error"]
    assert len(resps[5][2]) == 300000
    assert t.closed and not t.aborted           # Connection: close honoured, /never ignored


def test_h1_reset_aborts():
    t = asyncio.run(_feed(b"GET /?reset=1 HTTP/1.1\r\nHost: h\r\n\r\n", 1000))
    assert t.aborted and t.out == b""


@pytest.mark.parametrize("split", [1, 5, 23, 24, 25, 4096])
def test_h2_detected_with_any_split(split):
    import h2.config
    import h2.connection
    import h2.events
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":path", "/p?q=2"), (":scheme", "http"),
                            (":authority", "svc")])
    client.send_data(1, b"12345", end_stream=True)
    client.send_headers(3, [(":method", "PUT"), (":path", "/echo"), (":scheme", "http"),
                            (":authority", "svc")])
    client.send_data(3, b"echo me", end_stream=True)
    t = asyncio.run(_feed(client.data_to_send(), split))
    bodies, statuses, ended = {1: b"", 3: b""}, {}, set()
    for ev in client.receive_data(bytes(t.out)):
        if isinstance(ev, h2.events.ResponseReceived):
            statuses[ev.stream_id] = dict(ev.headers)[b":status"]
        elif isinstance(ev, h2.events.DataReceived):
            bodies[ev.stream_id] += ev.data
        elif isinstance(ev, h2.events.StreamEnded):
            ended.add(ev.stream_id)
    assert statuses == {1: b"200", 3: b"200"} and ended == {1, 3}
    doc = json.loads(bodies[1])
    assert (doc["protocol"], doc["path"], doc["query"], doc["host"], doc["body_bytes"]) == \
        ("HTTP/2", "/p", "q=2", "svc", 5)
    assert bodies[3] == b"echo me"


def test_generated_grpc_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    from meshlab.testapp import gen_proto

    fresh = gen_proto.generate(tmp_path)
    for f in fresh:
        committed = REPO / "meshlab" / "testapp" / f.name
        assert without_version_stamps(committed.read_bytes()) == without_version_stamps(f.read_bytes()), (
            f"{committed} is stale: run `python -m meshlab.testapp.gen_proto`")


# =========================================================================== the app
class App:
    def __init__(self, proc: subprocess.Popen, info: dict, ready: Path, log: Path):
        self.proc, self.info, self.ready, self.log = proc, info, ready, log
        self.http_port = info["http_port"]
        self.grpc_port = info["grpc_port"]
        self.url = f"http://127.0.0.1:{self.http_port}"

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


def start_app(tmp: Path, *extra: str, pod="pod-a", node="node-1", http_port=0, grpc_port=0) -> App:
    ready = tmp / "ready.json"
    log = tmp / "app.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [PY, "-m", "meshlab.testapp", "--pod", pod, "--node", node, "--bind", "127.0.0.1",
             "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--ready-file", str(ready),
             *extra],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
    deadline = time.monotonic() + 20
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"testapp exited with {proc.returncode}: {log.read_text()}")
        if time.monotonic() > deadline:
            stop_app(proc)
            raise AssertionError(f"testapp not ready in time: {log.read_text()}")
        time.sleep(0.02)
    return App(proc, json.loads(ready.read_text()), ready, log)


def stop_app(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    a = start_app(tmp_path_factory.mktemp("testapp"))
    try:
        yield a
    finally:
        stop_app(a.proc)


def curl(*args: str, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                          check=check, timeout=30)


def curl_json(*args: str) -> dict:
    return json.loads(curl(*args).stdout)


def raw_exchange(port: int, data: bytes, timeout=5.0) -> bytes:
    """Send `data`, read until the server closes; returns everything received."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                return b"".join(chunks)
            chunks.append(b)


def split_responses(raw: bytes) -> list[tuple[str, dict, bytes]]:
    """Parse concatenated HTTP/1.1 responses that carry content-length."""
    out = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        n = int(headers.get("content-length", "0"))
        out.append((lines[0], headers, raw[:n]))
        raw = raw[n:]
    return out


# --------------------------------------------------------------------------- lifecycle
def test_ready_file(app):
    assert app.info["pod"] == "pod-a" and app.info["node"] == "node-1"
    assert app.info["pid"] == app.proc.pid
    assert 0 < app.http_port < 65536 and 0 < app.grpc_port < 65536
    assert not list(app.ready.parent.glob(".*.tmp"))        # written via temp file + rename


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_cleanly(tmp_path, sig):
    # fixed ports this time (the launcher's way of calling it)
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    a = start_app(tmp_path, http_port=ports[0], grpc_port=ports[1])
    try:
        assert (a.http_port, a.grpc_port) == tuple(ports)
        # an open download and gRPC calls in progress must not hold up the exit
        import grpc

        from meshlab.testapp import echo_pb2, echo_pb2_grpc
        conn = http.client.HTTPConnection("127.0.0.1", a.http_port, timeout=5)
        conn.request("GET", "/?size=10G")
        conn.getresponse()
        with grpc.insecure_channel(f"127.0.0.1:{a.grpc_port}") as ch:
            stub = echo_pb2_grpc.EchoStub(ch)
            stream = stub.ServerStream(echo_pb2.StreamRequest(count=1000, interval_ms=50), timeout=20)
            assert next(stream).count == 1
            a.proc.send_signal(sig)
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert a.proc.wait(timeout=10) == 0
        assert not a.ready.exists()
        assert "Traceback" not in a.log.read_text()
        conn.close()
    finally:
        stop_app(a.proc)


def test_port_in_use_fails(app, tmp_path):
    proc = subprocess.run([PY, "-m", "meshlab.testapp", "--pod", "p", "--node", "n", "--bind",
                           "127.0.0.1", "--http-port", str(app.http_port), "--grpc-port", "0",
                           "--ready-file", str(tmp_path / "r")], cwd=REPO, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1
    assert "cannot bind HTTP port" in proc.stderr
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- HTTP/1.1
def test_curl_http1_describes_request(app):
    r = curl("-i", "-H", "X-Rep: a", "-H", "X-Rep: b", "--data-binary", "hello",
             f"{app.url}/some/path?a=1&b=two")
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"x-testapp-pod: pod-a" in head
    assert b"content-type: application/json" in head
    doc = json.loads(body)
    assert doc["pod"] == "pod-a" and doc["node"] == "node-1"
    assert doc["protocol"] == "HTTP/1.1"
    assert doc["method"] == "POST"
    assert doc["path"] == "/some/path"
    assert doc["query"] == "a=1&b=two"
    assert doc["headers"]["x-rep"] == "a, b"
    assert doc["headers"]["host"] == doc["host"] == f"127.0.0.1:{app.http_port}"
    assert doc["body_bytes"] == 5
    assert doc["source"]["address"] == "127.0.0.1" and doc["source"]["port"] > 0
    assert doc["destination"] == {"address": "127.0.0.1", "port": app.http_port}


def test_http_client_keep_alive(app):
    conn = http.client.HTTPConnection("127.0.0.1", app.http_port, timeout=10)
    try:
        docs = []
        for i in range(2):
            conn.request("POST", f"/k{i}", body=b"x" * (1000 * (i + 1)))
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.getheader("x-testapp-pod") == "pod-a"
            docs.append(json.loads(resp.read()))
        assert [d["path"] for d in docs] == ["/k0", "/k1"]
        assert [d["body_bytes"] for d in docs] == [1000, 2000]
        assert docs[0]["source"]["port"] == docs[1]["source"]["port"]     # one connection
    finally:
        conn.close()


def test_chunked_request_body(app):
    def gen():
        for _ in range(10):
            yield b"y" * 1000
    conn = http.client.HTTPConnection("127.0.0.1", app.http_port, timeout=10)
    try:
        conn.request("PUT", "/chunked", body=gen(), encode_chunked=True)
        doc = json.loads(conn.getresponse().read())
        assert doc["body_bytes"] == 10000
        assert doc["headers"]["transfer-encoding"] == "chunked"
    finally:
        conn.close()


def test_pipelined_requests_answered_in_order(app):
    raw = raw_exchange(app.http_port,
                       b"GET /one?delay=0.2 HTTP/1.1\r\nHost: a\r\n\r\n"
                       b"POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
                       b"GET /three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    resps = split_responses(raw)
    assert [json.loads(b)["path"] for _, _, b in resps] == ["/one", "/two", "/three"]
    assert json.loads(resps[1][2])["body_bytes"] == 3
    assert resps[2][1]["connection"] == "close"


def test_upgrade_requests_are_answered_as_http1(app):
    # curl --http2 asks for an h2c upgrade: not done, the request is answered in HTTP/1.1
    doc = curl_json("--http2", "--data-binary", "abc", f"{app.url}/up")
    assert doc["protocol"] == "HTTP/1.1" and doc["body_bytes"] == 3
    # the body of an Upgrade request is read and the connection stays usable
    raw = raw_exchange(app.http_port,
                       b"POST /u1 HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
                       b"Content-Length: 5\r\n\r\nhello"
                       b"GET /u2 HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, close\r\nUpgrade: x\r\n\r\n")
    docs = [json.loads(b) for _, _, b in split_responses(raw)]
    assert [(d["path"], d["body_bytes"]) for d in docs] == [("/u1", 5), ("/u2", 0)]


def test_http10_closes(app):
    raw = raw_exchange(app.http_port, b"GET /old HTTP/1.0\r\n\r\n")
    (status, headers, body), = split_responses(raw)
    assert status.startswith("HTTP/1.1 200")
    assert json.loads(body)["path"] == "/old"


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: nope\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
])
def test_malformed_request_gets_400_and_close(app, request_bytes):
    raw = raw_exchange(app.http_port, request_bytes)
    (status, headers, body), = split_responses(raw)
    assert status.startswith("HTTP/1.1 400")
    assert headers["connection"] == "close"
    assert "malformed" in json.loads(body)["error"]


def test_malformed_after_good_request(app):
    raw = raw_exchange(app.http_port, b"GET /fine HTTP/1.1\r\nHost: a\r\n\r\nNOT HTTP\r\n\r\n")
    resps = split_responses(raw)
    assert [s.split()[1] for s, _, _ in resps] == ["200", "400"]


def test_oversized_headers_get_431(app):
    raw = raw_exchange(app.http_port, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 431")


def test_healthz(app):
    r = curl("-i", f"{app.url}/healthz?status=500")          # query is ignored on /healthz
    assert r.stdout.startswith(b"HTTP/1.1 200")
    assert r.stdout.endswith(b"\r\n\r\nok")
    assert curl("--http2-prior-knowledge", f"{app.url}/healthz").stdout == b"ok"


# --------------------------------------------------------------------------- HTTP/2
def test_curl_http2_prior_knowledge(app):
    r = curl("-i", "--http2-prior-knowledge", "-H", "X-Rep: a", "-H", "X-Rep: b",
             "--data-binary", "abc", f"{app.url}/h2/path?q=1")
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200")
    assert b"x-testapp-pod: pod-a" in head
    doc = json.loads(body)
    assert doc["protocol"] == "HTTP/2"
    assert doc["method"] == "POST" and doc["path"] == "/h2/path" and doc["query"] == "q=1"
    assert doc["host"] == f"127.0.0.1:{app.http_port}"
    assert doc["headers"]["x-rep"] == "a, b"
    assert doc["body_bytes"] == 3


def test_nghttp(app):
    if not shutil.which("nghttp"):
        pytest.skip("nghttp not installed")
    r = subprocess.run(["nghttp", "-t", "20", f"{app.url}/ng?x=1"], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["protocol"] == "HTTP/2" and doc["path"] == "/ng"
    # five concurrent streams on one connection, each delayed: done in ~one delay
    t0 = time.monotonic()
    r = subprocess.run(["nghttp", "-n", "-s", "-m", "5", "-t", "20", f"{app.url}/ng?delay=0.3"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(" 200 ") == 5
    assert time.monotonic() - t0 < 1.4


def test_nghttp_echo_upload(app, tmp_path):
    if not shutil.which("nghttp"):
        pytest.skip("nghttp not installed")
    data = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "up").write_bytes(data)
    r = subprocess.run(["nghttp", "-t", "20", "-d", str(tmp_path / "up"), f"{app.url}/echo"],
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).digest() == hashlib.sha256(data).digest()


# --------------------------------------------------------------------------- behaviours
@pytest.mark.parametrize("h2", [False, True], ids=["http1", "http2"])
def test_status_and_headers(app, h2):
    opt = ["--http2-prior-knowledge"] if h2 else []
    r = curl(*opt, "-i", f"{app.url}/s?status=418&header=X-One:1&header=X-Two:two%20words")
    head = r.stdout.partition(b"\r\n\r\n")[0].decode().lower()
    assert head.split("\r\n")[0].split()[1] == "418"
    assert "x-one: 1" in head and "x-two: two words" in head
    assert "x-testapp-pod: pod-a" in head


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "http2"])
def test_invalid_query_gets_400_with_message(app, h2):
    opt = ["--http2-prior-knowledge"] if h2 else []
    r = curl(*opt, "-w", "\n%{http_code}", f"{app.url}/?status=700")
    body, _, code = r.stdout.rpartition(b"\n")
    assert code == b"400"
    assert "from 100 to 599" in json.loads(body)["error"]


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "http2"])
def test_delay(app, h2):
    opt = ["--http2-prior-knowledge"] if h2 else []
    t0 = time.monotonic()
    doc = curl_json(*opt, f"{app.url}/d?delay=0.3")
    elapsed = time.monotonic() - t0
    assert doc["path"] == "/d"
    assert 0.3 <= elapsed < 2.0


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "http2"])
def test_size(app, h2):
    opt = ["--http2-prior-knowledge"] if h2 else []
    n = 5 * 1024 * 1024 + 3
    r = curl(*opt, "-o", "-", "-w", "%{http_code}", f"{app.url}/?size={n}&status=206")
    assert r.stdout[-3:] == b"206"
    assert len(r.stdout) - 3 == n
    assert curl(*opt, f"{app.url}/?size=0").stdout == b""


def test_head_and_no_body_statuses(app):
    r = curl("-I", f"{app.url}/?size=1234")
    assert b"content-length: 1234" in r.stdout
    r = curl("-I", f"{app.url}/echo")
    assert r.stdout.startswith(b"HTTP/1.1 200") and b"content-length: 0" in r.stdout
    r = curl("-i", f"{app.url}/?status=204")
    assert r.stdout.startswith(b"HTTP/1.1 204") and r.stdout.endswith(b"\r\n\r\n")
    r = curl("--http2-prior-knowledge", "-i", f"{app.url}/?status=204")
    assert r.stdout.startswith(b"HTTP/2 204") and r.stdout.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "http2"])
def test_informational_status(app, h2):
    opt = ["--http2-prior-knowledge"] if h2 else []
    r = curl(*opt, "-i", f"{app.url}/?status=103&header=Link:%3C/s.css%3E")
    text = r.stdout.decode().lower()
    assert text.index(" 103") < text.index(" 200")
    assert text.count("link: </s.css>") == 2


def test_reset_http1(app):
    with socket.create_connection(("127.0.0.1", app.http_port), timeout=5) as s:
        s.sendall(b"GET /?reset=1 HTTP/1.1\r\nHost: a\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            s.recv(1024)
    r = curl(f"{app.url}/?reset=1", check=False)
    assert r.returncode == 56 and b"reset by peer" in r.stderr


def test_reset_http2(app):
    r = curl("--http2-prior-knowledge", f"{app.url}/?reset=1", check=False)
    assert r.returncode == 92 and b"INTERNAL_ERROR" in r.stderr
    if not shutil.which("nghttp"):
        return
    # only the stream is reset: the next request on the same connection is answered
    r = subprocess.run(["nghttp", "-v", "-t", "20", f"{app.url}/?reset=1", f"{app.url}/after?delay=0.1"],
                       capture_output=True, text=True, timeout=30)
    assert "recv RST_STREAM" in r.stdout and "INTERNAL_ERROR" in r.stdout
    assert '"path":"/after"' in r.stdout
    assert r.stdout.count("Connected") == 1


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "http2"])
def test_echo_20mib(app, tmp_path, h2):
    data = os.urandom(20 * 1024 * 1024)
    f = tmp_path / "payload"
    f.write_bytes(data)
    opt = ["--http2-prior-knowledge"] if h2 else []
    r = curl(*opt, "--data-binary", f"@{f}", "-H", "Content-Type: application/octet-stream",
             f"{app.url}/echo")
    assert len(r.stdout) == len(data)
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


def test_echo_chunked_and_expect_continue(app, tmp_path):
    data = os.urandom(3 * 1024 * 1024)
    f = tmp_path / "payload"
    f.write_bytes(data)
    t0 = time.monotonic()
    r = curl("-i", "-H", "Transfer-Encoding: chunked", "-H", "Expect: 100-continue",
             "--data-binary", f"@{f}", f"{app.url}/echo")
    assert time.monotonic() - t0 < 0.9            # curl would wait 1 s without 100 Continue
    assert b"HTTP/1.1 100 Continue" in r.stdout
    body = r.stdout.split(b"\r\n\r\n", 2)[2]
    assert b"transfer-encoding: chunked" in r.stdout
    assert body == data


def test_size_download_is_not_buffered(app):
    """A client that does not read a 1 GiB response: the app must not buffer it."""
    before = app.rss_kib()
    with socket.create_connection(("127.0.0.1", app.http_port), timeout=5) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(b"GET /?size=1G HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.5)
        assert app.rss_kib() - before < 64 * 1024
        got = 0
        while got < 4 * 1024 * 1024:
            got += len(s.recv(1 << 20))
    # the app is still fine afterwards
    assert curl_json(f"{app.url}/alive")["path"] == "/alive"


def test_echo_upload_is_not_buffered(app):
    """Upload to /echo without reading the response: the app stops reading (backpressure)
    instead of buffering, so the sender stalls well before 256 MiB."""
    before = app.rss_kib()
    total = 256 * 1024 * 1024
    sent = 0
    with socket.create_connection(("127.0.0.1", app.http_port), timeout=5) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % total)
        s.settimeout(0.5)
        block = b"z" * 65536
        try:
            while sent < total:
                sent += s.send(block)
        except (socket.timeout, BlockingIOError):
            pass
        assert sent < 64 * 1024 * 1024
        assert app.rss_kib() - before < 64 * 1024


# --------------------------------------------------------------------------- gRPC
@pytest.fixture(scope="module")
def grpc_channel(app):
    grpc = pytest.importorskip("grpc")
    ch = grpc.insecure_channel(f"127.0.0.1:{app.grpc_port}")
    grpc.channel_ready_future(ch).result(timeout=10)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(grpc_channel):
    from meshlab.testapp import echo_pb2_grpc
    return echo_pb2_grpc.EchoStub(grpc_channel)


def test_grpc_unary(stub):
    from meshlab.testapp import echo_pb2
    reply, call = stub.Echo.with_call(echo_pb2.EchoRequest(message="hi", response_size=100),
                                      metadata=[("x-test", "1"), ("x-test", "2")], timeout=10)
    assert (reply.pod, reply.node, reply.message, reply.count) == ("pod-a", "node-1", "hi", 1)
    assert reply.peer.startswith("ipv4:127.0.0.1:")
    assert reply.metadata["x-test"] == "1, 2"
    assert len(reply.payload) == 100
    assert ("x-testapp-pod", "pod-a") in tuple(call.initial_metadata())


def test_grpc_requested_error(stub):
    import grpc

    from meshlab.testapp import echo_pb2
    with pytest.raises(grpc.RpcError) as err:
        stub.Echo(echo_pb2.EchoRequest(message="x", status_code=grpc.StatusCode.UNAVAILABLE.value[0],
                                       status_message="asked to fail"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "asked to fail"
    with pytest.raises(grpc.RpcError) as err:
        stub.Echo(echo_pb2.EchoRequest(status_code=99), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_pod_and_fail_knobs_fail_trailers_only_where_they_apply(stub):
    import grpc

    from meshlab.testapp import echo_pb2
    failing = echo_pb2.EchoRequest(message="x", status_code=grpc.StatusCode.UNAVAILABLE.value[0])
    with pytest.raises(grpc.RpcError) as err:
        stub.Echo(failing, metadata=[("x-testapp-pod", "pod-a")], timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ("x-testapp-pod", "pod-a") not in tuple(err.value.initial_metadata() or ())  # trailers-only
    reply = stub.Echo(failing, metadata=[("x-testapp-pod", "pod-b")], timeout=10)  # another pod: plain OK
    assert reply.pod == "pod-a"
    codes = []
    for _ in range(40):
        try:
            stub.Echo(failing, metadata=[("x-testapp-fail", "0.5")], timeout=10)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
    assert set(codes) == {"OK", "UNAVAILABLE"}
    with pytest.raises(grpc.RpcError) as err:
        stub.Echo(failing, metadata=[("x-testapp-fail", "2")], timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_delay_and_deadline(stub):
    import grpc

    from meshlab.testapp import echo_pb2
    t0 = time.monotonic()
    stub.Echo(echo_pb2.EchoRequest(delay_ms=200), timeout=10)
    assert time.monotonic() - t0 >= 0.2
    with pytest.raises(grpc.RpcError) as err:
        stub.Echo(echo_pb2.EchoRequest(delay_ms=2000), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_grpc_server_stream(stub):
    import grpc

    from meshlab.testapp import echo_pb2
    replies = list(stub.ServerStream(echo_pb2.StreamRequest(message="s", count=5, response_size=10),
                                     timeout=10))
    assert [r.count for r in replies] == [1, 2, 3, 4, 5]
    assert all(r.message == "s" and len(r.payload) == 10 for r in replies)
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for r in stub.ServerStream(echo_pb2.StreamRequest(count=2, status_code=13), timeout=10):
            got.append(r.count)
    assert got == [1, 2]
    assert err.value.code() == grpc.StatusCode.INTERNAL


def test_grpc_client_stream(stub):
    from meshlab.testapp import echo_pb2
    reply = stub.ClientStream(iter([echo_pb2.EchoRequest(message=f"m{i}") for i in range(7)]),
                              timeout=10)
    assert (reply.count, reply.message, reply.pod) == (7, "m6", "pod-a")


def test_grpc_bidi(stub):
    import grpc

    from meshlab.testapp import echo_pb2
    replies = list(stub.Bidi(iter([echo_pb2.EchoRequest(message=m) for m in "abc"]), timeout=10))
    assert [(r.message, r.count) for r in replies] == [("a", 1), ("b", 2), ("c", 3)]
    reqs = [echo_pb2.EchoRequest(message="ok"),
            echo_pb2.EchoRequest(message="boom", status_code=grpc.StatusCode.ABORTED.value[0])]
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for r in stub.Bidi(iter(reqs), timeout=10):
            got.append(r.message)
    assert got == ["ok"]
    assert err.value.code() == grpc.StatusCode.ABORTED


def test_grpc_health(grpc_channel):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    h = health_pb2_grpc.HealthStub(grpc_channel)
    for service in ("", "hostmesh.testapp.v1.Echo"):
        resp = h.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        h.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_log_requests_flag(tmp_path):
    import grpc

    from meshlab.testapp import echo_pb2, echo_pb2_grpc
    a = start_app(tmp_path, "--log-requests", pod="logger")
    try:
        curl(f"{a.url}/logged?x=1")
        curl("--http2-prior-knowledge", f"{a.url}/logged2")
        with grpc.insecure_channel(f"127.0.0.1:{a.grpc_port}") as ch:
            stub = echo_pb2_grpc.EchoStub(ch)
            stub.Echo(echo_pb2.EchoRequest(), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.Echo(echo_pb2.EchoRequest(status_code=5), timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = a.log.read_text()
            if ('"GET /logged?x=1" 200' in text and '"GET /logged2" 200' in text
                    and '"/hostmesh.testapp.v1.Echo/Echo" OK' in text
                    and '"/hostmesh.testapp.v1.Echo/Echo" NOT_FOUND' in text):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(a.log.read_text())
    finally:
        stop_app(a.proc)


def test_no_request_log_by_default_and_no_errors(app):
    # runs last against the shared app: everything above left no traceback behind
    curl(f"{app.url}/quiet")
    time.sleep(0.1)
    text = app.log.read_text()
    assert "/quiet" not in text
    assert "Traceback" not in text and "Error" not in text, text
