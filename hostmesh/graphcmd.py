"""`hostmesh graph`, the I/O side: find the agents, scrape each one's metrics twice (all
agents concurrently, each with a timeout), and hand the samples to ``hostmesh.graph``.

Where the agents are (first that applies):

* ``--agent URL|HOST:PORT`` (repeatable): those metrics endpoints (``HOST:PORT`` means
  ``http://HOST:PORT/stats/prometheus``).
* ``--lab NAME``: every node of that lab, each agent's admin endpoint (127.0.0.1:15000)
  from inside its node namespace, as ``proxy-config --node`` reaches it.
* otherwise the control plane (``--controlplane``, as ``hostmesh status``): its
  ``/debug/agents`` names every node and the address its agent connects from; the agent's
  metrics are read there on ``--metrics-port`` (15020, the read-only health endpoint
  ``admin.healthAddress`` serves ``/stats/prometheus`` on; the admin port 15000 listens on
  loopback only). A node whose agent is not connected is reported as not scraped.

An agent that cannot be reached, answers an error or does not speak Prometheus text is a
``ScrapeError``: one warning line on stderr, a ``scrape_errors`` entry in JSON, a note in
the table and the DOT title, exit code 1; never a crash, and the other agents' edges are
still shown.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from hostmesh import graph as graphmod
from hostmesh.output import to_json

METRICS_PATH = "/stats/prometheus"
LAB_ADMIN = "http://127.0.0.1:15000"
DEFAULT_INTERVAL = 5.0
DEFAULT_METRICS_PORT = 15020


class GraphCommandError(Exception):
    """A user-facing failure of `hostmesh graph` (printed as `hostmesh: error: ...`)."""


@dataclass(frozen=True)
class Target:
    """One agent to scrape: ``url``, from inside ``node``'s namespace of ``lab`` when set."""

    agent: str
    url: str
    lab: str | None = None
    node: str | None = None


def agent_targets(specs: list[str]) -> list[Target]:
    out = []
    for spec in specs:
        url = spec if "://" in spec else f"http://{spec}{METRICS_PATH}"
        if "://" in spec and spec.count("/") == 2:  # a bare base URL: the metrics path on it
            url = spec.rstrip("/") + METRICS_PATH
        out.append(Target(agent=spec, url=url))
    return out


def lab_targets(lab_name: str) -> list[Target]:
    from meshlab.errors import LabError
    from meshlab.lab import Lab
    try:
        nodes = list(Lab(lab_name).topology())
    except LabError as exc:
        raise GraphCommandError(str(exc)) from None
    if not nodes:
        raise GraphCommandError(f"lab {lab_name!r} is not up (hostmesh lab up --name {lab_name})")
    return [Target(agent=n, url=LAB_ADMIN + METRICS_PATH, lab=lab_name, node=n) for n in nodes]


def peer_host(peer: str) -> str | None:
    """The host of a gRPC peer string (``ipv4:10.0.0.5:41234``, ``ipv6:[fd00::5]:41234``)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4" and rest.count(":") == 1:
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6" and rest.startswith("[") and "]" in rest:
        return rest[:rest.index("]") + 1]
    return None


def controlplane_targets(agents: list[dict], metrics_port: int) -> tuple[list[Target], list[graphmod.ScrapeError]]:
    """Targets from the control plane's ``/debug/agents`` answer; nodes it cannot place are errors."""
    targets, errors = [], []
    for a in sorted(agents, key=lambda a: a.get("node", "")):
        node = a.get("node") or "?"
        host = peer_host(a.get("peer") or "") if a.get("connected") else None
        if not a.get("connected"):
            errors.append(graphmod.ScrapeError(node, "not connected to the control plane"))
        elif host is None:
            errors.append(graphmod.ScrapeError(node, f"no address in the control plane's peer {a.get('peer')!r}"))
        else:
            targets.append(Target(agent=node, url=f"http://{host}:{metrics_port}{METRICS_PATH}"))
    return targets, errors


def scrape(target: Target, timeout: float, get: Callable, clock: Callable[[], float] = time.monotonic):
    """One scrape: an ``AgentScrape`` (stamped halfway through the request) or a ``ScrapeError``."""
    from hostmesh.remote import RemoteError
    start = clock()
    try:
        code, body = get(target.url, lab=target.lab, target=target.node, timeout=timeout)
    except RemoteError as exc:
        return graphmod.ScrapeError(target.agent, str(exc))
    at = (start + clock()) / 2
    if code != 200:
        return graphmod.ScrapeError(target.agent, f"{target.url}: HTTP {code}: {body.strip()[:200]}")
    try:
        return graphmod.AgentScrape(target.agent, at, graphmod.parse_exposition(body))
    except graphmod.ExpositionError as exc:
        return graphmod.ScrapeError(target.agent, f"{target.url}: {exc}")


def scrape_all(targets: list[Target], timeout: float, get: Callable, pool: ThreadPoolExecutor):
    """Every target at once; (scrapes, errors)."""
    results = list(pool.map(lambda t: scrape(t, timeout, get), targets))
    return ([r for r in results if isinstance(r, graphmod.AgentScrape)],
            [r for r in results if isinstance(r, graphmod.ScrapeError)])


def collect(targets: list[Target], *, interval: float | None, timeout: float, get: Callable,
            sleep: Callable[[float], None] = time.sleep, errors: list | None = None,
            include_idle: bool = False) -> graphmod.Graph:
    """Scrape twice ``interval`` apart (None: once, totals since start) and compute the graph."""
    errors = list(errors or ())
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(targets)))) as pool:
        before = None
        if interval is not None and targets:
            before, first_errors = scrape_all(targets, timeout, get, pool)
            errors += first_errors
            sleep(interval)
            targets = [t for t in targets if t.agent not in {e.agent for e in first_errors}]
        after, second_errors = scrape_all(targets, timeout, get, pool) if targets else ([], [])
    errors += second_errors
    return graphmod.compute_graph(after, before, errors, include_idle=include_idle)


def find_targets(args, get_json: Callable) -> tuple[list[Target], list[graphmod.ScrapeError]]:
    from hostmesh.remote import RemoteError
    if args.agent:
        return agent_targets(args.agent), []
    if args.lab:
        return lab_targets(args.lab), []
    base = args.controlplane.rstrip("/")
    try:
        agents = get_json(f"{base}/debug/agents", timeout=args.timeout)
    except RemoteError as exc:
        raise GraphCommandError(f"control plane not reachable to list the agents: {exc} "
                                "(or name them: --agent HOST:PORT, or --lab NAME)") from None
    return controlplane_targets(agents, args.metrics_port)


def write_svg(dot_source: str, path: str, which: Callable[[str], str | None] = shutil.which) -> None:
    dot = which("dot")
    if dot is None:
        raise GraphCommandError("--svg needs Graphviz's `dot`, which is not installed (Debian package "
                                "graphviz; ./quickstart install installs it); `-o dot` prints the DOT source "
                                "without it")
    r = subprocess.run([dot, "-Tsvg", "-o", path], input=dot_source, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise GraphCommandError(f"dot -Tsvg -o {path} failed: {r.stderr.strip()[:500]}")


def run(args, *, get: Callable | None = None, get_json: Callable | None = None, out=None, err=None,
        which: Callable[[str], str | None] = shutil.which) -> int:
    """The verb: returns 0 with every agent scraped, 1 when the graph may be incomplete."""
    from hostmesh import remote
    out, err = out or sys.stdout, err or sys.stderr
    if args.since_start and args.interval is not None:
        raise GraphCommandError("--since-start reads the totals once; it takes no --interval")
    interval = None if args.since_start else (DEFAULT_INTERVAL if args.interval is None else args.interval)
    if interval is not None and not 0 < interval <= 3600:
        raise GraphCommandError(f"--interval {interval:g}: give seconds between 0 and 3600")
    if not 0 < args.timeout <= 300:
        raise GraphCommandError(f"--timeout {args.timeout:g}: give seconds between 0 and 300")
    if args.svg and which("dot") is None:  # fail before waiting a whole interval
        write_svg("", args.svg, which)
    targets, errors = find_targets(args, get_json or remote.get_json)
    if not targets and not errors:
        raise GraphCommandError("no agents to scrape")
    graph = collect(targets, interval=interval, timeout=args.timeout, get=get or remote.get, errors=errors,
                    include_idle=args.show_idle)
    graph = graphmod.filter_graph(graph, args.namespace or (), args.workload or ())
    for e in graph.errors:
        print(f"hostmesh: warning: agent {e.agent} not scraped: {e.error} (the graph may be incomplete)", file=err)
    if args.svg:
        write_svg(graphmod.render_dot(graph, args.by), args.svg, which)
    if args.output == "json":
        print(to_json(graphmod.graph_dict(graph, args.by)), file=out)
    elif args.output == "dot":
        print(graphmod.render_dot(graph, args.by), end="", file=out)
    else:
        print(graphmod.render_table(graph, args.by), file=out)
    return 0 if graph.complete else 1
