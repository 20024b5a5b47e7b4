"""SnapshotCache: consistency check, all-or-nothing publish, watches, status, new nodes."""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client import CollectorRegistry

from controlplane.cache import SnapshotCache, SnapshotRejected
from controlplane.metrics import ControlPlaneMetrics
from nodeagent.state import Endpoint, NodeSnapshot, Service, ServicePort


def svc(i: int, endpoints: int = 1) -> Service:
    return Service(name=f"svc{i}", namespace="default", cluster_ip=f"198.19.0.{i + 1}",
                   ports=(ServicePort(port=80, target_port=8080),),
                   endpoints=tuple(Endpoint(address=f"198.18.{i}.{j + 1}", port=8080) for j in range(endpoints)))


def snap(node: str, *services: Service) -> NodeSnapshot:
    return NodeSnapshot(node=node, services=services or (svc(0),))


def sample(metrics: ControlPlaneMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def no_bad_services(s: NodeSnapshot) -> None:
    for x in s.services:
        if x.name.startswith("bad"):
            raise ValueError(f"service {x.namespace}/{x.name}: refused by the check")


def test_publish_and_read():
    cache = SnapshotCache()
    a, b = snap("a"), snap("b", svc(1))
    cache.set_snapshots({"a": a, "b": b})
    assert cache.get_snapshot("a") is a and cache.get_snapshot("b") is b
    assert cache.versions() == {"a": a.version, "b": b.version}
    assert cache.nodes() == ["a", "b"]
    assert cache.resources("a").version == a.version
    assert cache.get_snapshot("zzz") is None


def test_consistency_failure_keeps_the_previous_snapshots_all_or_nothing():
    metrics = ControlPlaneMetrics(CollectorRegistry())
    cache = SnapshotCache(consistency_check=no_bad_services, metrics=metrics)
    good_a, good_b = snap("a"), snap("b")
    cache.set_snapshots({"a": good_a, "b": good_b})
    bad = Service(name="bad1", namespace="default", cluster_ip="198.19.1.1", ports=(ServicePort(80, 80),))
    with pytest.raises(SnapshotRejected) as err:
        cache.set_snapshots({"a": snap("a", svc(0), svc(2)), "b": snap("b", bad)})
    assert err.value.errors == {"b": "service default/bad1: refused by the check"}
    assert "node b: service default/bad1: refused by the check" in str(err.value)
    # nothing of the rejected publish is in force, not even node a's valid snapshot
    assert cache.get_snapshot("a") is good_a and cache.get_snapshot("b") is good_b
    assert sample(metrics, "hostmesh_controlplane_snapshot_rejections_total") == 1
    assert "refused by the check" in cache.last_rejection
    cache.set_snapshots({"a": snap("a", svc(3))})
    assert cache.last_rejection == ""


def test_builtin_checks_node_name_and_duplicate_resources():
    cache = SnapshotCache()
    with pytest.raises(SnapshotRejected, match="snapshot is for node 'b'"):
        cache.set_snapshot("a", snap("b"))
    dup = snap("a", svc(0), Service(name="svc0", namespace="default", cluster_ip="198.19.5.5",
                                    ports=(ServicePort(80, 80),)))
    with pytest.raises(SnapshotRejected, match="duplicate resource service/default/svc0"):
        cache.set_snapshot("a", dup)
    assert cache.get_snapshot("a") is None


def test_an_unchanged_version_is_not_republished():
    metrics = ControlPlaneMetrics(CollectorRegistry())
    cache = SnapshotCache(metrics=metrics)
    first = snap("a")
    cache.set_snapshot("a", first)
    cache.set_snapshot("a", snap("a"))  # equal content -> same version
    assert cache.get_snapshot("a") is first
    assert sample(metrics, "hostmesh_controlplane_snapshots_published_total") == 1


def test_watch_wakes_on_publish_of_its_node_only():
    async def main():
        cache = SnapshotCache()
        wa, wb = cache.watch("a"), cache.watch("b")
        cache.set_snapshot("a", snap("a"))
        assert wa.event.is_set() and not wb.event.is_set()
        wa.event.clear()
        # a publish from another thread (a builder running in a worker) wakes the loop's watcher
        t = threading.Thread(target=cache.set_snapshot, args=("a", snap("a", svc(4))))
        t.start()
        t.join()
        await asyncio.wait_for(wa.event.wait(), 5)
        cache.unwatch(wa)
        cache.unwatch(wb)
        assert cache._watches == {}

    asyncio.run(main())


def test_status_records_and_wait_for_acks():
    async def main():
        cache = SnapshotCache()
        s = snap("a")
        cache.set_snapshot("a", s)
        cache.agent_connected("a", "ipv4:127.0.0.1:1", "0.1.0")
        cache.record_sent("a", s.version)
        waiter = asyncio.ensure_future(cache.wait_for_acks({"a": s.version}, 5))
        await asyncio.sleep(0)
        assert not waiter.done()
        cache.record_ack("a", s.version, 0.012)
        assert await waiter
        st = cache.status("a")
        assert st["connected"] and st["peer"] == "ipv4:127.0.0.1:1"
        assert st["sent_version"] == st["acked_version"] == st["latest_version"] == s.version
        assert st["in_sync"] and st["last_push_latency_seconds"] == 0.012
        cache.record_nack("a", "v2", "boom")
        st = cache.status("a")
        assert st["last_nack_error"] == "boom" and st["last_nack_version"] == "v2" and st["last_nack_time"]
        cache.agent_disconnected("a")
        st = cache.status("a")
        assert not st["connected"] and st["disconnected_at"]
        assert not await cache.wait_for_acks({"a": "never"}, 0.05)
        assert cache.pending_acks({"a": "never"}) == {"a": s.version}
        assert [x["node"] for x in cache.statuses()] == ["a"]

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["sync", "async", "none"])
def test_snapshot_for_new_node(kind):
    asked = []

    def sync_cb(node):
        asked.append(node)
        return snap(node)

    async def async_cb(node):
        asked.append(node)
        return snap(node)

    async def main():
        cache = SnapshotCache(snapshot_for_new_node={"sync": sync_cb, "async": async_cb, "none": None}[kind])
        await cache.ensure_snapshot("new")
        await cache.ensure_snapshot("new")  # known now: not asked twice
        return cache

    cache = asyncio.run(main())
    if kind == "none":
        assert cache.get_snapshot("new") is None
    else:
        assert cache.get_snapshot("new").node == "new" and asked == ["new"]


def test_new_node_snapshot_is_checked_too():
    def check(s):
        raise ValueError("nope")

    async def main():
        cache = SnapshotCache(consistency_check=check, snapshot_for_new_node=lambda n: snap(n))
        await cache.ensure_snapshot("x")
        return cache

    cache = asyncio.run(main())
    assert cache.get_snapshot("x") is None and "nope" in cache.last_rejection


def test_index_does_not_grow_with_rebuilt_objects():
    cache = SnapshotCache()
    for i in range(50):
        # a builder that recreates every object on every rebuild, with one change each time
        cache.set_snapshots({n: snap(n, *(svc(k, endpoints=1 + (k == 0) * i) for k in range(20)))
                             for n in ("a", "b", "c")})
    stats = cache.index_stats()
    # live: 3 nodes x (current + previous) services tuples + the shared empty tuple; groups:
    # current + previous services (equal content is one group) + the empty workloads and config
    assert stats["tuples"] <= 7 and stats["groups"] <= 4
    assert stats["entries"] <= 2 * 21 + 1024 and stats["objects"] <= 2 * 6 * 20 + 1024
