"""Proxy worker processes (nodeagent/workers.py, worker.py, worker_wire.py): the wire and
the metrics merge without I/O; then an agent with ``workers: 2`` on loopback (capture off,
no privileges): both workers accept on the same sockets, /metrics is one merged
exposition, a killed worker is restarted and the node's counters never go backwards, the
snapshot and JWKS reach every worker, and a hand-off passes the agent's sockets to a
successor that starts its own workers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from nodeagent import worker_wire as wire
from nodeagent.identity.mirror import IdentityMirror
from nodeagent.worker import bootstrap_from, bootstrap_to
from tests.test_handoff import Dialer, admin_json, agent_boot, free_ports, start_live

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------ no I/O

def test_frames_round_trip_and_bad_frames_raise_our_error():
    a, b = socket.socketpair()
    try:
        wire.send(a, {"type": "snapshot", "snapshot": {"x": [1, 2]}})
        assert wire.recv(b) == {"type": "snapshot", "snapshot": {"x": [1, 2]}}
        a.sendall(b"\x00\x00\x00\x03abc")
        with pytest.raises(wire.WorkerChannelError, match="unreadable"):
            wire.recv(b)
        a.sendall(b"\x00\x00\x00\x02[]")
        with pytest.raises(wire.WorkerChannelError, match="without a type"):
            wire.recv(b)
        a.sendall(b"\xff\xff\xff\xff")
        with pytest.raises(wire.WorkerChannelError, match="announced"):
            wire.recv(b)
        a.close()
        with pytest.raises(wire.WorkerChannelError, match="closed its channel"):
            wire.recv(b)
    finally:
        a.close()
        b.close()


def worker_registry(opened: int, active: int, latency: float) -> CollectorRegistry:
    r = CollectorRegistry()
    Counter("hm_opened", "opened", ["direction"], registry=r).labels("outbound").inc(opened)
    Gauge("hm_active", "active", registry=r).set(active)
    Histogram("hm_latency", "latency", buckets=(0.001, 0.01), registry=r).observe(latency)
    return r


def exposition(metrics) -> str:
    r = CollectorRegistry()

    class C:
        def collect(self):
            return metrics

    r.register(C())
    return generate_latest(r).decode()


def test_merge_sums_counters_gauges_and_histograms_and_drops_created():
    fams = [wire.families(worker_registry(3, 2, 0.0005)), wire.families(worker_registry(4, 1, 0.005))]
    assert not any(s[0].endswith("_created") for f in fams[0] for s in f["samples"])
    text = exposition(wire.merge(fams))
    assert 'hm_opened_total{direction="outbound"} 7.0' in text
    assert "hm_active 3.0" in text
    assert 'hm_latency_bucket{le="0.001"} 1.0' in text and 'hm_latency_bucket{le="0.01"} 2.0' in text
    assert "hm_latency_count 2.0" in text
    assert "_created" not in text


def test_the_event_loop_lag_merges_as_the_worst_process_not_the_sum():
    from nodeagent.telemetry import LoopLag, MetricsRegistry
    per_process = []
    for late in (0.002, 0.030, 0.010):  # the agent's loop, two workers'
        registry = MetricsRegistry()
        LoopLag(registry).observe(late)
        per_process.append(wire.families(registry))
    text = exposition(wire.merge(per_process))
    assert text.count("\nhostmesh_agent_event_loop_lag_seconds ") == 1
    assert "\nhostmesh_agent_event_loop_lag_seconds 0.03\n" in text


def test_retired_keeps_cumulative_samples_only():
    retired = wire.Retired()
    retired.add(wire.families(worker_registry(5, 9, 0.0005)))
    text = exposition(wire.merge([retired.as_families(), wire.families(worker_registry(1, 1, 0.0005))]))
    assert 'hm_opened_total{direction="outbound"} 6.0' in text
    assert "hm_active 1.0" in text  # a dead worker's gauge is gone with it
    assert "hm_latency_count 2.0" in text


def test_bootstrap_survives_the_trip_to_a_worker():
    from nodeagent.bootstrap import Bootstrap
    boot = Bootstrap(node="n", pod_cidrs=("10.0.0.0/24",), workers=3, capture_cgroups=("a", "b"))
    assert bootstrap_from(json.loads(json.dumps(bootstrap_to(boot)))) == boot


def test_identity_mirror_fails_closed_and_keeps_the_old_context_when_files_are_bad(tmp_path):
    from tests.tlsfixtures import TD, TestCA
    from nodeagent.identity import spiffe_id

    ca = TestCA(tmp_path / "ca")
    ident = spiffe_id(TD, "shop", "web")
    issued = ca.leaf(ident)
    d = tmp_path / "certs" / "web"
    d.mkdir(parents=True)
    (d / "cert-chain.pem").write_bytes(issued.chain.read_bytes())
    (d / "key.pem").write_bytes(issued.key.read_bytes())
    (d / "root-cert.pem").write_bytes(ca.bundle.read_bytes())
    now = [time.time()]
    mirror = IdentityMirror(clock=lambda: now[0])
    mirror.update(TD, [{"uri": ident.uri, "dir": str(d), "serial": "1", "not_after": now[0] + 100}])
    ctx = mirror.server_context(ident)
    assert ctx is not None and mirror.client_context(ident) is not None
    (d / "key.pem").write_text("garbage")
    mirror.update(TD, [{"uri": ident.uri, "dir": str(d), "serial": "2", "not_after": now[0] + 200}])
    assert mirror.server_context(ident) is ctx  # the new serial's files do not load: keep the old one
    now[0] += 150
    assert mirror.server_context(ident) is None  # expired: refused, never downgraded
    mirror.update(TD, [])
    assert mirror.client_context(ident) is None


# ------------------------------------------------------------------ an agent with two workers

def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def scrape(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    data = await reader.read()
    writer.close()
    return data.split(b"\r\n\r\n", 1)[1].decode()


async def knock(port: int, n: int) -> None:
    """Connections the workers accept and refuse (no original destination without capture)."""
    for _ in range(n):
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionResetError:
            continue  # on loopback the reset can beat connect()'s own completion
        try:
            await r.read()
        except ConnectionError:
            pass  # refused with a reset: the worker accepted and judged it
        w.close()


def worker_pids(agent) -> list[int]:
    return [w.pid for w in agent.pool.workers if w is not None and w.state == "serving"]


def test_two_workers_serve_one_node_and_a_dead_worker_comes_back(tmp_path):
    from nodeagent.agent import Agent

    ports = free_ports(3)

    async def main():
        agent, run = await start_live(Agent(agent_boot(tmp_path, ports, workers=2)))
        pids = worker_pids(agent)
        assert len(pids) == 2 and os.getpid() not in pids
        info = await admin_json(ports[2], "/server_info")
        assert info["workers"]["count"] == 2 and info["workers"]["mode"] == "processes"
        assert sorted(p["pid"] for p in info["workers"]["processes"]) == sorted(pids)
        await knock(ports[0], 40)
        text = await scrape(ports[2])
        accepted = metric(text, "hostmesh_tcp_connections_opened_total") + \
            metric(text, "hostmesh_agent_connections_rejected_total")
        assert accepted >= 40, text
        assert metric(text, "hostmesh_agent_workers_serving") == 2
        # one lag series: the worst of the agent's and the workers' loops (each runs its timer)
        assert text.count("# TYPE hostmesh_agent_event_loop_lag_seconds gauge") == 1, text
        assert len(re.findall(r"\nhostmesh_agent_event_loop_lag_seconds ", text)) == 1, text
        os.kill(pids[0], signal.SIGKILL)
        await knock(ports[0], 10)  # the other worker keeps serving meanwhile
        deadline = time.monotonic() + 30
        while len(worker_pids(agent)) < 2 or pids[0] in worker_pids(agent):
            assert time.monotonic() < deadline, "the dead worker was not started again"
            await asyncio.sleep(0.05)
        text2 = await scrape(ports[2])
        after = metric(text2, "hostmesh_tcp_connections_opened_total") + \
            metric(text2, "hostmesh_agent_connections_rejected_total")
        assert after >= accepted  # the dead worker's counters are kept
        assert metric(text2, "hostmesh_agent_worker_restarts_total") == 1
        agent._stop.set()
        assert await asyncio.wait_for(run, 30) == 0
        return pids

    pids = asyncio.run(main())
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_snapshot_changes_reach_every_worker(tmp_path):
    from nodeagent.agent import Agent
    from nodeagent.state import NodeSnapshot

    ports = free_ports(3)

    async def main():
        agent, run = await start_live(Agent(agent_boot(tmp_path, ports, workers=2)))
        from cryptography.hazmat.primitives.asymmetric import ec
        from jwt.algorithms import ECAlgorithm
        from nodeagent.state import Workload

        agent.state.apply(NodeSnapshot(node="n1", workloads=(
            Workload("web", "shop", "n1", "10.0.0.5", "web", (("app", "web"),)),)))
        jwk = {**json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())), "kid": "k"}
        assert agent.jwks.record_body("https://idp.example/jwks", json.dumps({"keys": [jwk]}).encode()) == "ok"
        version = agent.state.snapshot.version
        seen = [agent.pool._request(w, "describe") for w in agent.pool.workers]
        info = await admin_json(ports[2], "/config_dump")
        agent._stop.set()
        await asyncio.wait_for(run, 30)
        return seen, info, version

    seen, info, version = asyncio.run(main())
    assert [(r["snapshot_version"], r["jwks"]) for r in seen] == [(version, ["https://idp.example/jwks"])] * 2
    assert [w["snapshot_version"] for w in info["workers"]] == [version, version]


def test_a_handoff_between_agents_with_workers_refuses_nothing(tmp_path):
    from nodeagent.agent import Agent

    ports = free_ports(3)

    async def main():
        first, first_run = await start_live(Agent(agent_boot(tmp_path, ports, workers=2)))
        old_pids = worker_pids(first)
        dialer = Dialer(ports[0])
        second, second_run = await start_live(Agent(agent_boot(tmp_path, ports, workers=2)))
        assert await asyncio.wait_for(first_run, 30) == 0
        await asyncio.sleep(0.3)
        await dialer.stop()
        new_pids = worker_pids(second)
        text = await scrape(ports[2])
        second._stop.set()
        assert await asyncio.wait_for(second_run, 30) == 0
        return old_pids, new_pids, dialer.refused, dialer.dialed, text

    old_pids, new_pids, refused, dialed, text = asyncio.run(main())
    assert not refused and dialed > 10
    assert len(new_pids) == 2 and not set(old_pids) & set(new_pids)
    assert metric(text, "hostmesh_agent_handoffs_total") == 1
    for pid in old_pids:  # the predecessor's workers drained and exited
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
