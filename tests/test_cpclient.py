"""The discovery stream end to end on loopback: grpc.aio server + the agent's ControlPlaneClient.

No root, ephemeral ports, no timing assertions: every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import stat
import time

import grpc
import pytest
from prometheus_client import CollectorRegistry

from controlplane.api import STREAM_METHOD
from controlplane.api import discovery_pb2 as pb
from controlplane.cache import SnapshotCache, SnapshotRejected
from controlplane.grpcserver import DiscoveryServer, Keepalive, server_options
from controlplane.metrics import ControlPlaneMetrics
from controlplane.resources import split
from nodeagent import cpclient
from nodeagent.cpclient import ControlPlaneClient, backoff_delay, channel_options
from nodeagent.persist import SnapshotStore, snapshot_dict
from nodeagent.state import (
    AgentState,
    Endpoint,
    NodeSnapshot,
    Service,
    ServicePort,
    Workload,
)

NODE = "node-a"


def svc(i: int, endpoints: int = 2, name: str | None = None, vip: str | None = None) -> Service:
    return Service(name=name or f"svc{i}", namespace="default", cluster_ip=vip or f"198.19.0.{i + 1}",
                   ports=(ServicePort(port=80, target_port=8080),),
                   endpoints=tuple(Endpoint(address=f"198.18.{i}.{j + 1}", port=8080, node=NODE) for j in range(endpoints)))


def snap(*services: Service, workloads=(), node: str = NODE) -> NodeSnapshot:
    return NodeSnapshot(node=node, services=tuple(sorted(services, key=lambda s: s.name)),
                        workloads=tuple(workloads))


BASE = [svc(i) for i in range(6)]


def run(coro, timeout: float = 60):
    async def main():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


async def wait_until(pred, timeout: float = 15, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ControlPlane:
    """A cache + discovery server on loopback, inside the running test loop."""

    def __init__(self, check=None, **server_kw) -> None:
        self.metrics = ControlPlaneMetrics(CollectorRegistry())
        self.cache = SnapshotCache(consistency_check=check, metrics=self.metrics)
        self.server = DiscoveryServer(self.cache, self.metrics, **server_kw)
        self.port = 0

    async def start(self, port: int = 0) -> ControlPlane:
        self.port = await self.server.start(f"127.0.0.1:{port}")
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def publish(self, s: NodeSnapshot) -> NodeSnapshot:
        self.cache.set_snapshot(s.node, s)
        return s

    async def acked(self, s: NodeSnapshot, timeout: float = 15) -> None:
        assert await self.cache.wait_for_acks({s.node: s.version}, timeout), self.cache.status(s.node)

    def sample(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0


class RecordingClient(ControlPlaneClient):
    """Records every update received and every Hello sent."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.updates: list[pb.SnapshotUpdate] = []
        self.hellos: list[pb.Hello] = []

    async def _apply(self, update):
        self.updates.append(update)
        return await super()._apply(update)

    def _hello(self, **kw):
        msg = super()._hello(**kw)
        self.hellos.append(msg.hello)
        return msg


def make_client(address: str, tmp_path, *, state=None, validate=None, cls=RecordingClient, **kw):
    registry = CollectorRegistry()
    c = cls(address, NODE, state or AgentState(), SnapshotStore(tmp_path / "agent" / "snapshot.json"), registry,
            validate=validate, backoff_initial=0.05, backoff_max=0.3, **kw)
    c.registry = registry
    return c


def agent_sample(c, name: str) -> float:
    return c.registry.get_sample_value(name) or 0.0


def same_content(a: NodeSnapshot, b: NodeSnapshot) -> bool:
    return (sorted(a.services, key=lambda s: s.name) == sorted(b.services, key=lambda s: s.name)
            and set(a.workloads) == set(b.workloads) and set(a.config) == set(b.config))


async def stop_task(t: asyncio.Task) -> None:
    t.cancel()
    try:
        await t
    except asyncio.CancelledError:
        pass


# ------------------------------------------------------------------ options and helpers

def test_keepalive_and_message_size_options():
    srv = dict(server_options())
    assert srv["grpc.keepalive_time_ms"] > 0 and srv["grpc.keepalive_timeout_ms"] > 0
    assert srv["grpc.keepalive_permit_without_calls"] == 1
    assert srv["grpc.http2.max_pings_without_data"] == 0
    cli = dict(channel_options())
    assert cli["grpc.keepalive_permit_without_calls"] == 1 and cli["grpc.http2.max_pings_without_data"] == 0
    # the server must tolerate the agents' ping rate, or it answers GOAWAY too_many_pings
    assert cli["grpc.keepalive_time_ms"] >= srv["grpc.http2.min_ping_interval_without_data_ms"]
    assert cli["grpc.keepalive_time_ms"] >= Keepalive().min_client_ping_interval_ms
    # updates can carry big snapshots; what agents send is bounded
    assert srv["grpc.max_send_message_length"] == cli["grpc.max_receive_message_length"] >= 64 * 1024 * 1024
    assert cli["grpc.max_send_message_length"] <= srv["grpc.max_receive_message_length"] <= 64 * 1024 * 1024


def test_backoff_is_exponential_with_full_jitter():
    assert [backoff_delay(n, 0.2, 15, rand=lambda: 1.0) for n in range(9)] == \
        [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 15, 15]
    assert backoff_delay(5, 0.2, 15, rand=lambda: 0.0) == 0
    assert backoff_delay(10_000, 0.2, 15, rand=lambda: 1.0) == 15
    assert all(0 <= backoff_delay(4, 0.2, 15) <= 3.2 for _ in range(100))


# ------------------------------------------------------------------ sync, ACK, persistence

def test_agent_syncs_acks_persists_and_is_counted(tmp_path):
    async def main():
        cp = await ControlPlane().start()
        s1 = cp.publish(snap(*BASE, workloads=[Workload("w0", "default", NODE, "198.18.0.1",
                                                        labels=(("app", "w0"),))]))
        c = make_client(cp.address, tmp_path)
        task = asyncio.create_task(c.run())
        await cp.acked(s1)
        st = cp.cache.status(NODE)
        assert st["connected"] and st["in_sync"] and st["acked_version"] == s1.version
        assert st["peer"].startswith("ipv4:127.0.0.1:") and st["last_push_latency_seconds"] is not None
        taken = c.state.snapshot  # a connection in flight holds this object
        assert taken.version == s1.version and same_content(taken, s1)
        status = await wait_until(lambda: c.status()["connected"] and c.status(), what="client connected")
        assert status["acked_version"] == s1.version and not status["stale"] and status["stale_since"] is None
        assert status["snapshot_source"] == "controlplane"
        assert agent_sample(c, "hostmesh_agent_controlplane_connected") == 1
        assert agent_sample(c, "hostmesh_agent_config_stale") == 0
        assert agent_sample(c, "hostmesh_agent_snapshot_applies_total") == 1
        assert cp.sample("hostmesh_controlplane_agents_connected") == 1
        assert cp.sample("hostmesh_controlplane_pushes_total") == 1
        assert cp.sample("hostmesh_controlplane_push_bytes_total") > 0
        assert cp.sample("hostmesh_controlplane_push_latency_seconds_count") == 1

        # persisted atomically, private, and what it holds is what is in force
        path = tmp_path / "agent" / "snapshot.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert c.store.load().to_dict() == taken.to_dict()

        # an update: new snapshot in force, the one taken before is untouched
        s2 = cp.publish(snap(*BASE[:5], svc(5, endpoints=4)))
        await cp.acked(s2)
        assert c.state.snapshot.version == s2.version and same_content(c.state.snapshot, s2)
        assert taken.version == s1.version and same_content(taken, s1)
        assert [r.name for r in c.updates[-1].changed] == ["service/default/svc5"]
        assert list(c.updates[-1].removed) == ["workload/default/w0"]
        assert cp.sample("hostmesh_controlplane_push_latency_seconds_count") == 2
        await stop_task(task)
        await wait_until(lambda: cp.sample("hostmesh_controlplane_agents_connected") == 0, what="disconnect")
        assert not cp.cache.status(NODE)["connected"]
        await cp.server.stop(0)

    run(main())


def test_stale_persisted_snapshot_gets_only_the_differing_resources(tmp_path):
    async def main():
        old = snap(*BASE)
        store = SnapshotStore(tmp_path / "agent" / "snapshot.json")
        store.save(old, {n: v for n, (v, _) in split(old).items()})
        cp = await ControlPlane().start()
        new = cp.publish(snap(*BASE[1:5], svc(5, endpoints=3), svc(9)))
        c = make_client(cp.address, tmp_path)
        task = asyncio.create_task(c.run())
        await cp.acked(new)
        first = c.updates[0]
        assert sorted(r.name for r in first.changed) == ["service/default/svc5", "service/default/svc9"]
        assert list(first.removed) == ["service/default/svc0"]
        assert not first.full_state
        assert len(c.hellos[0].resource_versions) == len(BASE)  # small agent: versions inline
        assert same_content(c.state.snapshot, new) and c.state.snapshot.version == new.version
        await stop_task(task)
        await cp.server.stop(0)

    run(main())


def test_large_agent_hello_sends_a_digest_and_only_the_buckets_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(cpclient, "INLINE_VERSIONS_MAX", 0)
    many = [svc(i, endpoints=1, vip=f"198.19.{i // 200}.{i % 200 + 1}") for i in range(200)]

    async def main():
        store = SnapshotStore(tmp_path / "agent" / "snapshot.json")
        current = snap(*many)
        store.save(current, {n: v for n, (v, _) in split(current).items()})
        cp = await ControlPlane().start()
        cp.publish(current)
        # 1. holds exactly the current snapshot (a restarted control plane): recognised by digest
        c = make_client(cp.address, tmp_path)
        task = asyncio.create_task(c.run())
        await cp.acked(current)
        assert c.hellos[0].resource_digest and len(c.hellos[0].bucket_digests) == 64 * 8
        assert not c.hellos[0].resource_versions
        assert len(c.hellos) == 1 and len(c.updates) == 1 and not c.updates[0].changed
        await stop_task(task)
        await cp.server.stop(0)

        # 2. a new control plane whose config changed meanwhile: digest unknown -> it asks for
        #    the versions of the buckets that differ, then sends the delta
        cp = await ControlPlane().start()
        changed = cp.publish(snap(*many[:199], svc(7, endpoints=2, name="svc500", vip="198.19.9.9")))
        c = make_client(cp.address, tmp_path)
        task = asyncio.create_task(c.run())
        await cp.acked(changed)
        assert len(c.hellos) == 2
        uploaded = c.hellos[1].resource_versions
        assert 0 < len(uploaded) < len(many)  # only the differing buckets
        assert [r.name for r in c.updates[0].changed] == ["service/default/svc500"]
        assert list(c.updates[0].removed) == ["service/default/svc199"]
        assert same_content(c.state.snapshot, changed)
        await stop_task(task)
        await cp.server.stop(0)

    run(main())


def test_state_of_the_world_mode_converges(tmp_path):
    async def main():
        cp = await ControlPlane(delta=False).start()
        s1 = cp.publish(snap(*BASE))
        c = make_client(cp.address, tmp_path)
        task = asyncio.create_task(c.run())
        await cp.acked(s1)
        s2 = cp.publish(snap(*BASE[2:]))
        await cp.acked(s2)
        assert c.updates[-1].full_state and len(c.updates[-1].changed) == 4
        assert same_content(c.state.snapshot, s2)
        await stop_task(task)
        await cp.server.stop(0)

    run(main())


# ------------------------------------------------------------------ NACK and consistency

def test_nack_keeps_the_agent_on_its_previous_version(tmp_path):
    def validate(s: NodeSnapshot) -> None:
        for x in s.services:
            if x.name.startswith("bad"):
                raise ValueError(f"service {x.name} refused by the agent")

    async def main():
        cp = await ControlPlane().start()
        good = cp.publish(snap(*BASE))
        c = make_client(cp.address, tmp_path, validate=validate)
        task = asyncio.create_task(c.run())
        await cp.acked(good)
        bad = cp.publish(snap(*BASE, svc(7, name="bad-one")))
        st = await wait_until(lambda: (s := cp.cache.status(NODE))["last_nack_error"] and s, what="NACK")
        assert "service bad-one refused by the agent" in st["last_nack_error"]
        assert st["last_nack_version"] == bad.version and st["acked_version"] == good.version
        assert not st["in_sync"] and st["last_nack_time"]
        assert c.state.snapshot.version == good.version and same_content(c.state.snapshot, good)
        assert c.store.load().version == good.version
        assert c.status()["nacks"] == 1 and "bad-one" in c.status()["last_nack"]
        assert agent_sample(c, "hostmesh_agent_snapshot_nacks_total") == 1
        assert cp.sample("hostmesh_controlplane_nacks_total") == 1
        # a later good snapshot is applied (as a delta from what the agent really has)
        fixed = cp.publish(snap(*BASE, svc(7)))
        await cp.acked(fixed)
        assert same_content(c.state.snapshot, fixed)
        await stop_task(task)
        await cp.server.stop(0)

    run(main())


def test_an_invalid_resource_is_nacked_with_its_field(tmp_path):
    async def main():
        cp = await ControlPlane().start()
        good = cp.publish(snap(*BASE))
        c = make_client(cp.address, tmp_path)
        task = asyncio.create_task(c.run())
        await cp.acked(good)
        cp.publish(snap(*BASE, svc(8, vip="not-an-ip")))
        st = await wait_until(lambda: (s := cp.cache.status(NODE))["last_nack_error"] and s, what="NACK")
        assert "services[0].cluster_ip: 'not-an-ip' is not an IPv4 address" in st["last_nack_error"]
        cp.publish(snap(*BASE, svc(8, vip="198.19.0.1")))  # same VIP:port as svc0
        await wait_until(lambda: "both use 198.19.0.1:80" in cp.cache.status(NODE)["last_nack_error"],
                         what="second NACK")
        assert c.state.snapshot.version == good.version
        await stop_task(task)
        await cp.server.stop(0)

    run(main())


def test_consistency_failure_keeps_the_previous_snapshot_published(tmp_path):
    def check(s: NodeSnapshot) -> None:
        if any(not x.endpoints for x in s.services):
            raise ValueError("a service has no endpoints")

    async def main():
        cp = await ControlPlane(check=check).start()
        good = cp.publish(snap(*BASE))
        c = make_client(cp.address, tmp_path)
        task = asyncio.create_task(c.run())
        await cp.acked(good)
        pushes = cp.sample("hostmesh_controlplane_pushes_total")
        with pytest.raises(SnapshotRejected, match="a service has no endpoints"):
            cp.publish(snap(*BASE, svc(9, endpoints=0)))
        assert cp.cache.get_snapshot(NODE) is good
        assert cp.sample("hostmesh_controlplane_snapshot_rejections_total") == 1
        await asyncio.sleep(0.2)  # give a wrong push a chance to happen (none must)
        assert cp.sample("hostmesh_controlplane_pushes_total") == pushes
        assert c.state.snapshot.version == good.version
        await stop_task(task)
        await cp.server.stop(0)

    run(main())


# ------------------------------------------------------------------ control plane gone

def test_control_plane_down_agent_keeps_serving_then_resyncs(tmp_path):
    async def main():
        cp = await ControlPlane().start()
        s1 = cp.publish(snap(*BASE))
        c = make_client(cp.address, tmp_path)
        task = asyncio.create_task(c.run())
        await cp.acked(s1)
        await wait_until(lambda: c.status()["connected"], what="connected")
        port = cp.port
        await cp.server.stop(0)

        st = await wait_until(lambda: (s := c.status())["stale"] and s["reconnect_attempts"] >= 2 and s,
                              what="stale + retries")
        assert st["message"].startswith("stale config since ")
        assert st["stale_since"] and st["disconnected_since"] and not st["connected"]
        assert st["last_error"].startswith("UNAVAILABLE")
        assert c.state.snapshot.version == s1.version  # still serving
        assert agent_sample(c, "hostmesh_agent_config_stale") == 1
        assert agent_sample(c, "hostmesh_agent_controlplane_connected") == 0

        # it comes back (a new process: fresh cache) with a changed config
        cp2 = await ControlPlane().start(port)
        s2 = cp2.publish(snap(*BASE[:3], svc(11)))
        await cp2.acked(s2)
        assert same_content(c.state.snapshot, s2)
        st = await wait_until(lambda: (s := c.status())["connected"] and s, what="reconnected")
        assert not st["stale"] and st["stale_since"] is None and st["acked_version"] == s2.version
        assert agent_sample(c, "hostmesh_agent_config_stale") == 0
        await stop_task(task)
        await cp2.server.stop(0)

    run(main())


def test_agent_restarted_while_control_plane_down_serves_from_disk(tmp_path):
    async def main():
        persisted = snap(*BASE)
        SnapshotStore(tmp_path / "agent" / "snapshot.json").save(persisted)
        c = make_client(f"127.0.0.1:{free_port()}", tmp_path)
        task = asyncio.create_task(c.run())
        await wait_until(lambda: c.state.snapshot is not None, what="persisted snapshot applied")
        assert c.state.snapshot.version == persisted.version and same_content(c.state.snapshot, persisted)
        st = await wait_until(lambda: (s := c.status())["last_error"] and s, what="a failed attempt")
        assert st["snapshot_source"] == "persisted" and st["persisted_at"]
        assert st["stale"] and not st["connected"]
        assert st["message"].startswith("stale config since ")
        assert agent_sample(c, "hostmesh_agent_config_stale") == 1
        await stop_task(task)

    run(main())


def test_corrupt_store_is_ignored(tmp_path):
    path = tmp_path / "agent" / "snapshot.json"
    path.parent.mkdir()
    store = SnapshotStore(path)
    for content, why in [(b"{not json", "not valid JSON"),
                         (b'{"format": "something else"}', "not a persisted snapshot"),
                         (json.dumps({"format": "hostmesh.persisted-snapshot/v1",
                                      "snapshot": {"node": "", "services": "x"}}).encode(), "invalid snapshot"),
                         (b"\xff\xfe\x00", "not valid JSON")]:
        path.write_bytes(content)
        assert store.load() is None
        assert why in store.last_error and str(path) in store.last_error

    async def main():
        c = make_client(f"127.0.0.1:{free_port()}", tmp_path)
        task = asyncio.create_task(c.run())
        st = await wait_until(lambda: (s := c.status())["last_error"] and s, what="a failed attempt")
        assert c.state.snapshot is None and st["stale"]
        assert st["message"].startswith("no config: control plane")
        await stop_task(task)

    run(main())


def test_store_is_atomic_private_and_round_trips(tmp_path):
    path = tmp_path / "deep" / "er" / "snapshot.json"
    store = SnapshotStore(path)
    assert store.load() is None and store.last_error == ""
    s = dataclasses.replace(snap(*BASE, workloads=[Workload("w", "default", NODE, "198.18.0.9",
                                                            labels=(("a", "b"),))]), version="explicit-v1")
    store.save(s, {"service/default/svc0": "v0"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == ["snapshot.json"]  # no temporary file left behind
    rec = store.load_record()
    assert rec.snapshot.version == "explicit-v1" and rec.snapshot.to_dict() == s.to_dict()
    assert rec.resource_versions == {"service/default/svc0": "v0"} and rec.saved_at
    assert json.dumps(snapshot_dict(s), sort_keys=True) == json.dumps(s.to_dict(), sort_keys=True)
    s2 = snap(*BASE[:2])
    store.save(s2)
    assert store.load().to_dict() == s2.to_dict()


# ------------------------------------------------------------------ protocol edges

def test_new_node_gets_a_snapshot_from_the_callback(tmp_path):
    asked = []

    def default_for(node: str) -> NodeSnapshot:
        asked.append(node)
        return snap(*BASE[:2], node=node)

    async def main():
        cp = await ControlPlane(node_default_snapshot=default_for).start()
        c = make_client(cp.address, tmp_path)
        task = asyncio.create_task(c.run())
        await wait_until(lambda: c.state.snapshot is not None, what="a snapshot for the new node")
        assert asked == [NODE] and len(c.state.snapshot.services) == 2
        await cp.acked(cp.cache.get_snapshot(NODE))
        await stop_task(task)
        await cp.server.stop(0)

    run(main())


def test_digest_mismatch_makes_the_agent_resync(tmp_path):
    async def main():
        cp = await ControlPlane().start()
        s1 = cp.publish(snap(*BASE))
        c = make_client(cp.address, tmp_path)
        task = asyncio.create_task(c.run())
        await cp.acked(s1)
        # drift: the agent's resource map silently lost one resource
        c._resources = {n: v for n, v in c._resources.items() if n != "service/default/svc2"}
        s2 = cp.publish(snap(*BASE, svc(12)))
        await cp.acked(s2)
        assert same_content(c.state.snapshot, s2)
        assert c.status()["nacks"] == 1 and "digest mismatch" in c.status()["last_nack"]
        assert "digest mismatch" in cp.cache.status(NODE)["last_nack_error"]
        assert len(c.hellos) == 2 and "service/default/svc2" not in c.hellos[1].resource_versions
        await stop_task(task)
        await cp.server.stop(0)

    run(main())


def test_first_message_must_be_a_hello():
    async def main():
        cp = await ControlPlane().start()
        async with grpc.aio.insecure_channel(cp.address) as ch:
            call = ch.stream_stream(STREAM_METHOD, request_serializer=pb.AgentMessage.SerializeToString,
                                    response_deserializer=pb.SnapshotUpdate.FromString)()
            await call.write(pb.AgentMessage(ack=pb.Ack(nonce="1")))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "Hello" in err.value.details()
            call = ch.stream_stream(STREAM_METHOD, request_serializer=pb.AgentMessage.SerializeToString,
                                    response_deserializer=pb.SnapshotUpdate.FromString)()
            await call.write(pb.AgentMessage(hello=pb.Hello(node="")))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await cp.server.stop(0)

    run(main())


def test_raw_agent_declaring_stale_versions(tmp_path):
    """The wire contract without the client library: Hello with versions -> delta -> ACK."""
    async def main():
        cp = await ControlPlane().start()
        s = cp.publish(snap(*BASE))
        declared = {n: v for n, (v, _) in split(snap(*BASE[:4], svc(4, endpoints=9))).items()}
        declared["service/default/old"] = "x"
        async with grpc.aio.insecure_channel(cp.address) as ch:
            call = ch.stream_stream(STREAM_METHOD, request_serializer=pb.AgentMessage.SerializeToString,
                                    response_deserializer=pb.SnapshotUpdate.FromString)()
            await call.write(pb.AgentMessage(hello=pb.Hello(node=NODE, agent_version="raw",
                                                            resource_versions=declared)))
            u = await call.read()
            assert sorted(r.name for r in u.changed) == ["service/default/svc4", "service/default/svc5"]
            assert list(u.removed) == ["service/default/old"] and u.snapshot_version == s.version
            await call.write(pb.AgentMessage(ack=pb.Ack(nonce=u.nonce, snapshot_version=u.snapshot_version)))
            await cp.acked(s)
            assert cp.cache.status(NODE)["agent_version"] == "raw"
            await call.done_writing()
        await cp.server.stop(0)

    run(main())


def test_large_pushes_are_limited_and_a_silent_agent_cannot_hold_the_slot():
    async def main():
        cp = await ControlPlane(large_push_bytes=1, max_concurrent_large_pushes=1, large_push_hold=0.3).start()
        nodes = ["n1", "n2", "n3"]
        snaps = {n: cp.publish(snap(*BASE, node=n)) for n in nodes}
        async with grpc.aio.insecure_channel(cp.address) as ch:
            def call():
                return ch.stream_stream(STREAM_METHOD, request_serializer=pb.AgentMessage.SerializeToString,
                                        response_deserializer=pb.SnapshotUpdate.FromString)()

            silent = call()  # gets the first slot and never ACKs
            await silent.write(pb.AgentMessage(hello=pb.Hello(node="n1")))
            assert len((await silent.read()).changed) == len(BASE)

            async def agent(node):
                c = call()
                await c.write(pb.AgentMessage(hello=pb.Hello(node=node)))
                u = await c.read()
                await c.write(pb.AgentMessage(ack=pb.Ack(nonce=u.nonce, snapshot_version=u.snapshot_version)))
                return c

            calls = await asyncio.gather(agent("n2"), agent("n3"))
            assert await cp.cache.wait_for_acks({n: snaps[n].version for n in ("n2", "n3")}, 10)
            assert cp.cache.status("n1")["acked_version"] == ""
            for c in (silent, *calls):
                c.cancel()
        await cp.server.stop(0)

    run(main())


def test_the_agent_fails_over_to_the_next_replica_at_once(tmp_path):
    """Two replicas serving the same snapshot: the agent starts on a dead endpoint, moves to
    the live one without backing off, and when that one dies, to the other one."""
    async def main():
        dead = free_port()
        cp_a = await ControlPlane().start()
        s1 = cp_a.publish(snap(*BASE))
        c = RecordingClient([f"127.0.0.1:{dead}", cp_a.address], NODE, AgentState(),
                            SnapshotStore(tmp_path / "agent" / "snapshot.json"), CollectorRegistry(),
                            backoff_initial=5.0, backoff_max=5.0)
        task = asyncio.create_task(c.run())
        t0 = time.monotonic()
        await cp_a.acked(s1)
        assert time.monotonic() - t0 < 3.0         # no 5 s backoff between the two endpoints
        assert c.status()["address"] == cp_a.address and c.status()["failovers"] == 1
        cp_b = await ControlPlane().start(dead)     # the other replica comes up...
        cp_b.publish(s1)
        await cp_a.server.stop(0)                  # ...and this one dies
        await wait_until(lambda: (s := c.status())["connected"] and s["address"] == cp_b.address,
                         what="failed over to the other replica")
        assert c.state.snapshot.version == s1.version
        await stop_task(task)
        await cp_b.server.stop(0)

    run(main())
