"""Access logs (nodeagent/accesslog.py): the decisions (which lines, sampling), the line
format, the writer (bounded queue, its thread, pipes, files, rotation, drops) and the hooks
in the HTTP/1.1 and HTTP/2 drivers and the L4 relay, over loopback sockets."""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent import worker_wire as wire
from nodeagent.accesslog import (PIPE_BUF, STDOUT, AccessLog, AccessLogPolicy, LineFormat, LogWriter, Sampler,
                                 _pipe_chunks, trace_id_of)
from nodeagent.proxy.l7.routing import RouteRef
from nodeagent.state import AgentState, ConfigObject, NodeSnapshot, Workload
from nodeagent.telemetry import TcpLabels

pytestmark = pytest.mark.timeout(60)

NODE = "node-1"
ROOT = "mesh-root"
CLIENT = Workload("client", "apps", NODE, "198.18.1.5", labels=(("app", "client"), ("tier", "front")))
OTHER = Workload("other", "apps", NODE, "198.18.1.6", labels=(("app", "other"),))
WEB = Workload("web-a", "shop", NODE, "198.18.1.10", labels=(("app", "web"),))


def meshconfig(output: str = "/var/log/hm.log", sampling: float | None = None, namespace: str = ROOT) -> ConfigObject:
    al = {"output": output}
    if sampling is not None:
        al["samplingPercentage"] = sampling
    return ConfigObject("MeshConfig", namespace, "default", json.dumps({"accessLog": al}))


def telemetry(name: str, ns: str, *, selector=None, target=None, disabled=False, sampling=None) -> ConfigObject:
    spec: dict = {"accessLogging": {"disabled": disabled}}
    if sampling is not None:
        spec["accessLogging"]["samplingPercentage"] = sampling
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if target is not None:
        spec["targetRef"] = target
    return ConfigObject("Telemetry", ns, name, json.dumps(spec))


def snap(*config, workloads=(CLIENT, OTHER, WEB), services=()) -> NodeSnapshot:
    return NodeSnapshot(NODE, tuple(services), tuple(workloads), tuple(config))


def labels(reporter="source", src=("apps", "client"), dst=("shop", "web-a"), svc=("shop", "web")) -> TcpLabels:
    return TcpLabels(reporter, source_workload=src[1], source_workload_namespace=src[0],
                     destination_workload=dst[1], destination_workload_namespace=dst[0],
                     destination_service=f"{svc[1]}.{svc[0]}.svc.cluster.local", destination_service_name=svc[1],
                     destination_service_namespace=svc[0], request_protocol="http")


# ------------------------------------------------------------------ decisions
def test_no_access_log_in_the_meshconfig_means_no_policy():
    assert AccessLogPolicy.from_snapshot(snap()) is None
    assert AccessLogPolicy.from_snapshot(snap(ConfigObject("MeshConfig", ROOT, "default", "{}"))) is None
    assert AccessLogPolicy.from_snapshot(None) is None
    # a Telemetry alone turns nothing on: the MeshConfig says where lines go
    assert AccessLogPolicy.from_snapshot(snap(telemetry("t", "apps"))) is None


def test_the_meshconfig_sets_output_and_mesh_wide_sampling():
    p = AccessLogPolicy.from_snapshot(snap(meshconfig("/dev/stdout")))
    assert p.output == STDOUT and p.mesh == 100 and not p.scoped
    p = AccessLogPolicy.from_snapshot(snap(meshconfig("/var/log/a.log", 25)))
    assert p.output == "/var/log/a.log" and p.percent(labels()) == 25
    assert not AccessLogPolicy.from_snapshot(snap(meshconfig(sampling=0))).logs_anything


def test_the_most_specific_scope_wins_route_service_selector_namespace_mesh():
    route = RouteRef("HTTPRoute", "shop", "canary", 0)
    config = [meshconfig(sampling=10),
              telemetry("mesh", ROOT, sampling=20),                                   # mesh-wide
              telemetry("ns", "apps", sampling=30),                                   # namespace apps
              telemetry("front", "apps", selector={"tier": "front"}, sampling=40),    # selects client
              telemetry("svc", "shop", target={"kind": "Service", "name": "web"}, sampling=50),
              telemetry("rt", "shop", target={"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                              "name": "canary"}, disabled=True)]
    p = AccessLogPolicy.from_snapshot(snap(*config))
    assert p.percent(labels(), route) == 0          # the route's Telemetry: disabled
    assert p.percent(labels()) == 50                # the Service's
    other_svc = labels(svc=("shop", "cart"))
    assert p.percent(other_svc) == 40               # the client's selector
    assert p.percent(labels(src=("apps", "other"), svc=("shop", "cart"))) == 30   # its namespace
    assert p.percent(labels(src=("unknown", "unknown"), svc=("shop", "cart"))) == 20   # mesh-wide
    # the destination side uses the destination workload's scope
    assert p.percent(labels("destination", src=("apps", "client"), dst=("shop", "web-a"), svc=("shop", "cart"))) == 20
    p = AccessLogPolicy.from_snapshot(snap(*config[:1]))
    assert p.percent(labels(), route) == 10          # nothing but the MeshConfig


def test_a_selector_applies_in_its_own_namespace_only_and_the_first_by_name_wins():
    config = [meshconfig(sampling=100),
              telemetry("b-off", "apps", selector={"app": "client"}, disabled=True),
              telemetry("a-half", "apps", selector={"tier": "front"}, sampling=50),
              telemetry("elsewhere", "shop", selector={"app": "client"}, disabled=True)]
    p = AccessLogPolicy.from_snapshot(snap(*config))
    assert p.percent(labels(svc=("x", "y"))) == 50
    assert p.percent(labels(src=("apps", "other"), svc=("x", "y"))) == 100


def test_sampling_draws_only_between_0_and_100_and_keeps_about_the_share():
    calls = []

    def draw():
        calls.append(1)
        return rng.random()
    rng = random.Random(7)
    s = Sampler(draw)
    assert s(100) and not s(0) and not calls
    kept = sum(s(30) for _ in range(20000))
    assert 5600 < kept < 6400 and len(calls) == 20000


# ------------------------------------------------------------------ lines
def test_a_line_is_one_json_object_with_envoy_names_and_bounded_escaped_values():
    fmt = LineFormat(NODE)
    lab = labels()._replace(source_principal="spiffe://cluster.local/ns/apps/sa/client",
                            connection_security_policy="mutual_tls")
    line = fmt.line(lab, start=1700000000.25, duration=0.0123, protocol="HTTP/1.1", method=b"GET",
                    authority=b"web.shop", path=b"/a\nb\"c\x00" + "é".encode("latin-1"), code=200, flags="-",
                    received=3, sent=5, upstream="198.18.1.10:8080", remote="198.18.1.5",
                    local="198.19.0.10:80", route="HTTPRoute/shop/canary#0", request_id=b"rid-1",
                    trace_id=trace_id_of(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
                    user_agent=b"curl/8")
    assert line.endswith("\n") and line.count("\n") == 1 and line.isascii()
    d = json.loads(line)
    assert d["start_time"] == "2023-11-14T22:13:20.250Z" and d["duration"] == 12
    assert d["path"] == "/a\nb\"c\x00é" and d["method"] == "GET" and d["response_code"] == 200
    assert d["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and d["request_id"] == "rid-1"
    assert d["upstream_cluster"] == "web.shop.svc.cluster.local" and d["node"] == NODE
    assert d["source_principal"].startswith("spiffe://") and d["connection_security_policy"] == "mutual_tls"
    assert set(d) >= {"bytes_received", "bytes_sent", "upstream_host", "downstream_remote_address",
                      "source_workload", "source_namespace", "destination_workload", "destination_namespace",
                      "destination_principal", "route_name", "reporter", "response_flags", "authority", "protocol"}
    tcp = json.loads(fmt.line(labels(), start=1.0, duration=2.0, protocol=None, method=None, authority=None,
                              path=None, code=0, flags="UF", received=1, sent=0, upstream=None, remote=None))
    assert tcp["method"] is None and tcp["protocol"] is None and tcp["response_flags"] == "UF"


def test_a_huge_or_non_ascii_path_still_makes_a_line_below_pipe_buf():
    fmt = LineFormat(NODE)
    for path in (b"/" + b"x" * 100000, b"/" + "é".encode("latin-1") * 5000, b"/" + b"\x01" * 3000):
        line = fmt.line(labels(), start=1.0, duration=0.0, protocol="HTTP/1.1", method=b"GET", authority=b"a" * 9000,
                        path=path, code=200, flags="-", received=0, sent=0, upstream=None, remote=None,
                        user_agent=b"u" * 9000)
        assert len(line) < PIPE_BUF and json.loads(line)["path"].startswith("/")


def test_trace_ids_from_traceparent_then_b3():
    assert trace_id_of(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", b"aaaa") == \
        "0af7651916cd43dd8448eb211c80319c"
    assert trace_id_of(b"00-00000000000000000000000000000000-b7ad6b7169203331-01", None) is None  # invalid id
    assert trace_id_of(b"garbage", b"463AC35C9F6413AD") == "463ac35c9f6413ad"
    assert trace_id_of(None, b"xyz") is None and trace_id_of(None, None) is None


# ------------------------------------------------------------------ the writer
def pipe_writer(**kw) -> tuple[LogWriter, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    fds = [w]  # the writer owns the write end once it opens its output
    writer = LogWriter(open_output=lambda output: fds.pop(), **kw)
    writer.output = "pipe"
    return writer, r


def read_pipe(fd: int, deadline: float = 10.0) -> bytes:
    out = b""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if select.select([fd], [], [], 0.05)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            out += chunk
        elif out:
            break
    return out


def test_pipe_writes_are_runs_of_whole_lines_of_at_most_pipe_buf():
    lines = [json.dumps({"i": i, "pad": "x" * (i % 700)}) + "\n" for i in range(500)] + ["z" * 5000 + "\n"]
    chunks = _pipe_chunks(lines)
    assert b"".join(data for _, data in chunks).decode() == "".join(lines)
    assert sum(n for n, _ in chunks) == len(lines)
    assert all(len(data) <= PIPE_BUF or n == 1 for n, data in chunks)
    assert all(data.endswith(b"\n") for _, data in chunks) and len(chunks) > 10


def test_lines_reach_a_pipe_whole_and_in_order():
    writer, r = pipe_writer()
    lines = [json.dumps({"i": i, "pad": "x" * (i % 300)}) + "\n" for i in range(2000)]
    got = bytearray()
    reading = threading.Thread(target=lambda: got.extend(read_pipe(r, 10)))
    reading.start()
    for line in lines:
        writer.put(line)
    assert writer.flush(10)
    reading.join()
    assert got.decode().splitlines(keepends=True) == lines and writer.written == 2000
    writer.close()
    os.close(r)


def test_a_full_queue_drops_and_counts_and_put_never_waits_for_a_stalled_pipe():
    writer, r = pipe_writer(capacity=1000)
    line = "x" * 200 + "\n"
    t = time.perf_counter()
    for _ in range(50000):  # the pipe (64 KiB) fills: the thread blocks in write(), the queue fills
        writer.put(line)
    took = time.perf_counter() - t
    assert took < 1.0, took
    assert writer.dropped_full > 40000
    assert not writer.flush(0.2)  # stalled: the flush gives up at its bound
    data = read_pipe(r)
    assert data and writer.flush(10)
    got = data + read_pipe(r, 1)
    assert writer.written + writer.dropped_full == 50000
    assert got.count(b"\n") == writer.written
    writer.close()
    os.close(r)


def test_a_writer_stalled_on_a_full_pipe_does_not_stall_the_event_loop():
    writer, r = pipe_writer(capacity=4096)
    line = "y" * 300 + "\n"

    async def main():
        loop = asyncio.get_running_loop()
        worst = 0.0
        for _ in range(100):
            t = loop.time()
            for _ in range(500):
                writer.put(line)
            await asyncio.sleep(0.001)
            worst = max(worst, loop.time() - t)
        return worst
    worst = asyncio.run(main())
    assert worst < 0.1, worst
    assert writer.dropped_full > 0
    read_pipe(r)
    writer.close()
    os.close(r)


def test_file_output_appends_and_follows_a_logrotate_create_rotation(tmp_path: Path):
    path = tmp_path / "access.log"
    writer = LogWriter(reopen_check=0.0)
    writer.output = str(path)
    writer.put('{"n":1}\n')
    assert writer.flush(5)
    path.rename(tmp_path / "access.log.1")  # logrotate: rename, then `create` (or not: we create it)
    time.sleep(0.01)
    writer.put('{"n":2}\n')
    assert writer.flush(5)
    writer.put('{"n":3}\n')
    assert writer.flush(5)
    rotated = (tmp_path / "access.log.1").read_text().splitlines()
    current = path.read_text().splitlines()
    assert rotated[0] == '{"n":1}' and current[-1] == '{"n":3}' and len(rotated) + len(current) == 3
    assert path.stat().st_mode & 0o777 == 0o640 & ~_umask()
    writer.close()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_an_output_that_cannot_be_opened_drops_lines_as_write_errors(tmp_path: Path, caplog):
    writer = LogWriter()
    writer.output = str(tmp_path / "missing-dir" / "access.log")
    for _ in range(5):
        writer.put("{}\n")
    assert writer.flush(5)
    assert writer.dropped_error == 5 and writer.written == 0
    assert any("cannot open" in r.getMessage() for r in caplog.records)
    writer.close()


# ------------------------------------------------------------------ the loop's side, metrics
def test_attach_follows_the_snapshot_and_counters_are_exposed_and_merge_across_workers(tmp_path: Path):
    state = AgentState()
    registry = CollectorRegistry()
    al = AccessLog(registry, state, node=NODE)

    class Holder:
        access_log = "unset"
    h = Holder()
    al.attach(h)
    assert h.access_log is None
    state.apply(snap(meshconfig(str(tmp_path / "a.log"))))
    assert h.access_log is al and al.writer.output == str(tmp_path / "a.log")
    state.apply(snap(meshconfig(str(tmp_path / "a.log"), 0)))  # logs nothing: off, zero cost
    assert h.access_log is None
    al.writer.written, al.writer.dropped_full = 7, 2
    text = generate_latest(registry).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("hostmesh_agent_access_log_written_total", ())] == 7
    assert samples[("hostmesh_agent_access_log_dropped_total", (("reason", "queue_full"),))] == 2
    merged = {m.name: m for m in wire.merge([wire.families(registry), wire.families(registry)])}
    assert merged["hostmesh_agent_access_log_written"].samples[0].value == 14


# ------------------------------------------------------------------ through the drivers
def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_http1_requests_local_replies_and_bad_requests_each_get_one_line(tmp_path: Path):
    from tests.test_l7_http1_proxy import LO, NS, VIP, Proxy, Upstream, get, raw, route, run, service
    out = tmp_path / "access.log"

    async def main():
        up = await Upstream("a").start()
        rt = route("only-a", {"parentRefs": [{"name": "web", "kind": "Service", "group": ""}],
                              "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/routed"}}],
                                         "backendRefs": [{"name": "web", "port": 80}]}]})
        rest = route("rest", {"parentRefs": [{"name": "web", "kind": "Service", "group": ""}],
                              "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]})
        snapshot = NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),), (),
                                (rt, rest, meshconfig(str(out)),
                                 telemetry("quiet", NS, target={"group": "gateway.networking.k8s.io",
                                                                "kind": "HTTPRoute", "name": "only-a"},
                                           disabled=True)))
        px = await Proxy(snapshot).start()
        state = AgentState()
        state.apply(snapshot)
        al = AccessLog(None, state, node=NODE)
        al.attach(px.inputs)
        for i in range(5):
            status, _, _ = await asyncio.to_thread(get, px.port, f"/item/{i}?q=1",
                                                   {"x-request-id": f"req-{i}", "user-agent": "t/1"})
            assert status == 200
        status, _, _ = await asyncio.to_thread(get, px.port, "/routed/x", {"x-request-id": "silent"})
        assert status == 200  # served, not logged: its route's Telemetry is disabled
        await raw(px.port, b"GET / HTTP/1.1\r\nHost: web\r\nBad Header\r\n\r\n")
        await asyncio.to_thread(get, px.port, "/no-id")
        assert await asyncio.to_thread(al.flush, 5)
        px.close()
        up.close()
    run(main())
    lines = read_lines(out)
    assert [ln["request_id"] for ln in lines[:5]] == [f"req-{i}" for i in range(5)]
    for i, ln in enumerate(lines[:5]):
        assert (ln["method"], ln["path"], ln["response_code"], ln["response_flags"]) == ("GET", f"/item/{i}?q=1", 200,
                                                                                       "-")
        assert ln["protocol"] == "HTTP/1.1" and ln["user_agent"] == "t/1" and ln["reporter"] == "source"
        assert ln["upstream_host"].startswith(LO + ":") and ln["downstream_local_address"] == f"{VIP}:80"
        assert ln["destination_service"] == "web.shop.svc.cluster.local" and ln["route_name"] == "HTTPRoute/shop/rest#0"
    bad, no_id = lines[5], lines[6]
    assert bad["response_code"] == 400 and bad["response_flags"] == "DPE" and bad["method"] is None
    assert no_id["path"] == "/no-id" and len(no_id["request_id"]) == 36  # the one the proxy added
    assert len(lines) == 7 and not any(ln["request_id"] == "silent" for ln in lines)


def test_http2_streams_get_one_line_each_and_sampling_zero_none(tmp_path: Path):
    from tests.test_l7_http2_proxy import H2Client, Proxy, Upstream, run, service
    from tests.test_l7_http2_proxy import VIP as VIP2
    out = tmp_path / "access.log"

    async def main():
        up = await Upstream("a").start()
        snapshot = NodeSnapshot(NODE, (service("web", VIP2, [up.endpoint()]),), (), (meshconfig(str(out)),))
        px = await Proxy(snapshot).start()
        state = AgentState()
        state.apply(snapshot)
        al = AccessLog(None, state, node=NODE)
        al.attach(px.inputs)
        c = await H2Client.connect(px.port)
        replies = await asyncio.gather(*(c.get(f"/s/{i}", headers=[(b"x-request-id", b"h2-%d" % i)])
                                         for i in range(8)))
        assert {r.status for r in replies} == {200}
        state.apply(NodeSnapshot(NODE, snapshot.services, (), (meshconfig(str(out), 0),)))
        assert px.inputs.access_log is None
        assert (await c.get("/unlogged")).status == 200
        c.close()
        assert await asyncio.to_thread(al.flush, 5)
        px.close()
        up.close()
    run(main())
    lines = read_lines(out)
    assert sorted(ln["request_id"] for ln in lines) == sorted(f"h2-{i}" for i in range(8))
    assert all(ln["protocol"] == "HTTP/2" and ln["method"] == "GET" and ln["response_code"] == 200
               and ln["path"] == "/s/" + ln["request_id"][3:] for ln in lines)


def test_tcp_connections_and_refusals_get_one_line_each(tmp_path: Path):
    from tests.test_proxy_relay import LO, VIP, Proxy, echo_handler, run, service_snapshot, start_server
    out = tmp_path / "access.log"

    async def main():
        server, port = await start_server(echo_handler)
        base = service_snapshot(port)
        snapshot = NodeSnapshot(NODE, base.services, base.workloads, (meshconfig(str(out)),))
        state_for_log = AgentState()
        state_for_log.apply(snapshot)
        al = AccessLog(None, state_for_log, node=NODE)
        async with Proxy(snapshot, access_log=al) as px:
            for i in range(3):
                r, w = await px.connect()
                w.write(b"hello%d" % i)
                w.write_eof()
                assert await r.read() == b"hello%d" % i
                w.close()
            px.dst = ("198.19.9.9", 80)  # unknown: passthrough to an address nobody listens on
            px.listener.destinations.unknown_destination = "refuse"
            r, w = await px.connect()
            with pytest.raises(ConnectionResetError):  # refused: RST
                await r.read()
            w.close()
            await px.settle(0)
        assert await asyncio.to_thread(al.flush, 5)
        server.close()
    run(main())
    lines = read_lines(out)
    tcp = [ln for ln in lines if ln["response_flags"] == "-"]
    assert len(tcp) == 3 and all(ln["bytes_received"] == 6 and ln["bytes_sent"] == 6 and ln["protocol"] is None
                                 and ln["upstream_host"] == f"{LO}:{_port(ln)}" for ln in tcp)
    assert all(ln["request_protocol"] == "tcp" and ln["downstream_remote_address"].startswith(LO) for ln in tcp)
    refused = [ln for ln in lines if ln["response_flags"] == "NR"]
    assert len(refused) == 1 and refused[0]["upstream_host"] is None and len(lines) == 4
    assert VIP  # the connections went to the VIP of the snapshot


def _port(line: dict) -> str:
    return line["upstream_host"].rsplit(":", 1)[1]


def test_a_background_thread_is_started_only_once_lines_flow():
    state = AgentState()
    before = {t.name for t in threading.enumerate()}
    AccessLog(None, state, node=NODE)
    state.apply(snap(meshconfig("/tmp/never-written.log")))
    assert {t.name for t in threading.enumerate()} == before


def test_a_node_proxy_drain_ends_with_the_queued_lines_written(tmp_path: Path):
    from nodeagent.proxy import NodeProxy, ProxyInputs
    from nodeagent.telemetry import ProxyMetrics
    out = tmp_path / "access.log"

    async def main():
        state = AgentState()
        state.apply(snap(meshconfig(str(out))))
        al = AccessLog(None, state, node=NODE)
        proxy = NodeProxy(ProxyInputs(state=state, node=NODE, metrics=ProxyMetrics(CollectorRegistry()),
                                      access_log=al), host="127.0.0.1", outbound_port=0, inbound_port=0)
        await proxy.start()
        for i in range(1000):
            al.writer.put(json.dumps({"n": i}) + "\n")
        await proxy.drain(1)
    asyncio.run(main())
    assert len(read_lines(out)) == 1000
