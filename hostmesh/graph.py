"""The service graph of ``hostmesh graph``: who calls whom, computed from the agents' metrics.

Plain functions and objects, no I/O (``hostmesh/graphcmd.py`` scrapes the agents and calls
these): parse each agent's Prometheus text (``parse_exposition``), turn two scrapes of every
agent into per-edge traffic (``compute_graph``), filter and aggregate it, and render it as a
table, JSON or Graphviz DOT.

An edge is *source workload -> destination Service -> destination workload* for one protocol
(``EdgeKey``). Its numbers come from the ARCHITECTURE.md "Metrics" series:

* HTTP, HTTP/2, gRPC: ``hostmesh_requests_total`` (requests, success, mTLS share, response
  codes and flags) and ``hostmesh_request_duration_seconds_bucket`` (p50/p99).
* TCP: ``hostmesh_tcp_connections_opened_total`` and the ``hostmesh_tcp_*_bytes_total``
  counters of ``request_protocol="tcp"`` series. The connection-level series of an L7
  connection carry ``request_protocol="tcp"`` too (the outbound side's without a
  destination workload; the inbound side of a tunnelled one reports only those, having
  relayed it at L4): a (source, Service) pair that has HTTP request series from either
  reporter is an HTTP edge, and its TCP series are not drawn again as a TCP edge.

**Each request counted once.** Every connection between two meshed nodes is reported twice,
by the client's agent (``reporter="source"``) and the server's (``reporter="destination"``).
A source workload that some scraped agent reports as a source is described by the source
series only: the client's agent knows which Service was called (the server's names it by the
endpoint, which is ambiguous when several Services select the same pod). The destination
reporter's series are used for the other callers: callers outside the mesh
(``source_workload="unknown"``; per edge, where no agent reports that edge as a source) and
callers whose agent was not scraped (then named as the server's agent names them).

**Rates** are counter deltas between two scrapes of the same agent divided by the time
between those scrapes (each agent's own elapsed time: agents are scraped concurrently but
not at the same instant). A counter lower in the second scrape was reset (the agent
restarted): as Prometheus' ``rate()``, its delta is then its second value. A histogram is
reset as a whole when any of its buckets went down. A series only in the second scrape
started between the two (delta = its value); a series only in the first contributes
nothing. Without a first scrape (``--since-start``) the deltas are the totals and there are
no rates.

**Success** is the share of requests answered neither 5xx nor ``0`` (no response reached the
client, e.g. flag ``DC``); a gRPC request (``grpc_response_status`` set) succeeds when that
status is ``0``. **Quantiles** follow PromQL's ``histogram_quantile`` over the bucket deltas
summed by ``le``: linear interpolation inside the bucket holding the rank, the lowest
bucket starting at 0, a rank in the ``+Inf`` bucket answered with the highest finite bound.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, NamedTuple

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "hostmesh_requests_total"
DURATION_BUCKET = "hostmesh_request_duration_seconds_bucket"
TCP_OPENED = "hostmesh_tcp_connections_opened_total"
TCP_SENT = "hostmesh_tcp_sent_bytes_total"  # response direction (to the downstream client)
TCP_RECEIVED = "hostmesh_tcp_received_bytes_total"  # request direction
SAMPLE_NAMES = frozenset({REQUESTS, DURATION_BUCKET, TCP_OPENED, TCP_SENT, TCP_RECEIVED})
UNKNOWN = "unknown"
MUTUAL_TLS = "mutual_tls"
REPORTERS = ("source", "destination")
GROUPINGS = ("workload", "service")

# One sample: (sample name, sorted label pairs); the value is the mapping's.
SeriesId = tuple[str, tuple[tuple[str, str], ...]]
Samples = Mapping[SeriesId, float]


class ExpositionError(ValueError):
    """An agent's answer is not Prometheus text format; the message says where it broke."""


def parse_exposition(text: str) -> dict[SeriesId, float]:
    """The graph's samples in one agent's Prometheus text (every other family is skipped)."""
    out: dict[SeriesId, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in SAMPLE_NAMES:
                    out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    except (ValueError, TypeError, IndexError) as exc:
        raise ExpositionError(f"not Prometheus text format: {exc}") from None
    return out


def counter_deltas(before: Samples | None, after: Samples) -> dict[SeriesId, float]:
    """Per series of ``after``: the increase since ``before`` (``None``: since the counter's
    start), with Prometheus' reset rule; a histogram's buckets are reset together."""
    if before is None:
        return dict(after)
    reset_histograms = set()
    for sid, value in after.items():
        if sid[0] == DURATION_BUCKET and value < before.get(sid, 0.0):
            reset_histograms.add(_without_le(sid[1]))
    out = {}
    for sid, value in after.items():
        prev = before.get(sid)
        if sid[0] == DURATION_BUCKET:
            reset = prev is None or _without_le(sid[1]) in reset_histograms
        else:
            reset = prev is None or value < prev
        out[sid] = value if reset else value - prev
    return out


def _without_le(labels: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple(kv for kv in labels if kv[0] != "le")


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """PromQL's ``histogram_quantile`` of cumulative ``buckets`` (upper bound -> count, with
    ``+Inf``); ``None`` without observations or without the ``+Inf`` bucket."""
    bounds = sorted(buckets)
    if len(bounds) < 2 or bounds[-1] != math.inf:
        return None
    counts, highest = [], 0.0
    for b in bounds:  # as Prometheus' ensureMonotonic: a bucket never counts less than the one below
        highest = max(highest, buckets[b])
        counts.append(highest)
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    idx = next((i for i in range(len(bounds) - 1) if counts[i] >= rank), len(bounds) - 1)
    if idx == len(bounds) - 1:
        return bounds[-2]
    if idx == 0 and bounds[0] <= 0:
        return bounds[0]
    start = 0.0 if idx == 0 else bounds[idx - 1]
    below = 0.0 if idx == 0 else counts[idx - 1]
    in_bucket = counts[idx] - below
    if in_bucket <= 0:
        return start
    return start + (bounds[idx] - start) * (rank - below) / in_bucket


class EdgeKey(NamedTuple):
    """One edge: who called which Service (and which of its workloads), over which protocol."""

    source_workload: str
    source_namespace: str
    service: str  # destination_service_name
    service_namespace: str
    destination_workload: str
    destination_namespace: str
    protocol: str  # request_protocol: http, http2, grpc, tcp

    @property
    def source_id(self) -> str:
        return workload_id(self.source_workload, self.source_namespace)

    @property
    def service_id(self) -> str:
        return service_id(self.service, self.service_namespace)

    @property
    def destination_id(self) -> str | None:
        if self.destination_workload == UNKNOWN:
            return None
        return workload_id(self.destination_workload, self.destination_namespace)


def workload_id(name: str, namespace: str) -> str:
    return UNKNOWN if name == UNKNOWN else f"workload:{namespace}/{name}"


def service_id(name: str, namespace: str) -> str:
    return "service:unknown" if name == UNKNOWN else f"service:{namespace}/{name}"


def _edge_key(labels: Mapping[str, str], protocol: str) -> EdgeKey:
    g = lambda k: labels.get(k) or UNKNOWN  # noqa: E731
    return EdgeKey(g("source_workload"), g("source_workload_namespace"), g("destination_service_name"),
                   g("destination_service_namespace"), g("destination_workload"),
                   g("destination_workload_namespace"), protocol)


@dataclass
class EdgeStats:
    """What went over one edge during the window (counts; rates summed over agents)."""

    requests: float = 0.0
    request_rate: float | None = None
    failures: float = 0.0
    mutual_tls: float = 0.0  # requests (HTTP) or connections (TCP) over mTLS
    response_codes: Counter = field(default_factory=Counter)
    response_flags: Counter = field(default_factory=Counter)
    duration_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    connections: float = 0.0
    connection_rate: float | None = None
    sent_bytes: float = 0.0  # to the client
    received_bytes: float = 0.0  # from the client
    sent_rate: float | None = None
    received_rate: float | None = None
    reporters: set[str] = field(default_factory=set)
    agents: set[str] = field(default_factory=set)

    @property
    def idle(self) -> bool:
        return self.requests == 0 and self.connections == 0

    @property
    def success_rate(self) -> float | None:
        return None if self.requests <= 0 else (self.requests - self.failures) / self.requests

    def quantile(self, q: float) -> float | None:
        return histogram_quantile(q, self.duration_buckets)

    @property
    def mtls_share(self) -> float | None:
        base = self.requests if self.requests > 0 else self.connections
        return None if base <= 0 else self.mutual_tls / base

    def merge(self, other: "EdgeStats") -> None:
        self.requests += other.requests
        self.failures += other.failures
        self.mutual_tls += other.mutual_tls
        self.response_codes.update(other.response_codes)
        self.response_flags.update(other.response_flags)
        for le, n in other.duration_buckets.items():
            self.duration_buckets[le] = self.duration_buckets.get(le, 0.0) + n
        self.connections += other.connections
        self.sent_bytes += other.sent_bytes
        self.received_bytes += other.received_bytes
        for attr in ("request_rate", "connection_rate", "sent_rate", "received_rate"):
            mine, theirs = getattr(self, attr), getattr(other, attr)
            setattr(self, attr, theirs if mine is None else mine if theirs is None else mine + theirs)
        self.reporters |= other.reporters
        self.agents |= other.agents


@dataclass(frozen=True)
class AgentScrape:
    """One agent's samples at one instant (``at``: seconds on a monotonic clock)."""

    agent: str
    at: float
    samples: Samples


@dataclass(frozen=True)
class ScrapeError:
    agent: str
    error: str


@dataclass
class Graph:
    """The edges of one window; ``window_seconds`` None: totals since the agents started."""

    edges: dict[EdgeKey, EdgeStats]
    window_seconds: float | None
    agents: list[str]
    errors: list[ScrapeError]

    @property
    def complete(self) -> bool:
        return not self.errors


def _is_failure(labels: Mapping[str, str]) -> bool:
    grpc = labels.get("grpc_response_status", "")
    if grpc:
        return grpc != "0"
    code = labels.get("response_code", "")
    return code.startswith("5") or code in ("0", "")


def compute_graph(after: Iterable[AgentScrape], before: Iterable[AgentScrape] | None = None,
                  errors: Iterable[ScrapeError] = (), *, include_idle: bool = False) -> Graph:
    """The graph between ``before`` and ``after`` (the same agents scraped twice; an agent in
    only one of them was not scraped twice and is left out), or of the totals in ``after``
    when ``before`` is None. ``errors``: the agents that could not be scraped (reported)."""
    errors = list(errors)
    per_agent = _window_deltas({s.agent: s for s in after},
                               None if before is None else {s.agent: s for s in before}, errors)
    by_reporter, source_reported = _accumulate(per_agent)
    edges = {}
    for key, reporters in by_reporter.items():
        if key.source_workload == UNKNOWN:
            stats = reporters.get("source") or reporters["destination"]
        elif (key.source_workload, key.source_namespace) in source_reported:
            stats = reporters.get("source")  # its own agent speaks for it (see the module docstring)
        else:
            stats = reporters.get("destination")
        if stats is not None and (include_idle or not stats.idle):
            edges[key] = stats
    elapsed = [e for _, _, e in per_agent if e is not None]
    window = sum(elapsed) / len(elapsed) if elapsed else (None if before is None else 0.0)
    return Graph(edges=edges, window_seconds=window, agents=[a for a, _, _ in per_agent], errors=errors)


def _window_deltas(after: dict[str, AgentScrape], first: dict[str, AgentScrape] | None,
                   errors: list[ScrapeError]) -> list[tuple[str, dict[SeriesId, float], float | None]]:
    """(agent, counter deltas, seconds between its scrapes) per agent scraped as needed;
    the others are added to ``errors``."""
    failed = {e.agent for e in errors}
    out = []
    for agent, scrape in sorted(after.items()):
        if agent in failed:
            continue
        if first is None:
            out.append((agent, counter_deltas(None, scrape.samples), None))
            continue
        prev = first.get(agent)
        if prev is None:
            errors.append(ScrapeError(agent, "scraped only once: not part of this window"))
        elif scrape.at <= prev.at:
            errors.append(ScrapeError(agent, "the two scrapes were not apart in time"))
        else:
            out.append((agent, counter_deltas(prev.samples, scrape.samples), scrape.at - prev.at))
    return out


def _accumulate(per_agent) -> tuple[dict[EdgeKey, dict[str, EdgeStats]], set[tuple[str, str]]]:
    """Edge -> reporter -> stats, and the workloads some agent reports as a source."""
    by_reporter: dict[EdgeKey, dict[str, EdgeStats]] = {}
    source_reported: set[tuple[str, str]] = set()
    http_pairs: set[tuple[str, ...]] = set()  # (source, Service) pairs with request series, any reporter
    tcp_series: list[tuple] = []  # (agent, key, reporter, sample name, delta, elapsed, labels)
    for agent, deltas, elapsed in per_agent:
        for (name, label_pairs), delta in deltas.items():
            labels = dict(label_pairs)
            reporter = labels.get("reporter", "")
            if reporter not in REPORTERS:
                continue
            protocol = labels.get("request_protocol") or "tcp"
            if reporter == "source":
                source_reported.add((labels.get("source_workload") or UNKNOWN,
                                     labels.get("source_workload_namespace") or UNKNOWN))
            if name == REQUESTS or name == DURATION_BUCKET:
                key = _edge_key(labels, protocol)
                http_pairs.add(key[:4])
                stats = _stats(by_reporter, key, reporter, agent)
                if name == REQUESTS:
                    stats.requests += delta
                    stats.request_rate = _add(stats.request_rate, None if elapsed is None else delta / elapsed)
                    if _is_failure(labels):
                        stats.failures += delta
                    if labels.get("connection_security_policy") == MUTUAL_TLS:
                        stats.mutual_tls += delta
                    stats.response_codes[labels.get("response_code", "")] += delta
                    stats.response_flags[labels.get("response_flags", "-")] += delta
                else:
                    le = float(labels.get("le", "nan"))
                    if not math.isnan(le):
                        stats.duration_buckets[le] = stats.duration_buckets.get(le, 0.0) + delta
            elif protocol == "tcp":
                tcp_series.append((agent, _edge_key(labels, "tcp"), reporter, name, delta, elapsed, labels))
    for agent, key, reporter, name, delta, elapsed, labels in tcp_series:
        if key[:4] in http_pairs:
            continue  # the connection-level series of HTTP requests (either reporter's: the inbound
            # side of a tunnelled L7 connection relays it at L4 and reports only these)
        stats = _stats(by_reporter, key, reporter, agent)
        rate = None if elapsed is None else delta / elapsed
        if name == TCP_OPENED:
            stats.connections += delta
            stats.connection_rate = _add(stats.connection_rate, rate)
            if labels.get("connection_security_policy") == MUTUAL_TLS:
                stats.mutual_tls += delta
        elif name == TCP_SENT:
            stats.sent_bytes += delta
            stats.sent_rate = _add(stats.sent_rate, rate)
        else:
            stats.received_bytes += delta
            stats.received_rate = _add(stats.received_rate, rate)
    return by_reporter, source_reported


def _add(total: float | None, rate: float | None) -> float | None:
    return rate if total is None else total + (rate or 0.0)


def _stats(by_reporter: dict, key: EdgeKey, reporter: str, agent: str) -> EdgeStats:
    stats = by_reporter.setdefault(key, {}).get(reporter)
    if stats is None:
        stats = by_reporter[key][reporter] = EdgeStats()
    stats.reporters.add(reporter)
    stats.agents.add(agent)
    return stats


# ---------------------------------------------------------------- filters and grouping
def filter_graph(graph: Graph, namespaces: Iterable[str] = (), workloads: Iterable[str] = ()) -> Graph:
    """Keep the edges touching one of ``namespaces`` (source, Service or destination
    namespace) and one of ``workloads`` (``NAME`` or ``NAMESPACE/NAME``, as source or
    destination); an empty filter keeps everything."""
    namespaces, workloads = set(namespaces), list(workloads)

    def wanted(k: EdgeKey) -> bool:
        if namespaces and not namespaces & {k.source_namespace, k.service_namespace, k.destination_namespace}:
            return False
        if workloads and not any(_workload_matches(w, name, ns) for w in workloads for name, ns in
                                 ((k.source_workload, k.source_namespace),
                                  (k.destination_workload, k.destination_namespace))):
            return False
        return True
    return Graph({k: v for k, v in graph.edges.items() if wanted(k)}, graph.window_seconds, graph.agents,
                 graph.errors)


def _workload_matches(spec: str, name: str, namespace: str) -> bool:
    ns, _, wl = spec.rpartition("/")
    return wl == name and (not ns or ns == namespace)


def group_edges(graph: Graph, by: str = "workload") -> dict[EdgeKey, EdgeStats]:
    """``workload``: the edges as computed; ``service``: summed over each Service's
    workloads (the destination workload fields become ``unknown``)."""
    if by not in GROUPINGS:
        raise ValueError(f"group by {by!r}: expected one of {', '.join(GROUPINGS)}")
    if by == "workload":
        return dict(graph.edges)
    return _merged(graph.edges, lambda k: k._replace(destination_workload=UNKNOWN, destination_namespace=UNKNOWN))


def _merged(edges: Mapping[EdgeKey, EdgeStats], keyfn: Callable[[EdgeKey], object]) -> dict:
    out: dict = {}
    for key, stats in edges.items():
        k = keyfn(key)
        acc = out.get(k)
        if acc is None:
            acc = out[k] = EdgeStats()
        acc.merge(stats)
    return out


def _sort_key(item: tuple[EdgeKey, EdgeStats]):
    key, s = item
    volume = (s.request_rate if s.request_rate is not None else s.requests) \
        if s.requests else (s.connection_rate if s.connection_rate is not None else s.connections)
    return (-volume, key)


def sorted_edges(edges: Mapping[EdgeKey, EdgeStats]) -> list[tuple[EdgeKey, EdgeStats]]:
    """Busiest first (requests, else connections, per second or in total), then by name."""
    return sorted(edges.items(), key=_sort_key)


# ---------------------------------------------------------------- rendering
def _round(v: float | None, digits: int = 4) -> float | int | None:
    if v is None:
        return None
    r = round(v, digits)
    return int(r) if r == int(r) and abs(r) < 2 ** 53 else r


def node_list(edges: Mapping[EdgeKey, EdgeStats]) -> list[dict]:
    nodes: dict[str, dict] = {}
    for k in edges:
        for nid, kind, name, ns in ((k.source_id, "workload", k.source_workload, k.source_namespace),
                                    (k.service_id, "service", k.service, k.service_namespace),
                                    (k.destination_id, "workload", k.destination_workload, k.destination_namespace)):
            if nid is None or nid in nodes:
                continue
            if name == UNKNOWN:
                nodes[nid] = {"id": nid, "kind": "unknown" if kind == "workload" else "service",
                              "name": UNKNOWN, "namespace": None}
            else:
                nodes[nid] = {"id": nid, "kind": kind, "name": name, "namespace": ns}
    return sorted(nodes.values(), key=lambda n: n["id"])


def edge_dict(key: EdgeKey, s: EdgeStats) -> dict:
    d = {
        "source": key.source_id, "source_workload": key.source_workload, "source_namespace": key.source_namespace,
        "service": key.service_id, "destination_service_name": key.service,
        "destination_service_namespace": key.service_namespace,
        "destination": key.destination_id, "destination_workload": key.destination_workload,
        "destination_workload_namespace": key.destination_namespace,
        "protocol": key.protocol, "reporter": "source" if "source" in s.reporters else "destination",
        "agents": sorted(s.agents), "mtls_share": _round(s.mtls_share),
    }
    if key.protocol == "tcp":
        d["tcp"] = {"connections": _round(s.connections), "connections_per_second": _round(s.connection_rate),
                    "sent_bytes": _round(s.sent_bytes), "received_bytes": _round(s.received_bytes),
                    "sent_bytes_per_second": _round(s.sent_rate, 1),
                    "received_bytes_per_second": _round(s.received_rate, 1)}
        d.update(requests=None, rps=None, success_rate=None, p50_seconds=None, p99_seconds=None)
    else:
        d.update(requests=_round(s.requests), rps=_round(s.request_rate), success_rate=_round(s.success_rate),
                 p50_seconds=_round(s.quantile(0.5), 6), p99_seconds=_round(s.quantile(0.99), 6),
                 response_codes={c: _round(n) for c, n in sorted(s.response_codes.items()) if n},
                 response_flags={f: _round(n) for f, n in sorted(s.response_flags.items()) if n})
    return d


def graph_dict(graph: Graph, by: str = "workload") -> dict:
    """The ``-o json`` document (schema in README "Service graph")."""
    edges = group_edges(graph, by)
    return {
        "mode": "since-start" if graph.window_seconds is None else "interval",
        "window_seconds": _round(graph.window_seconds, 3),
        "grouped_by": by,
        "complete": graph.complete,
        "agents": sorted(graph.agents),
        "scrape_errors": [{"agent": e.agent, "error": e.error} for e in graph.errors],
        "nodes": node_list(edges),
        "edges": [edge_dict(k, s) for k, s in sorted_edges(edges)],
    }


def _name(name: str, namespace: str) -> str:
    return UNKNOWN if name == UNKNOWN else f"{namespace}/{name}"


def _pct(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 100:.1f}%" if v < 1 else "100%"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.2f}ms" if ms < 10 else f"{ms:.0f}ms" if ms < 10_000 else f"{seconds:.0f}s"


def _bytes(rate: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if rate < 1024:
            return f"{rate:.0f}{unit}" if unit == "B" else f"{rate:.1f}{unit}"
        rate /= 1024
    return f"{rate:.1f}GiB"


def _volume(s: EdgeStats, tcp: bool) -> str:
    if tcp:
        return f"{s.connection_rate:.2f} conn/s" if s.connection_rate is not None else f"{s.connections:g} conn"
    return f"{s.request_rate:.2f} rps" if s.request_rate is not None else f"{s.requests:g} req"


def render_table(graph: Graph, by: str = "workload") -> str:
    edges = group_edges(graph, by)
    rows = []
    for k, s in sorted_edges(edges):
        tcp = k.protocol == "tcp"
        if tcp:
            through = (f"{_bytes(s.received_rate or 0)}/s in, {_bytes(s.sent_rate or 0)}/s out"
                       if s.sent_rate is not None or s.received_rate is not None
                       else f"{_bytes(s.received_bytes)} in, {_bytes(s.sent_bytes)} out")
        else:
            through = "-"
        rows.append([_name(k.source_workload, k.source_namespace), _name(k.service, k.service_namespace),
                     _name(k.destination_workload, k.destination_namespace) if by == "workload" else None,
                     k.protocol, _volume(s, tcp), "-" if tcp else _pct(s.success_rate),
                     "-" if tcp else _ms(s.quantile(0.99)), _pct(s.mtls_share), through])
    volume = "TOTAL" if graph.window_seconds is None else "RATE"
    headers = ["SOURCE", "SERVICE", "DESTINATION", "PROTO", volume, "SUCCESS", "P99", "MTLS", "BYTES"]
    if by == "service":
        headers.pop(2)
        rows = [r[:2] + r[3:] for r in rows]
    if not graph.agents:
        head = "no agent could be scraped"
    else:
        head = "totals since the agents started" if graph.window_seconds is None \
            else f"window {graph.window_seconds:.1f}s"
        head += f", {len(graph.agents)} agent{'s' if len(graph.agents) != 1 else ''} scraped"
    lines = [head]
    if not graph.complete:
        lines.append(f"INCOMPLETE: {len(graph.errors)} agent(s) not scraped; their traffic may be missing")
    lines.append("")
    lines.append(_table(headers, rows) if rows else "no traffic in this window")
    return "\n".join(lines)


def _table(headers, rows) -> str:
    from hostmesh.output import table
    return table(headers, rows)


# ---------------------------------------------------------------- DOT
SUCCESS_WARN, SUCCESS_BAD = 0.99, 0.95
COLOR_OK, COLOR_WARN, COLOR_BAD, COLOR_TCP, COLOR_IDLE = "#2e7d32", "#ef6c00", "#c62828", "#1565c0", "#9e9e9e"


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _edge_color(s: EdgeStats, tcp: bool) -> str:
    if s.idle:
        return COLOR_IDLE
    if tcp:
        return COLOR_TCP
    ok = s.success_rate
    return COLOR_OK if ok is None or ok >= SUCCESS_WARN else COLOR_WARN if ok >= SUCCESS_BAD else COLOR_BAD


def _edge_label(s: EdgeStats, tcp: bool) -> str:
    lines = [_volume(s, tcp)]
    if tcp:
        if s.sent_rate is not None or s.received_rate is not None:
            lines.append(f"{_bytes((s.sent_rate or 0) + (s.received_rate or 0))}/s")
    else:
        lines.append(f"{_pct(s.success_rate)} ok")
        lines.append(f"p99 {_ms(s.quantile(0.99))}")
    if s.mtls_share:
        lines.append("mTLS" if s.mtls_share >= 1 else f"mTLS {_pct(s.mtls_share)}")
    return "\n".join(lines)


def _penwidth(s: EdgeStats, tcp: bool) -> str:
    rate = (s.connection_rate if tcp else s.request_rate)
    volume = rate if rate is not None else (s.connections if tcp else s.requests)
    return f"{1 + min(4.0, math.log10(1 + max(volume, 0.0))):.1f}"


def render_dot(graph: Graph, by: str = "workload") -> str:
    """Graphviz DOT: workloads as boxes, Services as ellipses (as Kiali draws them), an edge
    source -> Service per protocol (requests or connections per second, success, p99, mTLS;
    red below 95 % success, orange below 99 %, blue for TCP), and with ``by="workload"``
    Service -> workload edges showing how the Service's traffic spread over its workloads."""
    edges = group_edges(graph, by)
    out = ["digraph hostmesh {", "  rankdir=LR;",
           '  graph [fontname="Helvetica", fontsize=10, labelloc=t, label=' + _q(_dot_title(graph)) + "];",
           '  node [fontname="Helvetica", fontsize=10];', '  edge [fontname="Helvetica", fontsize=9];']
    for n in node_list(edges):
        label = n["name"] if n["namespace"] is None else f"{n['name']}\n{n['namespace']}"
        if n["kind"] == "service":
            attrs = 'shape=ellipse, style=filled, fillcolor="#e3f2fd"'
            if n["name"] == UNKNOWN:
                label = "unknown\n(passthrough)"
        elif n["kind"] == "unknown":
            attrs = f'shape=box, style="rounded,dashed", color="{COLOR_IDLE}"'
        else:
            attrs = 'shape=box, style="rounded,filled", fillcolor="#f5f5f5"'
        out.append(f"  {_q(n['id'])} [label={_q(label)}, {attrs}];")
    to_service = _merged(edges, lambda k: (k.source_id, k.service_id, k.protocol))
    for (src, svc, proto), s in sorted(to_service.items(), key=lambda kv: kv[0]):
        tcp = proto == "tcp"
        label = _edge_label(s, tcp) if proto in ("http", "tcp") else f"{proto}\n{_edge_label(s, tcp)}"
        out.append(f"  {_q(src)} -> {_q(svc)} [label={_q(label)}, color={_q(_edge_color(s, tcp))}, "
                   f"fontcolor={_q(_edge_color(s, tcp))}, penwidth={_penwidth(s, tcp)}"
                   f"{'' if s.mtls_share else ', style=dashed'}];")
    if by == "workload":
        to_workload = _merged({k: v for k, v in edges.items() if k.destination_id is not None},
                              lambda k: (k.service_id, k.destination_id, k.protocol))
        for (svc, dst, proto), s in sorted(to_workload.items(), key=lambda kv: kv[0]):
            tcp = proto == "tcp"
            out.append(f"  {_q(svc)} -> {_q(dst)} [label={_q(_volume(s, tcp))}, color={_q(_edge_color(s, tcp))}, "
                       f"penwidth={_penwidth(s, tcp)}, arrowsize=0.7];")
    out.append("}")
    return "\n".join(out) + "\n"


def _dot_title(graph: Graph) -> str:
    title = "hostmesh service graph, " + ("totals since start" if graph.window_seconds is None
                                           else f"{graph.window_seconds:.1f}s window")
    if not graph.complete:
        title += f" (INCOMPLETE: {', '.join(e.agent for e in graph.errors)} not scraped)"
    return title
