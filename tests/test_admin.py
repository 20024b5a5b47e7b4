"""The agent admin endpoint: the dispatcher without sockets, then a real server (asyncio and
uvloop) driven by curl, http.client and raw sockets."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import select
import shutil
import socket
import subprocess
import threading
import time

import prometheus_client
import pytest
import uvloop

from nodeagent.admin import (
    LOG_LEVELS,
    METRICS_CONTENT_TYPE,
    AdminDispatcher,
    AdminInputs,
    AdminLimits,
    AdminServer,
    Response,
    maybe_gzip,
    render_response,
    screen_request,
)
from nodeagent.errors import ProxyError

CURL = shutil.which("curl")

GET_PATHS = ["/", "/healthz", "/ready", "/stats/prometheus", "/metrics", "/config_dump", "/clusters",
             "/listeners", "/routes", "/certs", "/policies", "/capture", "/server_info"]
POST_PATHS = ["/logging", "/drain", "/quitquitquit"]


class FakeAgent:
    """Records what the admin endpoint asks of the agent."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "hostmesh_requests", "Requests handled", ["response_code"], registry=self.registry)
        self.ready: tuple[bool, str] = (True, "")
        self.levels: list[str] = []
        self.drained = threading.Event()
        self.quit_called = threading.Event()
        self.on_quit = None  # optional coroutine function run by quit
        self.calls: list[str] = []
        self.boom_in: set[str] = set()

    def _view(self, name, value):
        def view():
            self.calls.append(name)
            if name in self.boom_in:
                raise RuntimeError(f"{name} exploded")
            return value
        return view

    def set_log_level(self, level: str) -> None:
        if level not in LOG_LEVELS:
            raise ValueError(f"bad level {level}")
        self.levels.append(level)

    async def drain(self) -> None:
        self.drained.set()

    async def quit(self) -> None:
        if self.on_quit is not None:
            await self.on_quit()
        self.quit_called.set()

    def inputs(self) -> AdminInputs:
        return AdminInputs(
            registry=self.registry,
            server_info=self._view("server_info", {"version": "0.1.0", "node": "n1", "state": "LIVE"}),
            readiness=lambda: self.ready,
            config_dump=self._view("config_dump", {"version": "v7", "services": []}),
            listeners=self._view("listeners", [{"name": "outbound", "port": 15001}]),
            clusters=self._view("clusters", [{"name": "web.default", "endpoints": 2}]),
            routes=self._view("routes", {"web.default": []}),
            certs=self._view("certs", [{"identity": "spiffe://cluster.local/ns/default/sa/web",
                                        "serial": "0a", "key": "-----BEGIN PRIVATE KEY-----\nMIIE\n"
                                                                "-----END PRIVATE KEY-----\n"}]),
            capture=self._view("capture", {"backend": "iptables", "installed": True}),
            drain=self.drain,
            quit=self.quit,
            set_log_level=self.set_log_level,
        )


# ---------------------------------------------------------------------------------------
# dispatcher, no sockets

@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
def dispatcher(agent) -> AdminDispatcher:
    return AdminDispatcher(agent.inputs())


def body_json(resp: Response):
    assert resp.header("content-type") == "application/json"
    return json.loads(resp.body)


def test_healthz(dispatcher):
    resp = dispatcher.dispatch("GET", "/healthz")
    assert (resp.status, resp.body) == (200, b"ok\n")


def test_ready_and_not_ready(dispatcher, agent):
    assert (dispatcher.dispatch("GET", "/ready").status, dispatcher.dispatch("GET", "/ready").body) == (200, b"ready\n")
    agent.ready = (False, "no config received from the control plane yet")
    resp = dispatcher.dispatch("GET", "/ready")
    assert resp.status == 503
    assert b"no config received from the control plane yet" in resp.body


@pytest.mark.parametrize("path", ["/stats/prometheus", "/metrics"])
def test_metrics(dispatcher, agent, path):
    agent.requests.labels(response_code="200").inc(3)
    resp = dispatcher.dispatch("GET", path, "usedonly=1")
    assert resp.status == 200
    assert resp.header("content-type") == METRICS_CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert b'hostmesh_requests_total{response_code="200"} 3.0' in resp.body


@pytest.mark.parametrize("path,name", [("/config_dump", "config_dump"), ("/clusters", "clusters"),
                                       ("/listeners", "listeners"), ("/routes", "routes"),
                                       ("/capture", "capture"), ("/server_info", "server_info")])
def test_json_views(dispatcher, agent, path, name):
    resp = dispatcher.dispatch("GET", path, "ignored=1")
    assert resp.status == 200
    assert body_json(resp) == getattr(agent.inputs(), name)()
    assert resp.body.startswith(b"{\n  ") or resp.body.startswith(b"[\n  ")  # indent 2


def test_certs_never_show_private_keys(dispatcher):
    resp = dispatcher.dispatch("GET", "/certs")
    certs = body_json(resp)
    assert certs[0]["identity"] == "spiffe://cluster.local/ns/default/sa/web"
    assert b"PRIVATE KEY-----" not in resp.body and b"MIIE" not in resp.body
    assert certs[0]["key"] == "[REDACTED PRIVATE KEY]"


def test_index_lists_every_path(dispatcher):
    paths = {p["path"]: p["method"] for p in body_json(dispatcher.dispatch("GET", "/"))["paths"]}
    assert paths == {**{p: "GET" for p in GET_PATHS}, **{p: "POST" for p in POST_PATHS}}


def test_unknown_path_is_404_listing_paths(dispatcher):
    resp = dispatcher.dispatch("GET", "/nope")
    assert resp.status == 404
    body = body_json(resp)
    assert body["path"] == "/nope"
    assert "GET /stats/prometheus" in body["paths"] and "POST /quitquitquit" in body["paths"]


@pytest.mark.parametrize("path", POST_PATHS)
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT"])
def test_mutations_are_post_only(dispatcher, agent, path, method):
    resp = dispatcher.dispatch(method, path, "level=debug")
    assert resp.status == 405
    assert resp.header("allow") == "POST"
    assert resp.after is None and agent.levels == []


@pytest.mark.parametrize("path", GET_PATHS)
def test_post_on_get_paths_is_405(dispatcher, agent, path):
    resp = dispatcher.dispatch("POST", path)
    assert resp.status == 405
    assert resp.header("allow") == "GET, HEAD"
    assert agent.calls == []


def test_head_is_get(dispatcher):
    assert dispatcher.dispatch("HEAD", "/server_info").body == dispatcher.dispatch("GET", "/server_info").body


def test_logging(dispatcher, agent):
    resp = dispatcher.dispatch("POST", "/logging", "level=DEBUG")
    assert resp.status == 200 and body_json(resp)["level"] == "debug"
    assert agent.levels == ["debug"]


@pytest.mark.parametrize("query", ["level=verbose", "", "level=", "level=info&level=debug", "lvl=info"])
def test_logging_bad_level_is_400_naming_the_levels(dispatcher, agent, query):
    resp = dispatcher.dispatch("POST", "/logging", query)
    assert resp.status == 400
    body = body_json(resp)
    assert body["valid_levels"] == list(LOG_LEVELS)
    assert "debug, info, warning, error" in body["error"] or "debug|info|warning|error" in body["error"]
    assert agent.levels == []


def test_logging_value_error_from_agent_is_400(agent):
    inputs = agent.inputs()

    def refuse(level):
        raise ValueError("level locked by config")
    inputs.set_log_level = refuse
    resp = AdminDispatcher(inputs).dispatch("POST", "/logging", "level=info")
    assert resp.status == 400 and "level locked by config" in body_json(resp)["error"]


@pytest.mark.parametrize("path,attr,event", [("/drain", "drain", "drained"),
                                             ("/quitquitquit", "quit", "quit_called")])
def test_post_actions_are_follow_ups_not_run_by_dispatch(dispatcher, agent, path, attr, event):
    resp = dispatcher.dispatch("POST", path)
    assert resp.status == 200
    assert resp.after is not None
    assert not getattr(agent, event).is_set()  # dispatch only returns the action
    asyncio.run(resp.after())
    assert getattr(agent, event).is_set()


@pytest.mark.parametrize("path", ["/config_dump", "/clusters", "/certs", "/server_info"])
def test_exception_in_callable_is_500_and_serving_continues(dispatcher, agent, path, caplog):
    agent.boom_in.add(path.strip("/"))
    resp = dispatcher.dispatch("GET", path)
    assert resp.status == 500
    body = body_json(resp)
    assert body["error"] == "internal error" and "exploded" in body["detail"]
    assert "failed" in caplog.text
    assert dispatcher.dispatch("GET", "/healthz").status == 200


def test_readiness_and_metrics_failures_are_500(agent):
    inputs = agent.inputs()
    inputs.readiness = lambda: 1 / 0

    class Broken(prometheus_client.registry.Collector):
        def collect(self):
            raise RuntimeError("collector broke")
    inputs.registry.register(Broken())
    d = AdminDispatcher(inputs)
    assert d.dispatch("GET", "/ready").status == 500
    assert d.dispatch("GET", "/metrics").status == 500


def test_screen_request():
    assert screen_request("GET", {"host": "127.0.0.1:15000"}, True) is None
    assert screen_request("GET", {"host": "[::1]:15000"}, True) is None
    assert screen_request("GET", {"host": "localhost:15000"}, True) is None
    assert screen_request("GET", {}, True) is None
    assert screen_request("GET", {"host": "evil.example:15000"}, True).status == 403  # DNS rebinding
    assert screen_request("GET", {"host": "node1.corp:15000"}, False) is None
    assert screen_request("POST", {"host": "127.0.0.1", "origin": "https://evil.example"}, True).status == 403
    assert screen_request("GET", {"host": "127.0.0.1", "origin": "https://x"}, True) is None


def test_gzip_and_render():
    big = Response(200, [("Content-Type", "text/plain")], b"a" * 5000)
    assert maybe_gzip(big, None) is big
    assert maybe_gzip(big, "gzip;q=0") is big
    zipped = maybe_gzip(big, "deflate, gzip")
    assert zipped.header("content-encoding") == "gzip" and gzip.decompress(zipped.body) == big.body
    small = Response(200, [], b"ok")
    assert maybe_gzip(small, "gzip") is small
    raw = render_response(Response(405, [("Allow", "POST")], b"x"), keep_alive=False)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"\r\nAllow: POST" in head and b"\r\nContent-Length: 1" in head and b"\r\nConnection: close" in head
    assert body == b"x"
    assert render_response(Response(200, [], b"xyz"), head_only=True).endswith(b"\r\n\r\n")


# ---------------------------------------------------------------------------------------
# a real server on an ephemeral port, in a thread with its own loop

class RunningServer:
    def __init__(self, inputs: AdminInputs, loop_kind: str, limits: AdminLimits | None = None):
        self.loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
        self.server = AdminServer(inputs, "127.0.0.1", 0, limits=limits)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start())
        self.port = self.server.bound_port
        self.url = f"http://127.0.0.1:{self.port}"

    def call(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request):
    return request.param


@pytest.fixture
def running(agent, loop_kind):
    srv = RunningServer(agent.inputs(), loop_kind, AdminLimits(header_timeout=0.5, linger_timeout=1.0))
    yield srv
    srv.stop()


def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    if CURL is None:
        pytest.skip("curl not installed")
    return subprocess.run([CURL, "-sS", "--max-time", "10", *args], capture_output=True, timeout=timeout)


def curl_status(*args: str) -> tuple[int, bytes]:
    out = curl("-o", "-", "-w", "\n%{http_code}", *args)
    assert out.returncode == 0, out.stderr
    body, _, code = out.stdout.rpartition(b"\n")
    return int(code), body


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes; return everything read."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_curl_paths(running, agent):
    assert curl_status(running.url + "/healthz") == (200, b"ok\n")
    code, body = curl_status(running.url + "/server_info?x=1")
    assert code == 200 and json.loads(body)["node"] == "n1"
    code, body = curl_status(running.url + "/does-not-exist")
    assert code == 404 and "GET /healthz" in json.loads(body)["paths"]
    code, body = curl_status("-X", "POST", running.url + "/logging?level=warning")
    assert code == 200 and agent.levels == ["warning"]
    code, body = curl_status("-X", "POST", running.url + "/logging?level=loud")
    assert code == 400 and "debug, info, warning, error" in json.loads(body)["error"]
    out = curl("-i", running.url + "/drain")
    assert out.stdout.startswith(b"HTTP/1.1 405") and b"\r\nAllow: POST\r\n" in out.stdout
    assert curl_status("-X", "POST", running.url + "/drain")[0] == 200
    assert agent.drained.wait(5)


def test_metrics_over_http(running, agent):
    agent.requests.labels(response_code="503").inc(2)
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=5)
    conn.request("GET", "/stats/prometheus")
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# TYPE hostmesh_requests_total counter" in body
    assert b'hostmesh_requests_total{response_code="503"} 2.0' in body
    conn.close()
    # gzip when asked (body over the gzip threshold)
    for i in range(100):
        agent.requests.labels(response_code=str(100 + i)).inc()
    code, body = curl_status("--compressed", running.url + "/metrics")
    assert code == 200 and b'hostmesh_requests_total{response_code="199"} 1.0' in body
    out = curl("-D", "-", "-o", "/dev/null", "-H", "Accept-Encoding: gzip", running.url + "/metrics")
    assert b"Content-Encoding: gzip" in out.stdout


def test_keep_alive_one_connection_many_requests(running, agent):
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=5)
    conn.request("GET", "/healthz")
    first = conn.getresponse()
    assert first.read() == b"ok\n"
    sock = conn.sock
    for path in ["/ready", "/clusters", "/nope", "/metrics"]:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        assert resp.status in (200, 404)
        assert conn.sock is sock  # same connection, no reconnect
    conn.request("POST", "/drain")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read()) == {"status": "draining"}
    assert conn.sock is sock
    conn.request("HEAD", "/server_info")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b""
    assert int(resp.getheader("Content-Length")) > 0
    conn.close()
    # curl reuses the connection for several URLs on one command line
    out = curl("-v", running.url + "/healthz", running.url + "/ready")
    assert out.returncode == 0 and b"ok\nready\n" == out.stdout
    assert b"Re-using existing connection" in out.stderr or b"Reusing existing" in out.stderr


def test_pipelined_requests_answered_in_order(running):
    reqs = b"".join(f"GET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() for p in ["/healthz", "/ready"])
    reqs += b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    data = raw_exchange(running.port, reqs)
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert data.index(b"ok\n") < data.index(b"ready\n") < data.rindex(b"ok\n")


def test_ready_503_carries_reason(running, agent):
    agent.ready = (False, "certificates expired for spiffe://cluster.local/ns/default/sa/web")
    code, body = curl_status(running.url + "/ready")
    assert code == 503
    assert body == b"certificates expired for spiffe://cluster.local/ns/default/sa/web\n"


def test_quitquitquit_answers_first_then_quits(running, agent):
    # the quit callable closes the admin server at once, as the agent's shutdown would:
    # the client still gets its whole answer, because the action runs after the write
    async def on_quit():
        await running.server.close()
    agent.on_quit = on_quit
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=5)
    conn.request("POST", "/quitquitquit")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read()) == {"status": "quitting"}
    assert agent.quit_called.wait(5)
    conn.close()
    with pytest.raises(OSError):  # and the endpoint is gone
        socket.create_connection(("127.0.0.1", running.port), timeout=2).close()


def test_exception_is_500_and_server_keeps_serving(running, agent):
    agent.boom_in.add("clusters")
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=5)
    conn.request("GET", "/clusters")
    resp = conn.getresponse()
    assert resp.status == 500 and "exploded" in json.loads(resp.read())["detail"]
    conn.request("GET", "/healthz")
    assert conn.getresponse().read() == b"ok\n"
    conn.close()


def test_oversized_headers_431(running):
    code, body = curl_status("-H", "X-Big: " + "a" * 20000, running.url + "/healthz")
    assert code == 431
    # many small headers add up too
    headers = []
    for i in range(90):
        headers += ["-H", f"X-H{i}: " + "b" * 200]
    assert curl_status(*headers, running.url + "/healthz")[0] == 431
    # too many headers
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(150))
    assert raw_exchange(running.port, b"GET /healthz HTTP/1.1\r\n" + many + b"\r\n").startswith(b"HTTP/1.1 431 ")


def test_header_growing_across_reads_431(running):
    # one header value that keeps growing, read by read (httptools buffers it whole)
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Grow: ")
        got = b""
        try:
            for _ in range(40):
                s.sendall(b"c" * 1024)
                time.sleep(0.005)
                if select.select([s], [], [], 0)[0]:
                    break
            got = s.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert got.startswith(b"HTTP/1.1 431 ")


def test_body_over_limit_413(running):
    data = b"POST /drain HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2000000\r\n\r\n"
    assert raw_exchange(running.port, data).startswith(b"HTTP/1.1 413 ")


@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
    b"G\x00T / HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/9.9\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
])
def test_malformed_request_400_and_close(running, request_bytes):
    data = raw_exchange(running.port, request_bytes)
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert b"\r\nConnection: close\r\n" in data


def test_upgrade_request_answered_then_closed(running):
    data = raw_exchange(running.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      b"Connection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"ok\n")


def test_browser_requests_refused(running, agent):
    assert curl_status("-X", "POST", "-H", "Origin: https://evil.example", running.url + "/quitquitquit")[0] == 403
    assert curl_status("-H", "Host: evil.example", running.url + "/config_dump")[0] == 403
    assert not agent.quit_called.is_set()


def test_slowloris_closed_by_header_timeout(running):
    deadline = time.monotonic() + 15
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        got = b""
        closed = False
        while time.monotonic() < deadline and not closed:
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if select.select([s], [], [], 0.1)[0]:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                got += chunk
                closed = not chunk
        assert closed, "slowloris connection was never closed"
        assert got == b"" or got.startswith(b"HTTP/1.1 408 ")


def test_silent_connection_closed_by_header_timeout(running):
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as s:
        assert s.recv(100) == b""  # closed without a request ever starting


def test_connection_cap(agent, loop_kind):
    srv = RunningServer(agent.inputs(), loop_kind, AdminLimits(max_connections=2))
    try:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(2)]
        time.sleep(0.2)
        data = raw_exchange(srv.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 503 ")
        for s in held:
            s.close()
        for _ in range(50):  # slots come back once the held connections are gone
            data = raw_exchange(srv.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            if data.startswith(b"HTTP/1.1 200 "):
                break
            time.sleep(0.05)
        assert data.startswith(b"HTTP/1.1 200 ")
    finally:
        srv.stop()


@pytest.mark.parametrize("use_uvloop", [False, True])
def test_bind_failure_is_proxy_error(agent, use_uvloop):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main():
            server = AdminServer(agent.inputs(), "127.0.0.1", port)
            await server.start()

        runner = uvloop.run if use_uvloop else asyncio.run
        with pytest.raises(ProxyError) as err:
            runner(main())
        assert str(err.value) == f"admin endpoint: cannot listen on 127.0.0.1:{port}: address already in use"


def test_default_address(agent):
    server = AdminServer(agent.inputs())
    assert (server.host, server.port, server.bound_port) == ("127.0.0.1", 15000, None)
    assert server.loopback_only
