"""Endpoint health from the agents to every agent: HealthReport on the discovery stream ->
controlplane.health.HealthStore -> EndpointHealth in the snapshots -> the balancers skip the
endpoints (with the panic threshold). The control plane and two agents' discovery clients
run on loopback; no privileges."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from controlplane.health import ENDPOINT_HEALTH, HealthStore, unhealthy_endpoints
from controlplane.process import ControlPlane
from controlplane.sources import load_directory
from nodeagent.cpclient import ControlPlaneClient
from nodeagent.proxy.l7.lb import LbState
from nodeagent.proxy.l7.routing import RouteTable
from nodeagent.state import AgentState

pytestmark = pytest.mark.timeout(60)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "config"
NODE1_POD = ("198.18.1.1", 8080)  # web's endpoints on node1 (examples/config/workloads.yaml)
NODE2_POD = ("198.18.2.1", 8080)
WEB = "default/web"


async def until(pred, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def health_objects(state: AgentState) -> list:
    snap = state.snapshot
    return [c for c in snap.config if c.kind == ENDPOINT_HEALTH] if snap is not None else []


def test_store_accepts_only_the_reporting_nodes_workloads():
    model = load_directory(str(EXAMPLES)).model
    store = HealthStore()
    assert store.report("node1", [(*NODE1_POD, WEB), (*NODE2_POD, WEB), ("10.9.9.9", 80, WEB)], model)
    assert store.unhealthy("node1") == frozenset({(*NODE1_POD, WEB)})
    assert not store.report("node1", [(*NODE1_POD, WEB)], model)  # the same set: nothing changed
    (obj,) = store.config_objects()
    assert (obj.namespace, obj.name, json.loads(obj.spec)) == ("hostmesh-system", "node1",
                                                               {"unhealthy": [[*NODE1_POD, WEB]]})
    assert unhealthy_endpoints([obj]) == frozenset({(*NODE1_POD, WEB)})
    assert store.report("node1", [], model) and store.config_objects() == ()


def test_a_report_reaches_every_agent_and_the_balancer_skips_the_endpoint(tmp_path):
    cfg = tmp_path / "config"
    shutil.copytree(EXAMPLES, cfg)

    async def scenario():
        cp = ControlPlane(str(cfg), grpc_address="127.0.0.1:0", http_host="127.0.0.1", http_port=0)
        task = asyncio.create_task(cp.run())
        await until(lambda: cp.grpc.port is not None and cp.model is not None)
        address = f"127.0.0.1:{cp.grpc.port}"
        states = {n: AgentState() for n in ("node1", "node2")}
        clients = {n: ControlPlaneClient(address, n, states[n], None, CollectorRegistry()) for n in states}
        runs = [asyncio.create_task(c.run()) for c in clients.values()]
        try:
            await until(lambda: all(s.snapshot is not None for s in states.values()))
            # node1's agent finds its pod unhealthy, and claims node2's: only its own counts
            clients["node1"].report_health(frozenset({(*NODE1_POD, WEB), (*NODE2_POD, WEB),
                                                      (*NODE1_POD, "default/web-canary")}))
            await until(lambda: health_objects(states["node2"]))
            (obj,) = health_objects(states["node2"])
            assert json.loads(obj.spec) == {"unhealthy": [[*NODE1_POD, WEB], [*NODE1_POD, "default/web-canary"]]}
            table = RouteTable.from_snapshot(states["node2"].snapshot)
            router = next(r for r in table.routers.values() if r.service.name == "web")
            backend = router.default.backend
            assert backend.failing == frozenset({NODE1_POD})
            bal = LbState("node2").get(backend)
            picks = {(e.address, e.port) for e in (bal.pick() for _ in range(20))}
            assert NODE1_POD not in picks and picks
            # recovery: the empty set removes the object everywhere
            clients["node1"].report_health(frozenset())
            await until(lambda: not health_objects(states["node2"]) and not health_objects(states["node1"]))
        finally:
            for r in runs:
                r.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            cp._stop.set()
            await asyncio.wait_for(task, 10)

    asyncio.run(scenario())


def test_panic_threshold_sends_to_every_endpoint_when_too_few_are_healthy():
    from nodeagent.proxy.l7.lb import LbConfig, make_balancer
    from nodeagent.state import Endpoint
    eps = [Endpoint(f"10.0.0.{i}", 80) for i in range(1, 5)]
    bal = make_balancer(LbConfig(panic_threshold=50), eps)
    bal.set_failing(frozenset({("10.0.0.1", 80), ("10.0.0.2", 80)}))
    assert {e.address for e in bal.candidates()} == {"10.0.0.3", "10.0.0.4"} and not bal.panic  # 50 %: not below
    bal.set_failing(frozenset({("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)}))
    assert len(bal.candidates()) == 4 and bal.panic  # 25 % healthy: panic, all of them
    zero = make_balancer(LbConfig(panic_threshold=0), eps)
    zero.set_failing(frozenset({("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)}))
    assert [e.address for e in zero.candidates()] == ["10.0.0.4"]
    assert LbConfig.from_policy({"healthCheck": {"tcp": {}, "panicThreshold": 0}}).panic_threshold == 0
