"""Load balancing among the endpoints of one service port: plain objects, no I/O.

Policies (``TrafficPolicy.loadBalancer.type``; the algorithms are Envoy's):

* ``ROUND_ROBIN`` (default) — ``RoundRobin``: each candidate in turn. O(1).
* ``LEAST_REQUEST`` — ``LeastRequest``: power of two choices: two distinct random
  candidates, the one with fewer requests in flight wins (ties: the first drawn). This is
  Envoy's default ``choice_count: 2``; research behind it shows it is nearly as good as an
  O(n) full scan. In-flight counts come from the driver: ``on_request_start(ep)`` when a
  request is sent to ``ep``, ``on_request_end(ep)`` when its response is complete or it
  failed. O(1).
* ``RING_HASH`` — ``RingHash``: consistent hashing on a Ketama ring. Each endpoint
  (``"address:port"``) gets ``vnodes`` points (default 160, libketama's 40 MD5 digests x 4
  little-endian 32-bit points); a request key hashes to a point (first 4 bytes of its MD5)
  and goes to the first endpoint point at or after it, wrapping around. The point count
  per endpoint does not depend on how many endpoints there are, so adding or removing
  one moves only the keys of the ring arcs it gains or loses (about 1/n of them); every
  other key keeps its endpoint. The key is one of (``ringHash``): ``{"header": name}``
  (all values of the header, comma-joined), ``{"cookie": name}`` or ``{"sourceIP": true}``
  (the default when ``ringHash`` is absent). A request without the key gets a random
  candidate, as Envoy does when a hash policy yields no hash. O(log points) per pick;
  the ring is built on endpoint change (O(n·vnodes·log)), and for a candidate subset
  (health, same-node) once per distinct subset (cached).
* ``RANDOM`` — ``Random``: uniform among the candidates. O(1).

Candidates: the healthy endpoints (all of them when none is healthy — Envoy's panic
routing: a guess beats a certain 503), narrowed to the endpoints on this node when
``preferSameNode`` is set and at least one of those is a candidate. An endpoint is healthy
until ``set_healthy(ep, False)`` (the outlier detector's hook). ``pick`` returns ``None``
only when there are no endpoints at all (the driver answers 503 ``UH``).

State: a balancer belongs to one service port and lives in ``LbState``, outside the
immutable snapshot, keyed by ``(namespace, name, port)``. After a snapshot swap
``LbState.get(backend)`` hands back the same balancer, updated in place with the new
endpoints (round-robin position, in-flight counts, health marks kept; the ring keeps every
unchanged endpoint's points); a changed policy makes a new balancer that inherits the
in-flight counts and health marks. ``LbState.retain``/``sync`` drop the services that are
gone. One event loop owns an ``LbState``: no locks.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import random as _random
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from nodeagent.proxy.destinations import service_endpoints
from nodeagent.state import Endpoint, Service, ServicePort

log = logging.getLogger(__name__)

ROUND_ROBIN = "ROUND_ROBIN"
LEAST_REQUEST = "LEAST_REQUEST"
RING_HASH = "RING_HASH"
RANDOM = "RANDOM"
POLICIES = (ROUND_ROBIN, LEAST_REQUEST, RING_HASH, RANDOM)

DEFAULT_VNODES = 160

EndpointKey = tuple[str, int]


def endpoint_key(ep: Endpoint) -> EndpointKey:
    return (ep.address, ep.port)


@dataclass(frozen=True, slots=True)
class LbConfig:
    """The load-balancing part of a TrafficPolicy, normalized. Hash header/cookie names are bytes
    (header lowercased, cookie as written)."""

    policy: str = ROUND_ROBIN
    hash_header: bytes = b""
    hash_cookie: bytes = b""
    hash_source_ip: bool = False
    prefer_same_node: bool = False
    # below this share of healthy endpoints (percent) all are used (Envoy's healthy panic
    # threshold): unhealthy = ejected by outlier detection or failing active health checks
    panic_threshold: int = 50

    @classmethod
    def from_policy(cls, spec: Mapping[str, Any] | None) -> "LbConfig":
        """From a TrafficPolicy spec (``{"loadBalancer": {...}}``) or ``None`` (defaults).

        ``loadBalancer`` may also be a bare policy name (``"RANDOM"``). Unknown policy names
        fall back to round robin (the control plane rejects them first).
        """
        hc = (spec or {}).get("healthCheck") or {}
        panic = int(hc.get("panicThreshold", 50))
        lb = (spec or {}).get("loadBalancer")
        if lb is None:
            return DEFAULT_LB if panic == 50 else cls(panic_threshold=panic)
        if isinstance(lb, str):
            lb = {"type": lb}
        policy = str(lb.get("type", ROUND_ROBIN)).upper()
        if policy not in POLICIES:
            policy = ROUND_ROBIN
        same_node = bool(lb.get("preferSameNode", False))
        header = cookie = b""
        source_ip = False
        if policy == RING_HASH:
            rh = lb.get("ringHash") or {}
            if rh.get("header"):
                header = str(rh["header"]).lower().encode()
            elif rh.get("cookie"):
                cookie = str(rh["cookie"]).encode()
            else:
                source_ip = True
        return cls(policy, header, cookie, source_ip, same_node, panic)


DEFAULT_LB = LbConfig()


def _rand_fn(rng: Any):
    if rng is None:
        return _random.Random().random
    return rng.random if hasattr(rng, "random") else rng


class Balancer:
    """Base class: candidates, health, in-flight counts. Subclasses implement ``_choose``."""

    policy = ""
    __slots__ = ("config", "node", "_rand", "_endpoints", "_inflight", "_unhealthy", "_failing", "_cands", "panic")

    def __init__(self, endpoints: Sequence[Endpoint] = (), config: LbConfig = DEFAULT_LB, *,
                 node: str = "", rng: Any = None) -> None:
        self.config = config
        self.node = node
        self._rand = _rand_fn(rng)
        self._endpoints: tuple[Endpoint, ...] = ()
        self._inflight: dict[EndpointKey, int] = {}
        self._unhealthy: set[EndpointKey] = set()  # ejected (outlier detection)
        self._failing: frozenset[EndpointKey] = frozenset()  # failing active health checks (the snapshot's)
        self._cands: tuple[Endpoint, ...] | None = None
        self.panic = False  # too few healthy endpoints: all are candidates
        self.update(endpoints)

    # ------------------------------------------------------------------ state
    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        """Use a new endpoint set (after a snapshot swap); state of kept endpoints survives."""
        if endpoints is self._endpoints:
            return
        endpoints = tuple(endpoints)
        if endpoints == self._endpoints:
            self._endpoints = endpoints  # same content: remember the new object for ``is``
            return
        self._endpoints = endpoints
        keys = {endpoint_key(e) for e in endpoints}
        self._unhealthy &= keys
        for k in [k for k, n in self._inflight.items() if n <= 0 and k not in keys]:
            del self._inflight[k]
        self._cands = None
        self._endpoints_changed()

    def _endpoints_changed(self) -> None:
        pass

    def set_healthy(self, ep: Endpoint, healthy: bool) -> None:
        k = endpoint_key(ep)
        if healthy:
            if k in self._unhealthy:
                self._unhealthy.discard(k)
                self._cands = None
        elif k not in self._unhealthy:
            self._unhealthy.add(k)
            self._cands = None

    def set_failing(self, keys: frozenset[EndpointKey]) -> None:
        """The endpoints failing active health checks (from the snapshot)."""
        if keys != self._failing:
            self._failing = keys
            self._cands = None

    def is_healthy(self, ep: Endpoint) -> bool:
        k = endpoint_key(ep)
        return k not in self._unhealthy and k not in self._failing

    def candidates(self) -> tuple[Endpoint, ...]:
        """Healthy endpoints (all of them below the panic threshold), same-node ones first if
        so configured. Cached."""
        c = self._cands
        if c is None:
            eps = self._endpoints
            down = self._unhealthy | self._failing if self._failing else self._unhealthy
            panic = False
            if down:
                healthy = tuple(e for e in eps if endpoint_key(e) not in down)
                if not healthy or len(healthy) * 100 < self.config.panic_threshold * len(eps):
                    panic = True
                else:
                    eps = healthy
            if panic != self.panic:
                self.panic = panic
                log.warning("load balancer %s panic mode: %d of %d endpoints unhealthy, sending to all"
                            if panic else "load balancer %s left panic mode (%d of %d endpoints unhealthy)",
                            self.policy or "?", len(down), len(self._endpoints))
            if self.config.prefer_same_node and self.node:
                local = tuple(e for e in eps if e.node == self.node)
                if local:
                    eps = local
            c = self._cands = eps
        return c

    # ------------------------------------------------------------------ in flight
    def on_request_start(self, ep: Endpoint) -> None:
        k = (ep.address, ep.port)
        self._inflight[k] = self._inflight.get(k, 0) + 1

    def on_request_end(self, ep: Endpoint) -> None:
        k = (ep.address, ep.port)
        n = self._inflight.get(k, 0) - 1
        if n > 0:
            self._inflight[k] = n
        else:
            self._inflight.pop(k, None)

    def in_flight(self, ep: Endpoint) -> int:
        return self._inflight.get((ep.address, ep.port), 0)

    def _inherit(self, other: "Balancer") -> None:
        self._failing = other._failing
        self._inflight = dict(other._inflight)
        self._unhealthy = set(other._unhealthy) & {endpoint_key(e) for e in self._endpoints}
        self._cands = None

    # ------------------------------------------------------------------ picking
    def pick(self, headers: Iterable[tuple[bytes, bytes]] = (), source_ip: str = "") -> Endpoint | None:
        """The endpoint for one request (``headers``/``source_ip`` feed ring hash keys)."""
        c = self._cands
        if c is None:
            c = self.candidates()
        if not c:
            return None
        if len(c) == 1:
            return c[0]
        return self._choose(c, headers, source_ip)

    def _choose(self, c: tuple[Endpoint, ...], headers, source_ip: str) -> Endpoint:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._endpoints)} endpoints, {self.config})"


class RoundRobin(Balancer):
    policy = ROUND_ROBIN
    __slots__ = ("_next",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._next = 0
        super().__init__(*args, **kwargs)

    def _choose(self, c, headers, source_ip):
        i = self._next % len(c)
        self._next = i + 1
        return c[i]


class Random(Balancer):
    policy = RANDOM
    __slots__ = ()

    def _choose(self, c, headers, source_ip):
        return c[int(self._rand() * len(c))]


class LeastRequest(Balancer):
    policy = LEAST_REQUEST
    __slots__ = ()

    def _choose(self, c, headers, source_ip):
        n = len(c)
        r = self._rand
        i = int(r() * n)
        j = int(r() * (n - 1))
        if j >= i:
            j += 1
        a, b = c[i], c[j]
        inflight = self._inflight
        if inflight.get((b.address, b.port), 0) < inflight.get((a.address, a.port), 0):
            return b
        return a


def ketama_points(ep: Endpoint, vnodes: int = DEFAULT_VNODES) -> list[int]:
    """The ring points of an endpoint: ``vnodes`` 32-bit values from MD5("address:port-i")."""
    out: list[int] = []
    base = f"{ep.address}:{ep.port}-"
    for i in range((vnodes + 3) // 4):
        d = hashlib.md5(f"{base}{i}".encode(), usedforsecurity=False).digest()
        for k in range(4):
            out.append(int.from_bytes(d[4 * k:4 * k + 4], "little"))
    return out[:vnodes]


def ketama_hash(key: bytes) -> int:
    """The ring position of a request key (libketama's ``ketama_hashi``)."""
    return int.from_bytes(hashlib.md5(key, usedforsecurity=False).digest()[:4], "little")


def cookie_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of cookie ``name`` in the ``cookie`` header(s) (HTTP/2 may split them)."""
    for n, v in headers:
        if n == b"cookie":
            for part in v.split(b";"):
                k, sep, val = part.strip().partition(b"=")
                if sep and k == name:
                    return val.strip().strip(b'"')
    return None


class RingHash(Balancer):
    policy = RING_HASH
    __slots__ = ("vnodes", "_points", "_rings", "_last")

    def __init__(self, *args: Any, vnodes: int = DEFAULT_VNODES, **kwargs: Any) -> None:
        self.vnodes = vnodes
        self._points: dict[EndpointKey, list[int]] = {}
        self._rings: dict[tuple[Endpoint, ...], tuple[list[int], list[Endpoint]]] = {}
        self._last: tuple[Any, Any] = (None, None)
        super().__init__(*args, **kwargs)

    def _endpoints_changed(self) -> None:
        keys = {endpoint_key(e) for e in self._endpoints}
        self._points = {k: v for k, v in self._points.items() if k in keys}
        for e in self._endpoints:
            k = endpoint_key(e)
            if k not in self._points:
                self._points[k] = ketama_points(e, self.vnodes)
        self._rings = {}
        self._last = (None, None)

    def ring(self, c: tuple[Endpoint, ...] | None = None) -> tuple[list[int], list[Endpoint]]:
        """``(sorted points, endpoint of each point)`` for candidate set ``c`` (cached)."""
        if c is None:
            c = self.candidates()
        last_c, r = self._last
        if last_c is c:  # the candidates tuple is cached: identity is the fast path
            return r
        r = self._rings.get(c)
        if r is None:
            pairs = sorted((h, endpoint_key(e), e) for e in c for h in self._points[endpoint_key(e)])
            r = ([p[0] for p in pairs], [p[2] for p in pairs])
            if len(self._rings) >= 8:
                self._rings.clear()
            self._rings[c] = r
        self._last = (c, r)
        return r

    def hash_key(self, headers: Iterable[tuple[bytes, bytes]], source_ip: str) -> bytes | None:
        cfg = self.config
        if cfg.hash_header:
            vals = [v for n, v in headers if n == cfg.hash_header]
            return b",".join(vals) if vals else None
        if cfg.hash_cookie:
            return cookie_value(headers, cfg.hash_cookie)
        return source_ip.encode() if source_ip else None

    def _choose(self, c, headers, source_ip):
        key = self.hash_key(headers, source_ip)
        if key is None:
            return c[int(self._rand() * len(c))]
        return self.lookup(ketama_hash(key), c)

    def lookup(self, h: int, c: tuple[Endpoint, ...] | None = None) -> Endpoint:
        hashes, eps = self.ring(c)
        i = bisect.bisect_left(hashes, h)
        return eps[i if i < len(eps) else 0]


BALANCERS: dict[str, type[Balancer]] = {
    ROUND_ROBIN: RoundRobin, LEAST_REQUEST: LeastRequest, RING_HASH: RingHash, RANDOM: Random,
}


def make_balancer(config: LbConfig, endpoints: Sequence[Endpoint] = (), *, node: str = "",
                  rng: Any = None) -> Balancer:
    return BALANCERS[config.policy](endpoints, config, node=node, rng=rng)


def balancer_for(service: Service, port: ServicePort,
                 traffic_policy_spec: Mapping[str, Any] | LbConfig | None = None, *,
                 node: str = "", rng: Any = None) -> Balancer:
    """A balancer over ``service``'s endpoints for ``port`` per a TrafficPolicy spec (or defaults)."""
    config = traffic_policy_spec if isinstance(traffic_policy_spec, LbConfig) \
        else LbConfig.from_policy(traffic_policy_spec)
    return make_balancer(config, service_endpoints(service, port), node=node, rng=rng)


class LbState:
    """The balancers of one proxy, keyed by ``(namespace, service, port)``; survives snapshot swaps.

    ``get(backend)`` (a ``routing.Backend``: ``key``, ``endpoints``, ``lb``) is the per-request
    call: a dict lookup plus an identity check of the endpoint tuple, O(1) unless the
    snapshot changed.
    """

    __slots__ = ("node", "_rng", "_by_key", "_by_backend")

    def __init__(self, node: str = "", *, rng: Any = None) -> None:
        self.node = node
        self._rng = rng
        self._by_key: dict[tuple[str, str, int], Balancer] = {}
        # id(backend) -> (backend, its balancer in _by_key): skips building the key; cleared
        # whenever _by_key changes, so a hit is exactly what _balancer would return
        self._by_backend: dict[int, tuple[Any, Balancer]] = {}

    def _balancer(self, key: tuple[str, str, int], endpoints: Sequence[Endpoint], config: LbConfig) -> Balancer:
        b = self._by_key.get(key)
        if b is None or (b.config is not config and b.config != config):
            nb = make_balancer(config, endpoints, node=self.node, rng=self._rng)
            if b is not None:
                nb._inherit(b)
            self._by_key[key] = nb
            self._by_backend.clear()
            return nb
        if b._endpoints is not endpoints:
            b.update(endpoints)
        return b

    def get(self, backend: Any) -> Balancer:
        """The balancer of a ``routing.Backend`` (created or updated as needed)."""
        hit = self._by_backend.get(id(backend))
        if hit is not None and hit[0] is backend and hit[1]._endpoints is backend.endpoints:
            return hit[1]
        b = self._balancer(backend.key, backend.endpoints, backend.lb)
        b.set_failing(backend.failing)
        if len(self._by_backend) < 4096:  # backends come from config; bounded anyway
            self._by_backend[id(backend)] = (backend, b)
        return b

    def balancer(self, service: Service, port: ServicePort,
                 traffic_policy_spec: Mapping[str, Any] | LbConfig | None = None) -> Balancer:
        config = traffic_policy_spec if isinstance(traffic_policy_spec, LbConfig) \
            else LbConfig.from_policy(traffic_policy_spec)
        return self._balancer((service.namespace, service.name, port.port),
                              service_endpoints(service, port), config)

    def pick(self, backend: Any, headers: Iterable[tuple[bytes, bytes]] = (), source_ip: str = "") -> Endpoint | None:
        return self.get(backend).pick(headers, source_ip)

    def retain(self, keys: Iterable[tuple[str, str, int]]) -> None:
        """Forget the balancers whose key is not in ``keys`` (services or ports that are gone)."""
        keep = set(keys)
        for k in [k for k in self._by_key if k not in keep]:
            del self._by_key[k]
        self._by_backend.clear()

    def sync(self, table: Any) -> None:
        """``retain`` the service ports of a ``routing.RouteTable`` (call after a swap)."""
        self.retain(table.backend_keys())

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)
