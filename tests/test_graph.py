"""`hostmesh graph` without a lab: the math of hostmesh/graph.py on hand-made Prometheus text
(and on the agent's own metric classes' exposition), and the I/O layer
(hostmesh/graphcmd.py) with fake fetchers and with tiny loopback HTTP servers."""

from __future__ import annotations

import argparse
import http.server
import io
import json
import math
import threading
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh import cli, graphcmd
from hostmesh.graph import (DURATION_BUCKET, REQUESTS, AgentScrape, EdgeKey, ExpositionError, ScrapeError,
                            compute_graph, counter_deltas, filter_graph, graph_dict, group_edges,
                            histogram_quantile, parse_exposition, render_dot, render_table)
from nodeagent.proxy.l7.metrics import DURATION_BUCKETS

pytestmark = pytest.mark.timeout(60)

BOUNDS = [*DURATION_BUCKETS, math.inf]


def _le(b: float) -> str:
    return "+Inf" if b == math.inf else repr(b)


class FakeAgent:
    """Accumulates what an agent would have counted and renders it as Prometheus text."""

    def __init__(self) -> None:
        self.requests: dict[tuple, float] = defaultdict(float)
        self.buckets: dict[tuple, list[float]] = {}
        self.tcp: dict[tuple[str, tuple], float] = defaultdict(float)

    @staticmethod
    def labels(src, svc, dst, *, reporter="source", ns="default", protocol="http", mtls=False, flags="-",
               src_ns=None, dst_ns=None) -> dict:
        return {"reporter": reporter, "source_workload": src, "source_workload_namespace": src_ns or ns,
                "source_principal": "unknown", "destination_service": f"{svc}.{ns}.svc.cluster.local",
                "destination_service_name": svc, "destination_service_namespace": ns,
                "destination_workload": dst, "destination_workload_namespace": dst_ns or ns,
                "request_protocol": protocol, "connection_security_policy": "mutual_tls" if mtls else "none",
                "response_flags": flags}

    def request(self, src, svc, dst, code="200", seconds=0.001, n=1, grpc="", **kw) -> "FakeAgent":
        lab = self.labels(src, svc, dst, **kw) | {"response_code": str(code), "grpc_response_status": grpc}
        key = tuple(sorted(lab.items()))
        self.requests[key] += n
        counts = self.buckets.setdefault(key, [0.0] * len(BOUNDS))
        for i, b in enumerate(BOUNDS):
            if seconds <= b:
                counts[i] += n
        return self

    def connections(self, src, svc, dst, n=1, sent=0, received=0, **kw) -> "FakeAgent":
        key = tuple(sorted(self.labels(src, svc, dst, protocol="tcp", **kw).items()))
        self.tcp[("hostmesh_tcp_connections_opened_total", key)] += n
        self.tcp[("hostmesh_tcp_sent_bytes_total", key)] += sent
        self.tcp[("hostmesh_tcp_received_bytes_total", key)] += received
        return self

    def text(self) -> str:
        esc = lambda v: v.replace("\\", "\\\\").replace('"', '\\"')  # noqa: E731 (the text format's escapes)
        fmt = lambda labels: ",".join(f'{k}="{esc(v)}"' for k, v in labels)  # noqa: E731
        out = ["# HELP hostmesh_agent_ready 1 when ready.", "# TYPE hostmesh_agent_ready gauge",
               "hostmesh_agent_ready 1.0",
               "# HELP hostmesh_requests_total Requests.", "# TYPE hostmesh_requests_total counter"]
        out += [f"hostmesh_requests_total{{{fmt(k)}}} {v}" for k, v in self.requests.items()]
        out += ["# HELP hostmesh_request_duration_seconds Duration.",
                "# TYPE hostmesh_request_duration_seconds histogram"]
        for k, counts in self.buckets.items():
            out += [f"hostmesh_request_duration_seconds_bucket{{{fmt(k)},le=\"{_le(b)}\"}} {c}"
                    for b, c in zip(BOUNDS, counts)]
            out += [f"hostmesh_request_duration_seconds_count{{{fmt(k)}}} {counts[-1]}",
                    f"hostmesh_request_duration_seconds_sum{{{fmt(k)}}} 0.5"]
        for name in ("hostmesh_tcp_connections_opened_total", "hostmesh_tcp_sent_bytes_total",
                     "hostmesh_tcp_received_bytes_total"):
            out += [f"# HELP {name} x", f"# TYPE {name} counter"]
            out += [f"{n}{{{fmt(k)}}} {v}" for (n, k), v in self.tcp.items() if n == name]
        return "\n".join(out) + "\n"

    def scrape(self, agent: str, at: float) -> AgentScrape:
        return AgentScrape(agent, at, parse_exposition(self.text()))


def edge(graph, src, svc, dst, protocol="http", ns="default"):
    return graph.edges[EdgeKey(src, ns, svc, ns, dst, ns if dst != "unknown" else "unknown", protocol)]


# ---------------------------------------------------------------- parsing
def test_parse_keeps_the_graph_samples_only():
    samples = parse_exposition(FakeAgent().request("a", "s", "b").text())
    names = {name for name, _ in samples}
    assert names == {REQUESTS, DURATION_BUCKET}  # no _count/_sum, no other family
    (labels,) = [lab for name, lab in samples if name == REQUESTS]
    assert labels == tuple(sorted(labels)) and dict(labels)["response_code"] == "200"


def test_parse_error_names_the_problem():
    with pytest.raises(ExpositionError, match="not Prometheus text format"):
        parse_exposition("<html>nope {{{ </html>\n")


def test_parse_reads_the_agents_own_exposition():
    """The agent's metric classes, exposed by prometheus_client, parse into the same edges."""
    from prometheus_client import CollectorRegistry, generate_latest

    from nodeagent.proxy.l7.metrics import HttpMetrics
    from nodeagent.telemetry import ProxyMetrics, TcpLabels
    registry = CollectorRegistry()
    http_metrics, proxy = HttpMetrics(registry), ProxyMetrics(registry)
    labels = TcpLabels("source", "client", "default", destination_service_name="web",
                       destination_service_namespace="default", destination_workload="web-1",
                       destination_workload_namespace="default", request_protocol="http",
                       connection_security_policy="mutual_tls")
    for i in range(10):
        http_metrics.observe(labels, 503 if i < 2 else 200, "-", 0.004, 10, 20)
    db = TcpLabels("source", "client", "default", destination_service_name="db",
                   destination_service_namespace="default", destination_workload="db-1",
                   destination_workload_namespace="default")
    series = proxy.tcp(db)
    series.opened.inc(3)
    series.sent_bytes.inc(3000)
    graph = compute_graph([AgentScrape("n1", 0.0, parse_exposition(generate_latest(registry).decode()))])
    web = edge(graph, "client", "web", "web-1")
    assert (web.requests, web.success_rate, web.mtls_share) == (10, 0.8, 1.0)
    assert 0.0025 < web.quantile(0.99) <= 0.005
    tcp = edge(graph, "client", "db", "db-1", "tcp")
    assert (tcp.connections, tcp.sent_bytes, tcp.requests) == (3, 3000, 0)


# ---------------------------------------------------------------- quantiles
def test_histogram_quantile_as_promql():
    buckets = {0.1: 10, 0.2: 20, math.inf: 20}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.198)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)  # the lowest bucket starts at 0
    assert histogram_quantile(0.99, {0.1: 1, 0.2: 1, math.inf: 10}) == 0.2  # in +Inf: the highest bound
    assert histogram_quantile(0.5, {0.1: 0, math.inf: 0}) is None  # no observations
    assert histogram_quantile(0.5, {0.1: 5, 0.2: 10}) is None  # no +Inf bucket
    assert histogram_quantile(0.5, {0.1: 10, 0.2: 5, math.inf: 10}) == pytest.approx(0.05)  # made monotonic


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.00001, max_value=50.0), min_size=1, max_size=300),
       st.sampled_from([0.5, 0.9, 0.99]))
def test_the_quantile_lies_in_the_bucket_of_the_true_quantile(observations, q):
    agent = FakeAgent()
    for seconds in observations:
        agent.request("a", "s", "b", seconds=seconds)
    got = edge(compute_graph([agent.scrape("n", 0.0)]), "a", "s", "b").quantile(q)
    true = sorted(observations)[math.ceil(q * len(observations)) - 1]
    upper = next(b for b in BOUNDS if true <= b)
    lower = max([0.0] + [b for b in BOUNDS if b < upper])
    assert lower <= got <= upper


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["n1", "n2"]), st.sampled_from(["200", "503", "404"]),
                          st.floats(min_value=0.0001, max_value=2.0)), min_size=1, max_size=60))
def test_splitting_observations_across_agents_changes_nothing(observations):
    """Each agent reports its own clients' requests: the sum is what one agent would say."""
    one, split = FakeAgent(), {"n1": FakeAgent(), "n2": FakeAgent()}
    for node, code, seconds in observations:
        one.request("a", "s", "b", code=code, seconds=seconds)
        split[node].request("a", "s", "b", code=code, seconds=seconds)
    whole = edge(compute_graph([one.scrape("n", 0.0)]), "a", "s", "b")
    parts = edge(compute_graph([a.scrape(n, 0.0) for n, a in split.items() if a.requests]), "a", "s", "b")
    assert parts.requests == whole.requests == len(observations)
    assert parts.success_rate == pytest.approx(whole.success_rate)
    assert parts.quantile(0.99) == pytest.approx(whole.quantile(0.99))


# ---------------------------------------------------------------- deltas and rates
def test_counter_deltas_handle_resets_new_and_gone_series():
    a, b, c = (REQUESTS, (("x", "a"),)), (REQUESTS, (("x", "b"),)), (REQUESTS, (("x", "c"),))
    before = {a: 10.0, b: 5.0, c: 7.0}
    after = {a: 15.0, b: 2.0, (REQUESTS, (("x", "new"),)): 4.0}
    d = counter_deltas(before, after)
    assert d == {a: 5.0, b: 2.0, (REQUESTS, (("x", "new"),)): 4.0}  # reset: the new value; c gone: nothing


def test_a_histogram_is_reset_as_a_whole():
    lab = (("x", "a"),)
    bucket = lambda le: (DURATION_BUCKET, tuple(sorted(lab + (("le", le),))))  # noqa: E731
    before = {bucket("0.1"): 5.0, bucket("+Inf"): 10.0}
    after = {bucket("0.1"): 6.0, bucket("+Inf"): 8.0}  # +Inf went down: the agent restarted
    assert counter_deltas(before, after) == after


def test_rates_are_deltas_over_each_agents_own_elapsed_time():
    n1, n2 = FakeAgent().request("a", "s", "b", n=100), FakeAgent().request("c", "s", "b", n=10)
    first = [n1.scrape("n1", 100.0), n2.scrape("n2", 100.5)]
    n1.request("a", "s", "b", n=50)  # 50 in 5 s
    n1.request("a", "s", "b", code="503", n=50, seconds=0.3)  # and 50 failing slowly
    n2.request("c", "s", "b", n=20)  # 20 in 4 s
    graph = compute_graph([n1.scrape("n1", 105.0), n2.scrape("n2", 104.5)], first)
    ab, cb = edge(graph, "a", "s", "b"), edge(graph, "c", "s", "b")
    assert (ab.requests, ab.request_rate, ab.success_rate) == (100, 20.0, 0.5)
    assert 0.25 < ab.quantile(0.99) <= 0.5 and ab.quantile(0.5) <= 0.001
    assert (cb.requests, cb.request_rate, cb.success_rate) == (20, 5.0, 1.0)
    assert graph.window_seconds == pytest.approx(4.5) and graph.complete
    merged = group_edges(graph, "service")
    assert sum(s.request_rate for s in merged.values()) == 25.0


def test_an_agent_restart_between_scrapes_counts_as_prometheus_does():
    old = FakeAgent().request("a", "s", "b", n=1000)
    restarted = FakeAgent().request("a", "s", "b", n=30)
    graph = compute_graph([restarted.scrape("n1", 10.0)], [old.scrape("n1", 0.0)])
    e = edge(graph, "a", "s", "b")
    assert (e.requests, e.request_rate, e.duration_buckets[math.inf]) == (30, 3.0, 30)


def test_idle_edges_are_left_out_unless_asked_for():
    agent = FakeAgent().request("a", "s", "b", n=5)
    first = agent.scrape("n1", 0.0)
    assert compute_graph([agent.scrape("n1", 5.0)], [first]).edges == {}
    assert list(compute_graph([agent.scrape("n1", 5.0)], [first], include_idle=True).edges)


# ---------------------------------------------------------------- reporters
def test_each_request_counted_once_the_source_reporter_wins():
    client_node = FakeAgent().request("a", "s", "b", n=10, mtls=True)
    server_node = FakeAgent().request("a", "s", "b", n=10, mtls=True, reporter="destination")
    graph = compute_graph([client_node.scrape("n1", 0.0), server_node.scrape("n2", 0.0)])
    e = edge(graph, "a", "s", "b")
    assert e.requests == 10 and e.reporters == {"source"} and e.agents == {"n1"}


def test_callers_outside_the_mesh_come_from_the_destination_reporter():
    server_node = FakeAgent().request("unknown", "s", "b", n=7, reporter="destination", src_ns="unknown")
    server_node.request("a", "s", "b", n=3, reporter="destination")
    client_node = FakeAgent().request("a", "s", "b", n=3)
    graph = compute_graph([client_node.scrape("n1", 0.0), server_node.scrape("n2", 0.0)])
    outside = graph.edges[EdgeKey("unknown", "unknown", "s", "default", "b", "default", "http")]
    assert outside.requests == 7 and outside.reporters == {"destination"}
    assert edge(graph, "a", "s", "b").requests == 3
    doc = graph_dict(graph)
    assert {"id": "unknown", "kind": "unknown", "name": "unknown", "namespace": None} in doc["nodes"]


def test_the_servers_agent_does_not_rename_a_known_callers_edges():
    """Two Services select the same pod: the server's agent names the connection by the
    endpoint (here the other Service); the client's agent knows which one was called."""
    client = FakeAgent().connections("a", "gamma", "b", n=4)
    server = FakeAgent().connections("a", "alpha", "b", n=4, reporter="destination")
    graph = compute_graph([client.scrape("n1", 0.0), server.scrape("n2", 0.0)])
    assert [(k.service, s.connections) for k, s in graph.edges.items()] == [("gamma", 4)]
    # the client's agent not scraped: the server's view, as it names it, rather than nothing
    fallback = compute_graph([server.scrape("n2", 0.0)], errors=[ScrapeError("n1", "timed out")])
    assert [(k.service, s.reporters) for k, s in fallback.edges.items()] == [("alpha", {"destination"})]


def test_tcp_edges_and_the_connection_series_of_http_edges():
    client = FakeAgent().connections("a", "db", "db-1", n=4, sent=4096, received=1024)
    # an HTTP connection: its outbound TCP series (no destination workload) and, on the
    # server's node, the tunnelled inbound side that reports only TCP series
    client.request("a", "web", "web-1", n=8).connections("a", "web", "unknown", n=1)
    server = FakeAgent().connections("a", "web", "web-1", n=1, reporter="destination", mtls=True)
    server.connections("a", "db", "db-1", n=4, reporter="destination")
    graph = compute_graph([client.scrape("n1", 0.0), server.scrape("n2", 0.0)])
    assert {(k.service, k.destination_workload, k.protocol) for k in graph.edges} == \
        {("db", "db-1", "tcp"), ("web", "web-1", "http")}
    db = edge(graph, "a", "db", "db-1", "tcp")
    assert (db.connections, db.sent_bytes, db.received_bytes, db.reporters) == (4, 4096, 1024, {"source"})
    d = graph_dict(graph)["edges"]
    tcp = next(e for e in d if e["protocol"] == "tcp")
    assert tcp["tcp"]["connections"] == 4 and tcp["rps"] is None and tcp["success_rate"] is None


def test_grpc_success_follows_the_grpc_status():
    agent = FakeAgent().request("a", "g", "b", protocol="grpc", grpc="0", n=9)
    agent.request("a", "g", "b", protocol="grpc", grpc="14", n=1)  # HTTP 200 with UNAVAILABLE
    agent.request("a", "g", "b", protocol="grpc", code="0", flags="DC", n=0)
    e = edge(compute_graph([agent.scrape("n", 0.0)]), "a", "g", "b", "grpc")
    assert e.success_rate == 0.9


def test_code_zero_is_not_a_success():
    agent = FakeAgent().request("a", "s", "b", n=3).request("a", "s", "b", code="0", flags="DC", n=1)
    e = edge(compute_graph([agent.scrape("n", 0.0)]), "a", "s", "b")
    assert e.success_rate == 0.75 and e.response_flags["DC"] == 1


# ---------------------------------------------------------------- scrape errors
def test_an_agent_scraped_once_is_not_part_of_the_window():
    a = FakeAgent().request("a", "s", "b", n=1)
    graph = compute_graph([a.scrape("n1", 5.0), a.scrape("n2", 5.0)], [a.scrape("n1", 0.0)],
                          [ScrapeError("n3", "connection refused")])
    assert not graph.complete and {e.agent for e in graph.errors} == {"n2", "n3"}
    assert graph.agents == ["n1"]
    doc = graph_dict(graph)
    assert doc["complete"] is False and {"agent": "n3", "error": "connection refused"} in doc["scrape_errors"]
    assert "INCOMPLETE" in render_table(graph) and "INCOMPLETE" in render_dot(graph)


# ---------------------------------------------------------------- filters, grouping, output
def _three_edges():
    agent = FakeAgent().request("a", "s", "b1", n=10).request("a", "s", "b2", n=30, code="503")
    agent.request("x", "t", "y", n=5, ns="other")
    return compute_graph([agent.scrape("n", 10.0)], [FakeAgent().scrape("n", 0.0)])


def test_filters_by_namespace_and_workload():
    graph = _three_edges()
    assert {k.source_workload for k in filter_graph(graph, ["other"]).edges} == {"x"}
    assert {k.destination_workload for k in filter_graph(graph, workloads=["b2"]).edges} == {"b2"}
    assert {k.destination_workload for k in filter_graph(graph, workloads=["default/a"]).edges} == {"b1", "b2"}
    assert filter_graph(graph, workloads=["other/a"]).edges == {}
    assert filter_graph(graph, ["default"], ["y"]).edges == {}


def test_group_by_service_sums_the_workloads():
    (stats,) = [s for k, s in group_edges(_three_edges(), "service").items() if k.service == "s"]
    assert (stats.requests, stats.request_rate, stats.success_rate) == (40, 4.0, 0.25)


def test_json_document_schema():
    doc = graph_dict(_three_edges())
    assert set(doc) == {"mode", "window_seconds", "grouped_by", "complete", "agents", "scrape_errors",
                        "nodes", "edges"}
    assert doc["mode"] == "interval" and doc["window_seconds"] == 10
    first = doc["edges"][0]  # busiest first
    assert first["destination_workload"] == "b2" and first["rps"] == 3 and first["success_rate"] == 0
    assert first["source"] == "workload:default/a" and first["service"] == "service:default/s"
    assert first["destination"] == "workload:default/b2" and first["response_codes"] == {"503": 30}
    ids = {n["id"] for n in doc["nodes"]}
    assert all(e["source"] in ids and e["service"] in ids and e["destination"] in ids for e in doc["edges"])
    json.dumps(doc)


def test_table_busiest_first():
    lines = render_table(_three_edges()).splitlines()
    assert lines[0].startswith("window 10.0s, 1 agent scraped")
    assert lines[2].split()[:5] == ["SOURCE", "SERVICE", "DESTINATION", "PROTO", "RATE"]
    assert "default/b2" in lines[3] and "3.00 rps" in lines[3] and "0.0%" in lines[3]
    service = render_table(_three_edges(), by="service").splitlines()
    assert "DESTINATION" not in service[2] and "4.00 rps" in service[3]


def test_since_start_table_shows_totals():
    text = render_table(compute_graph([FakeAgent().request("a", "s", "b", n=4).scrape("n", 0.0)]))
    assert text.startswith("totals since the agents started") and "4 req" in text


def test_dot_colours_and_labels():
    dot = render_dot(_three_edges())
    assert dot.startswith("digraph hostmesh {") and dot.rstrip().endswith("}")
    src_to_svc = [line for line in dot.splitlines() if '"workload:default/a" -> "service:default/s"' in line]
    assert len(src_to_svc) == 1 and "4.00 rps" in src_to_svc[0] and "25.0% ok" in src_to_svc[0]
    assert "#c62828" in src_to_svc[0]  # red below 95 %
    assert '"service:default/s" -> "workload:default/b2"' in dot
    assert '"service:other/t" -> "workload:other/y"' in dot and "#2e7d32" in dot
    assert '"service:default/s" -> "workload' not in render_dot(_three_edges(), by="service")


def test_dot_quotes_names():
    agent = FakeAgent().request('we"ird\\', "s", "b")
    assert r'"workload:default/we\"ird\\"' in render_dot(compute_graph([agent.scrape("n", 0.0)]))


# ---------------------------------------------------------------- the I/O layer
def _args(**kw) -> argparse.Namespace:
    parsed = cli.build_parser().parse_args(["graph"])
    for k, v in kw.items():
        setattr(parsed, k, v)
    return parsed


class FakeFetch:
    """remote.get for several agents: each answer a callable of the call number."""

    def __init__(self, answers) -> None:
        self.answers, self.calls = answers, defaultdict(int)
        self.lock = threading.Lock()

    def __call__(self, url, *, lab=None, target=None, timeout=5.0):
        from hostmesh.remote import RemoteError
        with self.lock:
            self.calls[url] += 1
            n = self.calls[url]
        answer = self.answers[url](n)
        if isinstance(answer, Exception):
            raise RemoteError(str(answer))
        return answer


def test_run_scrapes_twice_and_reports_an_unreachable_agent():
    first, second = FakeAgent().request("a", "s", "b", n=10), FakeAgent().request("a", "s", "b", n=20)
    get = FakeFetch({
        "http://n1:15020/stats/prometheus": lambda n: (200, (first if n == 1 else second).text()),
        "http://n2:15020/stats/prometheus": lambda n: ConnectionRefusedError("n2:15020: connection refused"),
        "http://n3:15020/stats/prometheus": lambda n: (200, "garbage {{{"),
    })
    out, err = io.StringIO(), io.StringIO()
    rc = graphcmd.run(_args(agent=["n1:15020", "n2:15020", "http://n3:15020"], output="json", interval=0.01),
                      get=get, out=out, err=err)
    doc = json.loads(out.getvalue())
    assert rc == 1 and doc["complete"] is False
    assert {e["agent"] for e in doc["scrape_errors"]} == {"n2:15020", "http://n3:15020"}
    assert doc["edges"][0]["requests"] == 10 and doc["edges"][0]["rps"] > 0
    assert "agent n2:15020 not scraped: n2:15020: connection refused (the graph may be incomplete)" in err.getvalue()
    assert get.calls["http://n2:15020/stats/prometheus"] == 1  # not tried again for the second scrape


def test_run_since_start_scrapes_once():
    get = FakeFetch({"http://n1:1/stats/prometheus": lambda n: (200, FakeAgent().request("a", "s", "b").text())})
    out = io.StringIO()
    assert graphcmd.run(_args(agent=["n1:1"], since_start=True), get=get, out=out, err=io.StringIO()) == 0
    assert sum(get.calls.values()) == 1 and "1 req" in out.getvalue()


def test_run_lists_the_agents_from_the_control_plane():
    agents = [{"node": "node1", "connected": True, "peer": "ipv4:10.0.0.5:41234"},
              {"node": "node2", "connected": False, "peer": ""},
              {"node": "node3", "connected": True, "peer": "ipv6:[fd00::7]:5000"}]
    targets, errors = graphcmd.controlplane_targets(agents, 15020)
    assert [t.url for t in targets] == ["http://10.0.0.5:15020/stats/prometheus",
                                        "http://[fd00::7]:15020/stats/prometheus"]
    assert errors == [ScrapeError("node2", "not connected to the control plane")]
    seen = []
    get = FakeFetch({t.url: (lambda n: (200, FakeAgent().text())) for t in targets})

    def get_json(url, **kw):
        seen.append(url)
        return agents
    out, err = io.StringIO(), io.StringIO()
    rc = graphcmd.run(_args(controlplane="http://cp:15014/", output="json", since_start=True),
                      get=get, get_json=get_json, out=out, err=err)
    assert rc == 1 and seen == ["http://cp:15014/debug/agents"]
    assert json.loads(out.getvalue())["agents"] == ["node1", "node3"]


def test_control_plane_unreachable_is_one_clear_error():
    from hostmesh.remote import RemoteError

    def get_json(url, **kw):
        raise RemoteError("http://cp:15014/debug/agents: connection refused")
    with pytest.raises(graphcmd.GraphCommandError, match="control plane not reachable.*--agent HOST:PORT"):
        graphcmd.run(_args(controlplane="http://cp:15014"), get_json=get_json)


def test_agent_target_forms():
    assert [t.url for t in graphcmd.agent_targets(["h:15020", "http://h:15000", "http://h:9/m"])] == \
        ["http://h:15020/stats/prometheus", "http://h:15000/stats/prometheus", "http://h:9/m"]
    assert graphcmd.peer_host("unix:/run/x") is None


@pytest.mark.parametrize("kw, message", [
    ({"since_start": True, "interval": 3.0}, "takes no --interval"),
    ({"interval": 0.0}, "--interval 0: give seconds"),
    ({"timeout": -1.0}, "--timeout -1: give seconds"),
])
def test_bad_flags(kw, message):
    with pytest.raises(graphcmd.GraphCommandError, match=message):
        graphcmd.run(_args(agent=["h:1"], **kw), get=FakeFetch({}))


def test_svg_without_dot_is_one_clear_error_before_any_scrape(tmp_path):
    get = FakeFetch({})
    with pytest.raises(graphcmd.GraphCommandError, match="--svg needs Graphviz's `dot`.*graphviz"):
        graphcmd.run(_args(agent=["h:1"], svg=str(tmp_path / "g.svg")), get=get, which=lambda name: None)
    assert not get.calls


def test_svg_with_dot(tmp_path):
    import shutil

    from tests.conftest import IN_CI
    if shutil.which("dot") is None and not IN_CI:  # ./quickstart installs it: CI must not skip this
        pytest.skip("Graphviz's dot not installed (Debian package graphviz: ./quickstart install)")
    get = FakeFetch({"http://h:1/stats/prometheus": lambda n: (200, FakeAgent().request("a", "s", "b").text())})
    path = tmp_path / "g.svg"
    assert graphcmd.run(_args(agent=["h:1"], since_start=True, svg=str(path)), get=get, out=io.StringIO(),
                        err=io.StringIO()) == 0
    svg = path.read_text()
    assert "<svg" in svg and "workload:default/a" in svg


# ---------------------------------------------------------------- the console verb, over HTTP on loopback
class _Exposition(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = self.server.agent.text().encode()
        self.server.agent.request("a", "s", "b", n=5)  # 5 more requests by the next scrape
        self.send_response(200)
        self.send_header("content-type", "text/plain; version=0.0.4")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_cli_main_over_http(capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Exposition)
    server.agent = FakeAgent().request("a", "s", "b", n=1)
    closed = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Exposition)
    closed_port = closed.server_address[1]
    closed.server_close()  # nothing listens there any more
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        rc = cli.main(["graph", "--agent", f"127.0.0.1:{server.server_address[1]}", "--agent",
                       f"127.0.0.1:{closed_port}", "--interval", "0.2", "--timeout", "2", "-o", "json"])
    finally:
        server.shutdown()
        server.server_close()
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert rc == 1 and [e["requests"] for e in doc["edges"]] == [5]
    assert doc["scrape_errors"][0]["agent"] == f"127.0.0.1:{closed_port}"
    assert "not scraped" in captured.err and "Traceback" not in captured.err
