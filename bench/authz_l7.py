"""Request-level AuthorizationPolicy cost on HTTP/1.1 keep-alive: rps and p99, same run.

    .venv/bin/python bench/authz_l7.py [--seconds 5] [--connections 50] [--rate 1000] [--rounds 3]

The HTTP/1.1 driver serves the destination side as the inbound proxy does for a workload
whose policies need its requests (``router`` None, a fixed endpoint, every request through
a ``request_policy.RequestGate``), in front of nginx, in three configurations:

* no policy: the driver alone (no gate);
* 10 policies x 20 connection rules (principals, namespaces, ipBlocks, ports, ``when``):
  decided once per connection, no gate — the keep-alive requests pay nothing;
* 10 policies x 20 request rules (methods, paths, a header condition), the request
  matching the last rule of the last policy: every request normalizes its path and
  evaluates all 200 rules.

wrk (-t1, keep-alive) gives rps and the proxy's CPU per request; a fixed-rate client
(1000 req/s over 10 connections) gives p50/p99. Same machine, same run: ``--rounds``
interleaved rounds of the three, medians reported.
Not measured here: that a workload with request rules has its connections parsed by the
destination's proxy at all (with connection rules only, the inbound side relays bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import authz as authz_bench  # noqa: E402
import l7  # noqa: E402
from peers import nginx_config  # noqa: E402

WEB = ("web-1", "shop", "node1", "127.0.0.1", "web", (("app", "web"),))
PRINCIPAL = "cluster.local/ns/front/sa/ui"


def connection_policies() -> list[dict]:
    """bench/authz.py's 10x20 connection rules, the last one matching the bench's connection."""
    out = [json.loads(c.spec) for c in authz_bench.policies()]
    out[-1]["rules"][-1] = {"from": [{"source": {"principals": [PRINCIPAL]}}]}
    return out


def request_policies(n: int = 10, rules: int = 20) -> list[dict]:
    out = []
    for p in range(n):
        rs = [{"to": [{"operation": {"methods": ["GET", "HEAD"], "paths": [f"/p{p}/r{r}/*", f"/p{p}/r{r}"]}}],
               "when": [{"key": "request.headers[x-tenant]", "values": [f"t{p}-{r}"]}]} for r in range(rules)]
        out.append({"rules": rs})
    out[-1]["rules"][-1] = {"to": [{"operation": {"methods": ["GET"], "paths": ["/"]}}],
                            "when": [{"key": "request.headers[x-tenant]", "notValues": ["blocked"]}]}
    return out


def serve(port: int, backend_port: int, mode: str) -> None:
    """``--serve``: the driver on ``port`` in front of ``backend_port`` with ``mode``'s policies."""
    import uvloop
    from prometheus_client import CollectorRegistry

    from nodeagent.proxy.authz import AuthzGate, ConnectionAttrs
    from nodeagent.proxy.jwtauth import RequestAuthn
    from nodeagent.proxy.l7.context import L7Inputs
    from nodeagent.proxy.l7.http1_proxy import listen_http1
    from nodeagent.proxy.l7.metrics import HttpMetrics
    from nodeagent.proxy.request_policy import RequestPolicy
    from nodeagent.state import ConfigObject, Endpoint, NodeSnapshot, Workload

    specs = {"none": [], "connection": connection_policies(), "request": request_policies()}[mode]
    web = Workload(*WEB)
    snap = NodeSnapshot("node1", workloads=(web,), config=tuple(
        ConfigObject("AuthorizationPolicy", "shop", f"p{i:02d}", json.dumps(s)) for i, s in enumerate(specs)))
    endpoint = Endpoint("127.0.0.1", backend_port, "node1", "web-1", "shop")

    class _NoMetrics:
        def authz_decision(self, direction, decision) -> None:
            pass

    authz = AuthzGate(_NoMetrics(), "inbound")
    requests = RequestPolicy(authz, RequestAuthn(lambda uri: None), lambda: snap)

    def prepare(ctx) -> None:
        ctx.router = ctx.table = None
        ctx.endpoint = endpoint
        conn = ConnectionAttrs(PRINCIPAL, "198.18.2.5", endpoint.address, 8080)
        verdict = authz.check(snap, web, conn.principal, conn.source_ip, conn.destination_ip, conn.destination_port)
        if not verdict.allowed and not verdict.needs_request:
            raise SystemExit(f"bench policies deny the connection: {verdict}")
        gate = requests.gate(snap, web, conn, verdict)
        if gate is not None:
            ctx.gate_for = lambda ep: gate

    async def main() -> None:
        inputs = L7Inputs.create("node1", HttpMetrics(CollectorRegistry()))
        server = await listen_http1(inputs, lambda: snap, l7.LO, port, dst=(endpoint.address, 8080), backlog=4096,
                                    reporter="destination", prepare=prepare)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()

    uvloop.run(main())


MODES = (("none", "no policy"), ("connection", "10x20 connection rules"),
         ("request", "10x20 request rules, last rule matches"))


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def run(seconds: int, connections: int, rate: int, rounds: int) -> list[dict]:
    """``rounds`` interleaved rounds of every mode (this VM's noise is +-20 % run to run);
    the medians per mode."""
    l7._need("wrk", "nginx")
    procs: list[subprocess.Popen] = []
    samples: dict[str, list[dict]] = {label: [] for _, label in MODES}
    with tempfile.TemporaryDirectory(prefix="hostmesh-authz-bench-") as run_dir:
        os.makedirs(f"{run_dir}/logs")
        nginx_port = l7.free_port()
        Path(run_dir, "nginx.conf").write_text(nginx_config(run_dir, nginx_port).replace(
            f"listen {nginx_port}", f"listen {l7.LO}:{nginx_port}"))
        try:
            procs.append(subprocess.Popen(["nginx", "-c", f"{run_dir}/nginx.conf", "-p", run_dir],
                                          stderr=subprocess.DEVNULL))
            l7.wait_port(nginx_port)
            for _ in range(rounds):
                for mode, label in MODES:
                    port = l7.free_port()
                    proxy = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(nginx_port), mode])
                    try:
                        l7.wait_port(port)
                        samples[label].append(l7.measure(label, port, [proxy.pid], seconds, connections, rate))
                    finally:
                        l7._stop([proxy])
        finally:
            l7._stop(procs)
    return [{"path": label, **{k: _median([s[k] for s in runs]) for k in
                               ("rps", "cpu_us_per_request", "p50_ms", "p99_ms")}}
            for label, runs in samples.items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve", nargs=3, metavar=("PORT", "BACKEND_PORT", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(int(args.serve[0]), int(args.serve[1]), args.serve[2])
        return 0
    results = run(args.seconds, args.connections, args.rate, args.rounds)
    base = results[0]["rps"]
    print("| policies | rps (wrk, keep-alive) | vs none | proxy CPU µs/request | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['path']} | {r['rps']:.0f} | {r['rps'] / base:.2f}x | {r['cpu_us_per_request']:.0f} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
