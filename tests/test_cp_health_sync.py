"""Endpoint health shared by control-plane replicas through etcd (controlplane/healthsync.py)
and the disconnect grace of a report (controlplane/health.py).

The merge, expiry, validation and the writes owed to etcd are plain objects, tested first
without etcd. Then the process: the file source's grace end to end on loopback, and (when
etcd-server is installed) two replicas on a real etcd, one of them a separate process that
is SIGKILLed."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from aetcd import rpc
from prometheus_client import CollectorRegistry, generate_latest

from controlplane.health import ENDPOINT_HEALTH, HealthStore, SharedReport
from controlplane.healthsync import (MAX_SHARED_ENTRIES, HealthDelete, HealthMetrics, HealthPut, HealthSyncState,
                                     HealthWrites, decode_report, encode_report, health_key, health_prefix)
from controlplane.process import ControlPlane, Etcd
from controlplane.sources import load_directory
from controlplane.sources.etcd import EtcdConfigState, config_prefix, split_key
from meshlab.etcdserver import ETCD, EtcdServer, free_port
from nodeagent.cpclient import ControlPlaneClient
from nodeagent.state import AgentState
from tests.conftest import IN_CI
from tests.sourcetools import until

pytestmark = pytest.mark.timeout(90)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "config"
P = "/hostmesh/"
NODE1_POD = ("198.18.1.1", 8080)   # web's endpoint on node1 (examples/config/workloads.yaml)
NODE2_POD = ("198.18.2.1", 8080)
WEB = "default/web"
K1 = (*NODE1_POD, WEB)
K2 = (*NODE2_POD, WEB)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def model():
    return load_directory(str(EXAMPLES)).model


def shared(keys, replica="cp1", revision=7) -> SharedReport:
    return SharedReport(frozenset(keys), replica, "2024-05-01T10:00:00Z", revision)


def kv(key: str, value: bytes, revision: int = 5) -> rpc.KeyValue:
    return rpc.KeyValue(key=key.encode(), value=value, mod_revision=revision)


def put_event(key: str, value: bytes, revision: int = 5) -> rpc.Event:
    return rpc.Event(type=rpc.Event.PUT, kv=kv(key, value, revision))


def delete_event(key: str) -> rpc.Event:
    return rpc.Event(type=rpc.Event.DELETE, kv=rpc.KeyValue(key=key.encode()))


def value(node: str, keys, replica: str = "cp1") -> bytes:
    return encode_report(node, keys, replica, 1714557600.0)


# ---------------------------------------------------------------------- the store: merge and grace
def test_a_live_local_report_wins_then_another_replicas_entry_then_the_graced_report(model):
    clock = Clock()
    store = HealthStore("cp0", disconnect_grace=30, clock=clock)
    assert store.report("node1", [K1], model, stream=4)
    assert store.set_shared("node1", shared([], replica="cp1")) is False   # the local stream is open: it wins
    assert store.unhealthy("node1") == {K1}
    assert store.stream_ended("node1", 4)    # stream over: cp1 heard from the agent after us
    assert store.unhealthy("node1") == frozenset()
    assert store.set_shared("node1", shared([K1], replica="cp0"))  # our own write echoed: the graced report
    assert store.unhealthy("node1") == {K1}
    assert store.describe_sources()["node1"]["local"]["connected"] is False
    clock.now += 30
    assert store.expire() == ["node1"]
    # only our own (old) etcd entry is left: it counts until etcd deletes it
    assert store.unhealthy("node1") == {K1} and store.local("node1") is None
    assert store.set_shared("node1", None) and store.config_objects(model) == ()


def test_the_grace_starts_only_when_the_reporting_stream_ends(model):
    clock = Clock()
    store = HealthStore(disconnect_grace=10, clock=clock)
    store.report("node1", [K1], model, stream=1)
    assert not store.stream_ended("node1", 2)        # another stream of the node (a hand-off overlap)
    clock.now += 60
    assert store.expire() == [] and store.unhealthy("node1") == {K1}
    store.stream_ended("node1", 1)
    clock.now += 9.9
    assert store.expire() == []
    store.report("node1", [K1], model, stream=3)       # the agent is back and still finds it down
    clock.now += 60
    assert store.expire() == [] and store.unhealthy("node1") == {K1}
    store.stream_ended("node1", 3)
    v = store.version
    clock.now += 10
    assert store.expire() == ["node1"] and store.version > v
    assert store.config_objects(model) == () and store.counts() == {"local": 0, "etcd": 0}


def test_an_empty_report_on_an_open_stream_overrides_another_replicas_entry(model):
    store = HealthStore("cp0")
    store.set_shared("node1", shared([K1], replica="cp1"))
    assert store.unhealthy("node1") == {K1}
    assert store.report("node1", [], model, stream=1)
    assert store.unhealthy("node1") == frozenset()
    assert store.counts() == {"local": 1, "etcd": 1}


def test_endpoints_are_checked_against_the_current_model(model):
    store = HealthStore("cp0")
    store.set_shared("node1", shared([K1, K2, ("10.9.9.9", 80, WEB), (*NODE1_POD, "default/nope")]))
    (obj,) = store.config_objects(model)
    # node2's pod is not node1's to report, 10.9.9.9 is no Workload, default/nope no Service
    assert json.loads(obj.spec) == {"unhealthy": [list(K1)]} and store.published_endpoints == 1
    smaller = load_directory(str(EXAMPLES)).model
    without_node1 = type(smaller)(tuple(o for o in smaller.objects
                                        if not (o.kind == "Workload" and o.spec_view.get("node") == "node1")))
    assert store.config_objects(without_node1) == () and store.published_endpoints == 0
    assert store.config_objects(model) == (obj,)


def test_the_objects_are_made_once_per_change(model):
    store = HealthStore()
    store.report("node1", [K1], model, stream=1)
    first = store.config_objects(model)
    assert store.config_objects(model) is first
    store.report("node1", [], model, stream=1)
    assert store.config_objects(model) == ()


# ---------------------------------------------------------------------- values in etcd
def test_encode_and_decode_round_trip():
    data = value("node1", [K1, K2], "cp0")
    node, report, why = decode_report(P, health_key(P, "node1"), data, 12)
    assert (node, why) == ("node1", "")
    assert report.keys == {K1, K2} and report.replica == "cp0" and report.revision == 12
    assert report.reported_at == "2024-05-01T10:00:00Z"
    doc = json.loads(data)
    assert doc["unhealthy"] == sorted([list(K1), list(K2)]) and doc["node"] == "node1"


def test_a_report_past_the_entry_bound_is_cut_to_fit():
    keys = [(f"10.0.{i // 250}.{i % 250}", 80, WEB) for i in range(MAX_SHARED_ENTRIES + 10)]
    _, report, why = decode_report(P, health_key(P, "n"), encode_report("n", keys, "cp0", 0), 1)
    assert why == "" and len(report.keys) == MAX_SHARED_ENTRIES


@pytest.mark.parametrize("key,data,expect", [
    ("/hostmesh/health/", b"{}", "not a health key"),
    ("/hostmesh/health/a/b", b"{}", "not a health key"),
    ("/hostmesh/health/a b", b"{}", "not a health key"),
    ("/hostmesh/health/n1", b"\xff\xfe", "not JSON"),
    ("/hostmesh/health/n1", b"{not json", "not JSON"),
    ("/hostmesh/health/n1", b"[]", "not a JSON object"),
    ("/hostmesh/health/n1", b'{"node": "n2", "replica": "cp0", "unhealthy": []}', "names node 'n2'"),
    ("/hostmesh/health/n1", b'{"unhealthy": []}', "replica: missing"),
    ("/hostmesh/health/n1", b'{"replica": "cp0"}', "unhealthy: missing"),
    ("/hostmesh/health/n1", b'{"replica": "cp0", "reportedAt": 5, "unhealthy": []}', "reportedAt: not a string"),
    ("/hostmesh/health/n1", b'{"replica": "cp0", "unhealthy": [["nope", 80, "a/b"]]}', "unhealthy[0]: address"),
    ("/hostmesh/health/n1", b'{"replica": "cp0", "unhealthy": [["10.0.0.1", true, "a/b"]]}', "port True"),
    ("/hostmesh/health/n1", b'{"replica": "cp0", "unhealthy": [["10.0.0.1", 70000, "a/b"]]}', "port 70000"),
    ("/hostmesh/health/n1", b'{"replica": "cp0", "unhealthy": [["10.0.0.1", 80, "web"]]}', "namespace/name"),
    ("/hostmesh/health/n1", b'{"replica": "cp0", "unhealthy": [["10.0.0.1", 80]]}', "not [address"),
    ("/hostmesh/health/n1", b'{"replica": "cp0", "unhealthy": {}}', "not a list"),
    ("/hostmesh/health/n1", json.dumps({"replica": "cp0", "unhealthy": [["10.0.0.1", 80, "a/b"]] * 5000}).encode(),
     "over the 4096 allowed"),
    ("/hostmesh/health/n1", b" " * ((1 << 20) + 1), "bytes, over"),
])
def test_malformed_values_are_refused_with_the_reason(key, data, expect):
    _, report, why = decode_report(P, key, data, 3)
    assert report is None and expect in why


def test_random_values_never_raise():
    rnd = random.Random(14)
    pieces = [b"{", b"}", b"[", b"]", b'"unhealthy"', b'"replica"', b":", b",", b"1", b'"x"', b"null", b"\xff"]
    for _ in range(2000):
        data = b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(12)))
        _, report, why = decode_report(P, health_key(P, "n"), data, 1)
        assert (report is None) == bool(why)


def test_the_config_source_never_reads_the_health_prefix(model):
    key = health_key(P, "node1")
    assert key == "/hostmesh/health/node1" and health_prefix("/hostmesh") == "/hostmesh/health/"
    assert not key.startswith(config_prefix(P)) and split_key(P, key) is None
    assert not config_prefix(P).startswith(health_prefix(P)) and not health_prefix(P).startswith(config_prefix(P))
    # even fed one (it is never listed or watched), the config state would skip it as corrupt, not load it
    state = EtcdConfigState(P)
    state.reset(3, [kv(key, value("node1", [K1]))])
    assert len(state.load().model) == 0 and key in state.corrupt


# ---------------------------------------------------------------------- reading etcd (no I/O)
def test_the_sync_state_feeds_the_store_and_skips_bad_values_once(model, caplog):
    store = HealthStore("cp0")
    state = HealthSyncState(store, P)
    good, bad = health_key(P, "node1"), health_key(P, "node2")
    assert state.reset(10, [kv(good, value("node1", [K1])), kv(bad, b"garbage", 9)]) == 1
    assert store.unhealthy("node1") == {K1} and set(state.skipped) == {bad}
    assert "malformed endpoint health value in etcd skipped" in caplog.text
    assert state.reset(11, [kv(good, value("node1", [K1])), kv(bad, b"garbage", 9)]) == 0  # same value: once
    assert state.apply(12, [put_event(bad, value("node2", [K2]), 12)]) == 0
    assert store.unhealthy("node2") == {K2} and not state.skipped
    # a value that turns bad drops the node's entry (no trustworthy word: fail open)
    assert state.apply(13, [put_event(good, b'{"replica": 1}', 13)]) == 1
    assert store.unhealthy("node1") == frozenset()
    assert state.apply(14, [delete_event(bad), delete_event(good), delete_event(health_key(P, "a/b"))]) == 0
    assert store.shared_count() == 0 and not state.skipped and state.revision == 14


def test_the_sync_state_holds_at_most_max_nodes(model):
    store = HealthStore("cp0")
    state = HealthSyncState(store, P, max_nodes=2)
    kvs = [kv(health_key(P, f"n{i}"), value(f"n{i}", [])) for i in range(3)]
    assert state.reset(5, kvs) == 1 and store.shared_count() == 2
    assert state.apply(6, [put_event(health_key(P, "n9"), value("n9", []), 6)]) == 1
    assert store.shared(health_key(P, "n9")) is None and store.shared_count() == 2
    assert state.apply(7, [put_event(health_key(P, "n0"), value("n0", [K1]), 7)]) == 0  # a known node: fine


# ---------------------------------------------------------------------- writes owed (no I/O)
def test_writes_put_live_reports_and_delete_only_our_own_expired_ones(model):
    clock = Clock()
    store = HealthStore("cp0", disconnect_grace=5, clock=clock)
    writes = HealthWrites(store, P)
    store.report("node1", [K1], model, stream=1)
    writes.mark("node1")
    puts, deletes = writes.take()
    assert [p.node for p in puts] == ["node1"] and deletes == []
    assert json.loads(puts[0].value)["replica"] == "cp0" and puts[0].key == "/hostmesh/health/node1"
    writes.put_done(puts, 41)
    store.stream_ended("node1", 1)
    writes.mark("node1")
    assert writes.take() == ([], [])             # in its grace: the key stays as written
    clock.now += 5
    store.expire()
    writes.mark("node1")
    assert writes.take() == ([], [HealthDelete("node1", "/hostmesh/health/node1", 41)])
    writes.delete_done(HealthDelete("node1", "/hostmesh/health/node1", 41))
    writes.mark("node1")
    assert writes.take() == ([], []) and writes.written("node1") is None  # never written: nothing to delete


def test_a_lost_lease_rewrites_only_open_streams_reports(model):
    store = HealthStore("cp0", disconnect_grace=5, clock=Clock())
    writes = HealthWrites(store, P)
    store.report("node1", [K1], model, stream=1)
    store.report("node2", [K2], model, stream=2)
    store.stream_ended("node2", 2)
    writes.put_done([HealthPut("node1", "k", b""), HealthPut("node2", "k", b"")], 8)
    writes.lease_lost()
    puts, deletes = writes.take()
    assert [p.node for p in puts] == ["node1"] and deletes == [] and writes.written("node2") is None


def test_metrics_on_the_injected_registry(model):
    registry = CollectorRegistry()
    store = HealthStore("cp0")
    metrics = HealthMetrics(registry, store, etcd=True)
    store.report("node1", [K1], model, stream=1)
    store.set_shared("node2", shared([K2], replica="cp1"))
    store.config_objects(model)
    metrics.skipped.inc()
    text = generate_latest(registry).decode()
    assert 'hostmesh_controlplane_health_reports{source="local"} 1.0' in text
    assert 'hostmesh_controlplane_health_reports{source="etcd"} 1.0' in text
    assert "hostmesh_controlplane_health_unhealthy_endpoints 2.0" in text
    assert "hostmesh_controlplane_health_skipped_values_total 1.0" in text
    assert "hostmesh_controlplane_health_etcd_synced 0.0" in text
    assert "hostmesh_controlplane_health_reports_expired_total 0.0" in text


# ---------------------------------------------------------------------- the process, files source
def health_objects(state: AgentState) -> list:
    snap = state.snapshot
    return [c for c in snap.config if c.kind == ENDPOINT_HEALTH] if snap is not None else []


def agent(address: str, node: str) -> tuple[ControlPlaneClient, AgentState]:
    state = AgentState()
    return ControlPlaneClient(address, node, state, None, CollectorRegistry(), backoff_initial=0.05,
                              backoff_max=0.2), state


async def stop_tasks(*tasks) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_files_source_a_stopped_agents_report_lapses_after_the_grace(tmp_path):
    async def scenario():
        cp = ControlPlane(str(EXAMPLES), grpc_address="127.0.0.1:0", http_host="127.0.0.1", http_port=0,
                          health_grace=1.0)
        task = asyncio.create_task(cp.run())
        assert await until(lambda: cp.grpc.port is not None and cp.model is not None)
        address = f"127.0.0.1:{cp.grpc.port}"
        (c1, s1), (c2, s2) = agent(address, "node1"), agent(address, "node2")
        r2 = asyncio.create_task(c2.run())
        r1 = asyncio.create_task(c1.run())
        try:
            assert await until(lambda: s1.snapshot is not None and s2.snapshot is not None)
            c1.report_health(frozenset({K1}))
            assert await until(lambda: health_objects(s2))
            await stop_tasks(r1)       # node1's agent stops: its report stands for the grace, then lapses
            await asyncio.sleep(0.5)
            assert health_objects(s2) and cp.health.describe_sources()["node1"]["local"]["connected"] is False
            assert await until(lambda: not health_objects(s2), 3)
            assert cp.health.local("node1") is None
            assert "hostmesh_controlplane_health_reports_expired_total 1.0" in generate_latest(cp.registry).decode()
            # an agent that comes back within the grace and still finds it down keeps it
            (c1, s1) = agent(address, "node1")
            c1.report_health(frozenset({K1}))
            r1 = asyncio.create_task(c1.run())
            assert await until(lambda: health_objects(s2))
            await stop_tasks(r1)
            (c1, s1) = agent(address, "node1")
            c1.report_health(frozenset({K1}))
            r1 = asyncio.create_task(c1.run())
            await asyncio.sleep(1.5)
            assert health_objects(s2) and cp.health.local("node1").live
            view = json.loads(cp._health_view("detail=1").body)
            assert view["nodes"]["node1"]["source"] == "local" and view["etcd"] is None
        finally:
            await stop_tasks(r1, r2)
            cp._stop.set()
            await asyncio.wait_for(task, 10)

    asyncio.run(scenario())


# ---------------------------------------------------------------------- two replicas on a real etcd
@pytest.fixture
def etcd(tmp_path):
    if not os.path.exists(ETCD):
        if IN_CI:
            pytest.fail("etcd is not installed, and CI=true: ./quickstart installs etcd-server")
        pytest.skip("etcd is not installed (Debian package etcd-server)")
    with EtcdServer(tmp_path / "etcd") as server:
        yield server


def replica(server, name: str, grace: float = 30.0) -> ControlPlane:
    return ControlPlane(None, grpc_address="127.0.0.1:0", http_host="127.0.0.1", http_port=0, health_grace=grace,
                        etcd=Etcd(endpoints=[server.endpoint], prefix=P, replica=name, lease_ttl=2))


async def etcd_value(client, key: str) -> dict | None:
    got = await client.get(key)
    return json.loads(got.value) if got is not None else None


def test_a_report_to_one_replica_reaches_agents_of_another_and_moves_with_the_agent(etcd):
    from controlplane.apply import apply_directory
    from controlplane.etcd import EtcdClient

    async def scenario():
        c = EtcdClient([etcd.endpoint], timeout=2.0)
        await apply_directory(c, str(EXAMPLES), prefix=P)
        cps = [replica(etcd, "cp0", grace=1.0), replica(etcd, "cp1", grace=1.0)]
        tasks = [asyncio.create_task(cp.run()) for cp in cps]
        runs = []
        try:
            assert await until(lambda: all(cp.grpc.port is not None and cp.model is not None for cp in cps))
            addr = [f"127.0.0.1:{cp.grpc.port}" for cp in cps]
            (c1, s1), (c2, s2) = agent(addr[0], "node1"), agent(addr[1], "node2")
            runs = [asyncio.create_task(c1.run()), asyncio.create_task(c2.run())]
            assert await until(lambda: s1.snapshot is not None and s2.snapshot is not None)
            c1.report_health(frozenset({K1}))
            assert await until(lambda: health_objects(s2), 5)      # node2's agent is on cp1
            (obj,) = health_objects(s2)
            assert json.loads(obj.spec) == {"unhealthy": [list(K1)]}
            stored = await etcd_value(c, "/hostmesh/health/node1")
            assert stored["replica"] == "cp0" and stored["unhealthy"] == [list(K1)]
            assert (await c.get("/hostmesh/health/node1")).lease != 0
            assert cps[1].health.describe_sources()["node1"]["source"] == "etcd"
            assert cps[0].source.describe()["skipped"] == []   # the config source never sees the health keys
            # node1's agent moves to cp1 and reports there: the key is cp1's, cp0's grace deletes nothing
            await stop_tasks(runs[0])
            (c1, s1) = agent(addr[1], "node1")
            c1.report_health(frozenset({K1}))
            runs[0] = asyncio.create_task(c1.run())
            assert await until(lambda: cps[1].health.local("node1") is not None, 5)
            assert await until(lambda: cps[0].health.local("node1") is None, 5)   # cp0's grace ended
            await asyncio.sleep(0.3)
            stored = await etcd_value(c, "/hostmesh/health/node1")
            assert stored is not None and stored["replica"] == "cp1"
            assert health_objects(s2) and cps[0].health.unhealthy("node1") == {K1}
            # recovery on cp1 reaches everyone; a malformed value is skipped and counted
            c1.report_health(frozenset())
            assert await until(lambda: not health_objects(s2) and not cps[0].health.unhealthy("node1"), 5)
            await c.put("/hostmesh/health/bogus", b"{oops")
            assert await until(lambda: "/hostmesh/health/bogus" in cps[0].health_sync.state.skipped, 5)
            assert "hostmesh_controlplane_health_skipped_values_total 1.0" in generate_latest(cps[0].registry).decode()
            assert "hostmesh_controlplane_health_etcd_synced 1.0" in generate_latest(cps[0].registry).decode()
            # node1's agent stops for good: after the grace cp1 deletes its key
            await stop_tasks(runs[0])
            assert await until(lambda: cps[1].health.local("node1") is None, 5)
            assert await until(lambda: cps[1].health.shared("node1") is None, 5)
            assert await c.get("/hostmesh/health/node1") is None
        finally:
            await stop_tasks(*runs)
            for cp in cps:
                cp._stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 15)
            await c.close()

    asyncio.run(scenario())


def test_a_killed_replicas_entries_vanish_with_its_lease(etcd, tmp_path):
    """cp0 is a separate process (SIGKILLed: no clean stop, its lease just stops being
    refreshed); node1's agent only knows cp0, node2's is on the in-process cp1."""
    from controlplane.apply import apply_directory
    from controlplane.etcd import EtcdClient

    async def scenario():
        c = EtcdClient([etcd.endpoint], timeout=2.0)
        await apply_directory(c, str(EXAMPLES), prefix=P)
        grpc_port, http_port = free_port(), free_port()
        log = open(tmp_path / "cp0.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "hostmesh.cli", "controlplane", "--etcd", etcd.endpoint,
                                 "--replica", "cp0", "--leader-ttl", "2", "--insecure",
                                 "--grpc-address", f"127.0.0.1:{grpc_port}",
                                 "--http-address", f"127.0.0.1:{http_port}"],
                                stdout=log, stderr=log, start_new_session=True)
        cp1 = replica(etcd, "cp1")
        task = asyncio.create_task(cp1.run())
        runs = []
        try:
            assert await until(lambda: cp1.grpc.port is not None and cp1.model is not None)
            (c1, s1), (c2, s2) = agent(f"127.0.0.1:{grpc_port}", "node1"), agent(f"127.0.0.1:{cp1.grpc.port}", "node2")
            runs = [asyncio.create_task(c1.run()), asyncio.create_task(c2.run())]
            assert await until(lambda: s1.snapshot is not None and s2.snapshot is not None, 30), \
                (tmp_path / "cp0.log").read_text()[-2000:]
            c1.report_health(frozenset({K1}))
            assert await until(lambda: health_objects(s2), 5)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            killed = asyncio.get_running_loop().time()
            assert await until(lambda: not health_objects(s2), 6)
            took = asyncio.get_running_loop().time() - killed
            assert took <= 2 + 1.5, took     # the lease TTL (2 s) plus a watch event and a push
            assert await c.get("/hostmesh/health/node1") is None
            assert cp1.health.describe() == {}
        finally:
            await stop_tasks(*runs)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            log.close()
            cp1._stop.set()
            await asyncio.wait_for(task, 15)
            await c.close()

    asyncio.run(scenario())


def test_a_lost_health_lease_is_granted_again_and_the_reports_rewritten(etcd):
    from controlplane.apply import apply_directory
    from controlplane.etcd import EtcdClient

    async def scenario():
        c = EtcdClient([etcd.endpoint], timeout=2.0)
        await apply_directory(c, str(EXAMPLES), prefix=P)
        cp = replica(etcd, "cp0")
        task = asyncio.create_task(cp.run())
        run = None
        try:
            assert await until(lambda: cp.grpc.port is not None and cp.model is not None)
            c1, s1 = agent(f"127.0.0.1:{cp.grpc.port}", "node1")
            c1.report_health(frozenset({K1}))
            run = asyncio.create_task(c1.run())
            assert await until(lambda: cp.health_sync.writes.written("node1") is not None, 5)
            first = (await c.get("/hostmesh/health/node1")).lease
            assert first == cp.health_sync.lease
            await c.revoke(first)              # as if etcd had expired it: the key goes with it
            assert await until(lambda: cp.health_sync.lease not in (0, first), 5)

            async def rewritten():
                got = await c.get("/hostmesh/health/node1")
                return got is not None and got.lease == cp.health_sync.lease
            for _ in range(100):
                if await rewritten():
                    break
                await asyncio.sleep(0.05)
            assert await rewritten()
            assert cp.health.unhealthy("node1") == {K1}
        finally:
            if run is not None:
                await stop_tasks(run)
            cp._stop.set()
            await asyncio.wait_for(task, 15)
            await c.close()

    asyncio.run(scenario())
