"""L7 load balancing: round robin, least request (P2C), ring hash, random, same-node preference."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.proxy.l7.lb import (DEFAULT_VNODES, LbConfig, LbState, LeastRequest, Random, RingHash, RoundRobin,
                                   balancer_for, cookie_value, ketama_hash, ketama_points, make_balancer)
from nodeagent.proxy.l7.routing import RouteTable
from nodeagent.state import ConfigObject, Endpoint, NodeSnapshot, Service, ServicePort

NODE = "node-1"


def eps(n: int, node_of=lambda i: f"node-{i % 3 + 1}", port: int = 8080) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(f"198.18.{i // 250 + 1}.{i % 250 + 1}", port, node_of(i), f"w{i}") for i in range(n))


def rng(seed: int = 1) -> random.Random:
    return random.Random(seed)


# ------------------------------------------------------------------ config

@pytest.mark.parametrize("spec,expected", [
    (None, LbConfig()),
    ({}, LbConfig()),
    ({"loadBalancer": "RANDOM"}, LbConfig("RANDOM")),
    ({"loadBalancer": {"type": "least_request"}}, LbConfig("LEAST_REQUEST")),
    ({"loadBalancer": {"type": "RING_HASH", "ringHash": {"header": "X-User"}}}, LbConfig("RING_HASH", hash_header=b"x-user")),
    ({"loadBalancer": {"type": "RING_HASH", "ringHash": {"cookie": "sid"}}}, LbConfig("RING_HASH", hash_cookie=b"sid")),
    ({"loadBalancer": {"type": "RING_HASH", "ringHash": {"sourceIP": True}}}, LbConfig("RING_HASH", hash_source_ip=True)),
    ({"loadBalancer": {"type": "RING_HASH"}}, LbConfig("RING_HASH", hash_source_ip=True)),
    ({"loadBalancer": {"type": "ROUND_ROBIN", "preferSameNode": True}}, LbConfig(prefer_same_node=True)),
    ({"loadBalancer": {"type": "BOGUS"}}, LbConfig()),
])
def test_lb_config_from_traffic_policy(spec, expected):
    assert LbConfig.from_policy(spec) == expected


@pytest.mark.parametrize("kind,cls", [("ROUND_ROBIN", RoundRobin), ("LEAST_REQUEST", LeastRequest),
                                      ("RING_HASH", RingHash), ("RANDOM", Random)])
def test_balancer_for_factory(kind, cls):
    svc = Service("multi", "shop", "198.19.0.20", (ServicePort(80, 8080), ServicePort(9090, 9091)),
                  eps(3) + eps(2, port=9091))
    b = balancer_for(svc, svc.ports[1], {"loadBalancer": {"type": kind}}, node=NODE, rng=rng())
    assert type(b) is cls and b.policy == kind
    assert {e.port for e in b.endpoints} == {9091}  # service_endpoints: that port's endpoints
    assert b.pick([], "10.0.0.1") in b.endpoints


@pytest.mark.parametrize("cls", [RoundRobin, LeastRequest, RingHash, Random])
def test_no_endpoints_picks_none_and_one_endpoint_is_always_it(cls):
    assert cls((), LbConfig(cls.policy)).pick() is None
    one = eps(1)
    assert all(cls(one, LbConfig(cls.policy), rng=rng()).pick([], "1.2.3.4") is one[0] for _ in range(5))


# ------------------------------------------------------------------ round robin

def test_round_robin_is_fair_and_ordered():
    e = eps(3)
    b = RoundRobin(e)
    picks = [b.pick() for _ in range(300)]
    assert picks[:6] == [e[0], e[1], e[2], e[0], e[1], e[2]]
    assert Counter(picks) == {e[0]: 100, e[1]: 100, e[2]: 100}


def test_round_robin_keeps_its_position_across_an_equal_update():
    e = eps(3)
    b = RoundRobin(e)
    b.pick()
    b.update(tuple(Endpoint(x.address, x.port, x.node, x.workload) for x in e))  # equal, new objects
    assert b.pick() == e[1]


def test_round_robin_after_endpoint_change_still_covers_all():
    b = RoundRobin(eps(3))
    b.pick(), b.pick()
    new = eps(5)
    b.update(new)
    assert set(b.pick() for _ in range(5)) == set(new)


# ------------------------------------------------------------------ least request

def test_p2c_never_picks_the_most_loaded_when_others_are_idle():
    e = eps(4)
    b = LeastRequest(e, LbConfig("LEAST_REQUEST"), rng=rng(3))
    for _ in range(10):
        b.on_request_start(e[0])
    assert b.in_flight(e[0]) == 10
    picks = Counter(b.pick() for _ in range(3000))
    assert e[0] not in picks  # two distinct choices: e0 always loses its comparison
    for x in e[1:]:
        assert 800 < picks[x] < 1200


def test_p2c_with_two_endpoints_always_picks_the_less_loaded():
    e = eps(2)
    b = LeastRequest(e, LbConfig("LEAST_REQUEST"), rng=rng(4))
    b.on_request_start(e[1])
    assert all(b.pick() is e[0] for _ in range(50))
    b.on_request_start(e[0])
    b.on_request_start(e[0])
    assert all(b.pick() is e[1] for _ in range(50))
    b.on_request_end(e[0])
    b.on_request_end(e[0])
    b.on_request_end(e[0])  # extra end never goes negative
    assert b.in_flight(e[0]) == 0


def test_p2c_balances_in_flight_under_a_driver_loop():
    """Simulate requests with random durations: P2C keeps in-flight counts close together."""
    e = eps(5)
    b = LeastRequest(e, LbConfig("LEAST_REQUEST"), rng=rng(5))
    r = rng(6)
    active: list[tuple[int, Endpoint]] = []
    for t in range(5000):
        ep = b.pick()
        b.on_request_start(ep)
        active.append((t + r.randint(1, 40), ep))
        done = [a for a in active if a[0] <= t]
        active = [a for a in active if a[0] > t]
        for _, x in done:
            b.on_request_end(x)
    counts = [b.in_flight(x) for x in e]
    assert max(counts) - min(counts) <= 3, counts


def test_p2c_prefers_less_loaded_statistically():
    e = eps(3)
    b = LeastRequest(e, LbConfig("LEAST_REQUEST"), rng=rng(7))
    for _ in range(5):
        b.on_request_start(e[0])
    for _ in range(2):
        b.on_request_start(e[1])
    picks = Counter(b.pick() for _ in range(3000))
    assert picks[e[2]] > picks[e[1]] > picks[e[0]] == 0


# ------------------------------------------------------------------ ring hash

def _ring(endpoints, **kw) -> RingHash:
    return RingHash(endpoints, LbConfig("RING_HASH", **kw), rng=rng(8))


def test_ketama_points_are_stable_and_per_endpoint():
    e = eps(2)
    assert ketama_points(e[0]) == ketama_points(Endpoint(e[0].address, e[0].port))
    assert len(ketama_points(e[0])) == DEFAULT_VNODES
    assert set(ketama_points(e[0])).isdisjoint(ketama_points(e[1]))
    assert ketama_hash(b"abc") == ketama_hash(b"abc") != ketama_hash(b"abd")


def test_ring_hash_same_key_same_endpoint_and_keys_spread():
    e = eps(6)
    b = _ring(e, hash_header=b"x-user")
    owner = {k: b.pick([(b"x-user", k.encode())]) for k in (f"user-{i}" for i in range(3000))}
    for k in list(owner)[:200]:
        assert b.pick([(b"x-user", k.encode())]) is owner[k]
    share = Counter(owner.values())
    assert set(share) == set(e)
    for x in e:  # 160 points per endpoint: each gets a reasonable share of 1/6
        assert 0.5 / 6 < share[x] / 3000 < 1.6 / 6, share


def test_ring_hash_adding_an_endpoint_moves_only_keys_to_it():
    e = eps(10)
    keys = [f"k{i}".encode() for i in range(5000)]
    b = _ring(e, hash_header=b"k")
    before = {k: b.pick([(b"k", k)]) for k in keys}
    new = eps(11)
    b.update(new)
    after = {k: b.pick([(b"k", k)]) for k in keys}
    moved = [k for k in keys if after[k] != before[k]]
    assert all(after[k] == new[10] for k in moved)  # moved keys go to the new endpoint only
    assert 0.03 < len(moved) / len(keys) < 0.16      # about 1/11 of them


def test_ring_hash_removing_an_endpoint_moves_only_its_keys():
    e = eps(10)
    keys = [f"k{i}".encode() for i in range(5000)]
    b = _ring(e, hash_header=b"k")
    before = {k: b.pick([(b"k", k)]) for k in keys}
    removed = e[3]
    b.update(e[:3] + e[4:])
    after = {k: b.pick([(b"k", k)]) for k in keys}
    for k in keys:
        if before[k] != removed:
            assert after[k] == before[k]
        else:
            assert after[k] != removed


def test_ring_hash_unhealthy_endpoint_keys_move_and_come_back():
    e = eps(5)
    keys = [f"k{i}".encode() for i in range(1000)]
    b = _ring(e, hash_header=b"k")
    before = {k: b.pick([(b"k", k)]) for k in keys}
    b.set_healthy(e[2], False)
    during = {k: b.pick([(b"k", k)]) for k in keys}
    assert all(during[k] == before[k] for k in keys if before[k] != e[2])
    assert e[2] not in during.values()
    b.set_healthy(e[2], True)
    assert {k: b.pick([(b"k", k)]) for k in keys} == before


def test_ring_hash_on_cookie():
    e = eps(4)
    b = _ring(e, hash_cookie=b"sid")
    h1 = [(b"cookie", b"theme=dark; sid=abc123"), (b"x", b"1")]
    h2 = [(b"cookie", b"theme=light"), (b"cookie", b'sid="abc123"')]  # HTTP/2 split cookies, quoted value
    assert b.pick(h1) is b.pick(h2) is b.lookup(ketama_hash(b"abc123"))
    assert cookie_value([(b"cookie", b"a=1;b=2")], b"b") == b"2"
    assert cookie_value([(b"cookie", b"ab=1")], b"a") is None


def test_ring_hash_on_source_ip():
    e = eps(4)
    b = _ring(e, hash_source_ip=True)
    assert b.pick([], "10.0.0.7") is b.pick([(b"x-user", b"other")], "10.0.0.7") is b.lookup(ketama_hash(b"10.0.0.7"))
    assert len({b.pick([], f"10.0.{i}.1") for i in range(200)}) == 4


def test_ring_hash_header_with_repeated_values():
    b = _ring(eps(4), hash_header=b"x-user")
    assert b.pick([(b"x-user", b"a"), (b"x-user", b"b")]) is b.lookup(ketama_hash(b"a,b"))


def test_ring_hash_without_a_key_picks_randomly():
    e = eps(4)
    b = _ring(e, hash_header=b"x-user")
    assert len({b.pick([(b"other", b"1")]) for _ in range(200)}) == 4


def test_ring_hash_with_prefer_same_node_is_consistent_within_the_local_subset():
    e = eps(9)  # nodes 1, 2, 3 in turn
    b = RingHash(e, LbConfig("RING_HASH", hash_header=b"k", prefer_same_node=True), node="node-2", rng=rng())
    local = {x for x in e if x.node == "node-2"}
    picks = {k: b.pick([(b"k", k)]) for k in (f"k{i}".encode() for i in range(500))}
    assert set(picks.values()) == local
    assert all(b.pick([(b"k", k)]) is v for k, v in picks.items())


# ------------------------------------------------------------------ random

def test_random_distribution_is_uniform():
    e = eps(4)
    b = Random(e, LbConfig("RANDOM"), rng=rng(9))
    picks = Counter(b.pick() for _ in range(8000))
    expected = 2000
    chi2 = sum((picks[x] - expected) ** 2 / expected for x in e)
    assert chi2 < 16.27  # p = 0.001 for 3 degrees of freedom


def test_random_is_deterministic_with_a_seeded_rng():
    e = eps(5)
    b1, b2 = Random(e, LbConfig("RANDOM"), rng=rng(42)), Random(e, LbConfig("RANDOM"), rng=rng(42))
    assert [b1.pick() for _ in range(50)] == [b2.pick() for _ in range(50)]


# ------------------------------------------------------------------ candidates: same node, health

@pytest.mark.parametrize("cls", [RoundRobin, LeastRequest, RingHash, Random])
def test_prefer_same_node_uses_local_endpoints_when_any(cls):
    e = eps(6)  # w0,w3 on node-1
    b = cls(e, LbConfig(cls.policy, prefer_same_node=True, hash_source_ip=cls is RingHash), node="node-1", rng=rng())
    picks = {b.pick([], f"10.0.0.{i}") for i in range(200)}
    assert picks == {e[0], e[3]}


@pytest.mark.parametrize("cls", [RoundRobin, LeastRequest, RingHash, Random])
def test_prefer_same_node_falls_back_when_local_unhealthy_or_absent(cls):
    e = eps(6)
    cfg = LbConfig(cls.policy, prefer_same_node=True, hash_source_ip=cls is RingHash)
    b = cls(e, cfg, node="node-1", rng=rng())
    b.set_healthy(e[0], False)
    assert {b.pick([], f"10.0.0.{i}") for i in range(100)} == {e[3]}
    b.set_healthy(e[3], False)
    assert {b.pick([], f"10.0.0.{i}") for i in range(300)} == {e[1], e[2], e[4], e[5]}
    b.set_healthy(e[0], True)
    assert {b.pick([], f"10.0.0.{i}") for i in range(100)} == {e[0]}
    # a node without endpoints: everything
    other = cls(e, cfg, node="node-9", rng=rng())
    assert {other.pick([], f"10.0.0.{i}") for i in range(300)} == set(e)


def test_prefer_same_node_off_ignores_locality():
    e = eps(6)
    b = RoundRobin(e, LbConfig(), node="node-1")
    assert {b.pick() for _ in range(6)} == set(e)


def test_unhealthy_endpoints_are_skipped_and_all_unhealthy_means_panic_routing():
    e = eps(3)
    b = RoundRobin(e)
    b.set_healthy(e[1], False)
    assert not b.is_healthy(e[1])
    assert {b.pick() for _ in range(10)} == {e[0], e[2]}
    b.set_healthy(e[0], False)
    b.set_healthy(e[2], False)
    assert {b.pick() for _ in range(10)} == set(e)  # panic: all of them rather than none


def test_health_marks_of_removed_endpoints_are_forgotten():
    e = eps(3)
    b = RoundRobin(e)
    b.set_healthy(e[2], False)
    b.update(e[:2])
    b.update(e)
    assert b.is_healthy(e[2])


# ------------------------------------------------------------------ LbState across snapshot swaps

def _snapshot(endpoints, policy_type="ROUND_ROBIN"):
    svc = Service("web", "shop", "198.19.0.10", (ServicePort(80, 8080),), endpoints)
    other = Service("db", "shop", "198.19.0.11", (ServicePort(5432, 5432),), eps(1, port=5432))
    pol = ConfigObject("TrafficPolicy", "shop", "web", json.dumps({
        "targetRef": {"kind": "Service", "name": "web"}, "loadBalancer": {"type": policy_type}}))
    return NodeSnapshot(node=NODE, services=(svc, other), config=(pol,))


def _backend(snapshot):
    table = RouteTable.from_snapshot(snapshot, rand=rng())
    return table, table.router_for("198.19.0.10", 80).default.backend


def test_lb_state_survives_snapshot_swaps_for_unchanged_services():
    state = LbState(NODE, rng=rng())
    t1, b1 = _backend(_snapshot(eps(3)))
    bal = state.get(b1)
    first = [state.pick(b1) for _ in range(2)]
    t2, b2 = _backend(_snapshot(eps(3)))  # a new snapshot, same service
    assert b2 is not b1 and state.get(b2) is bal
    assert state.pick(b2) == eps(3)[2]    # the rotation continues
    assert first == list(eps(3)[:2])


def test_lb_state_updates_endpoints_in_place_and_keeps_in_flight():
    state = LbState(NODE, rng=rng())
    _, b1 = _backend(_snapshot(eps(3), "LEAST_REQUEST"))
    bal = state.get(b1)
    ep = eps(3)[0]
    bal.on_request_start(ep)
    _, b2 = _backend(_snapshot(eps(4), "LEAST_REQUEST"))
    assert state.get(b2) is bal and bal.endpoints == eps(4) and bal.in_flight(ep) == 1


def test_lb_state_policy_change_makes_a_new_balancer_inheriting_in_flight():
    state = LbState(NODE, rng=rng())
    _, b1 = _backend(_snapshot(eps(3)))
    old = state.get(b1)
    old.on_request_start(eps(3)[1])
    old.set_healthy(eps(3)[2], False)
    _, b2 = _backend(_snapshot(eps(3), "LEAST_REQUEST"))
    new = state.get(b2)
    assert type(new) is LeastRequest and new is not old
    assert new.in_flight(eps(3)[1]) == 1 and not new.is_healthy(eps(3)[2])
    new.on_request_end(eps(3)[1])  # the request started under the old policy ends cleanly
    assert new.in_flight(eps(3)[1]) == 0


def test_lb_state_forgets_removed_services():
    state = LbState(NODE, rng=rng())
    t1 = RouteTable.from_snapshot(_snapshot(eps(2)), rand=rng())
    for r in t1.routers.values():
        state.get(r.default.backend)
    assert len(state) == 2
    svc = Service("web", "shop", "198.19.0.10", (ServicePort(80, 8080),), eps(2))
    t2 = RouteTable.from_snapshot(NodeSnapshot(node=NODE, services=(svc,)), rand=rng())
    state.sync(t2)
    assert ("shop", "web", 80) in state and ("shop", "db", 5432) not in state


def test_lb_state_balancer_by_service_and_policy_spec():
    state = LbState(NODE, rng=rng())
    svc = Service("web", "shop", "198.19.0.10", (ServicePort(80, 8080),), eps(3))
    b = state.balancer(svc, svc.ports[0], {"loadBalancer": {"type": "RANDOM"}})
    assert type(b) is Random and state.balancer(svc, svc.ports[0], {"loadBalancer": "RANDOM"}) is b
    assert type(state.balancer(svc, svc.ports[0], None)) is RoundRobin


def test_make_balancer_honours_config_policy():
    assert type(make_balancer(LbConfig("RING_HASH", hash_source_ip=True), eps(2))) is RingHash


# ------------------------------------------------------------------ properties

@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=2, max_value=12), st.data())
def test_ring_hash_removal_only_moves_keys_of_the_removed_endpoint(n, data):
    e = eps(n)
    gone = data.draw(st.integers(min_value=0, max_value=n - 1))
    keys = data.draw(st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=60, unique=True))
    b = _ring(e, hash_header=b"k")
    before = {k: b.pick([(b"k", k)]) for k in keys}
    b.update(e[:gone] + e[gone + 1:])
    for k in keys:
        if before[k] != e[gone]:
            assert b.pick([(b"k", k)]) == before[k]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=6), st.integers(0, 1000))
def test_p2c_never_picks_a_strictly_most_loaded_endpoint(loads, seed):
    e = eps(len(loads))
    b = LeastRequest(e, LbConfig("LEAST_REQUEST"), rng=rng(seed))
    for x, n in zip(e, loads):
        for _ in range(n):
            b.on_request_start(x)
    worst = max(loads)
    if len(e) >= 2 and loads.count(worst) == 1:
        loaded = e[loads.index(worst)]
        assert all(b.pick() is not loaded for _ in range(40))
