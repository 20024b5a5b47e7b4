"""L7 benchmark on loopback: direct vs the hostmesh HTTP drivers vs HAProxy (HTTP/1.1, HTTP/2, gRPC).

    .venv/bin/python bench/l7.py [--seconds 5] [--connections 50] [--rate 1000] [--json out.json]
                                 [--only h1|h2|grpc]

Topology (one machine, 127.0.0.1, no lab and no root needed): nginx (one worker, 200 "ok")
as the backend; in front of it either nothing (direct), the hostmesh HTTP/1.1 driver
(``listen_http1`` in its own process under uvloop: routing, LB, header rewriting, pool,
metrics — everything but capture) or HAProxy (``nbthread 1``, ``mode http``, keep-alive
to the server). Measured per path:

* keep-alive throughput: ``wrk -t1 -c<connections>`` requests/s, and the CPU time the hop
  used per request (nginx for direct, the proxy process otherwise: from /proc). On a
  shared machine the CPU cost per request is the steadier number; rps ∝ 1 / that cost
  once the proxy has a core of its own;
* latency at a fixed rate: a small client (this file, ``--rate`` requests/s spread over
  10 keep-alive connections, in its own process), p50 / p99; "added" = path minus direct.

HTTP/2 (second table): nginx with an h2c (prior knowledge) listener as the backend;
``h2load -c4 -m100`` for ``--seconds`` against it directly, through the hostmesh HTTP/2
driver (``listen_http2``, the Service port declared ``appProtocol: http2`` so the upstream
side is HTTP/2 too, multiplexed) and through HAProxy (``mode http``, ``bind ... proto h2``
and ``server ... proto h2``: HAProxy 2.6 speaks h2c on both sides).

gRPC unary (third table): the mesh test app's gRPC server (grpcio, in its own process) as
the backend; a grpc.aio client in its own process keeps ``GRPC_CONCURRENCY`` Echo calls in
flight for ``--seconds`` (bounded); calls/s direct, through hostmesh (GRPCRoute-free default
route, HTTP/2 upstream) and through HAProxy (same h2 config). The Python client and server
cost far more per call than either proxy, so this ratio says how much a proxy hop costs a
real gRPC service, not the proxy's own ceiling.

Everything shares the machine's cores, so read the ratios, not the absolute numbers.
Every run is bounded by ``--seconds``; the servers are stopped when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import cpu_seconds, haproxy_http_config, nginx_config  # noqa: E402

LO = "127.0.0.1"
VIP = "198.19.0.40"  # only looked up in the proxy's snapshot


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LO, 0))
        return s.getsockname()[1]


def haproxy_config(run_dir: str, port: int, backend_port: int) -> str:
    return haproxy_http_config(run_dir, f"{LO}:{port}", f"{LO}:{backend_port}")


def haproxy_h2_config(run_dir: str, port: int, backend_port: int) -> str:
    """HAProxy with h2c (prior knowledge) on both sides."""
    return f"""global
    nbthread 1
    maxconn 4096
    pidfile {run_dir}/haproxy-h2.pid
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend web
    bind {LO}:{port} proto h2
    default_backend web
backend web
    http-reuse always
    server s1 {LO}:{backend_port} proto h2
"""


def nginx_h1_config(run_dir: str, port: int) -> str:
    return nginx_config(run_dir, port).replace(f"listen {port}", f"listen {LO}:{port}")


def nginx_h2_config(run_dir: str, port: int) -> str:
    return nginx_config(run_dir, port).replace(f"listen {port} reuseport", f"listen {LO}:{port} http2 reuseport")


# ------------------------------------------------------------------ the hostmesh proxy process
def serve_proxy(port: int, backend_port: int, mode: str = "h1", config: tuple = ()) -> None:
    """Run the HTTP/1.1 driver (``mode`` h1) or the HTTP/2 driver (h2: an ``appProtocol: http2``
    backend; grpc: the gRPC backend) on ``port`` in front of ``backend_port`` (``--serve-proxy``).
    ``config``: ``ConfigObject``s of the snapshot (e.g. a TrafficPolicy on Service default/web)."""
    import uvloop
    from prometheus_client import CollectorRegistry

    from nodeagent.proxy.l7.context import L7Inputs
    from nodeagent.proxy.l7.http1_proxy import listen_http1
    from nodeagent.proxy.l7.http2_proxy import listen_http2
    from nodeagent.proxy.l7.metrics import HttpMetrics
    from nodeagent.state import Endpoint, NodeSnapshot, Service, ServicePort

    async def main() -> None:
        app_protocol = {"h1": "", "h2": "http2", "grpc": "grpc"}[mode]
        svc = Service("web", "default", VIP, (ServicePort(80, backend_port, app_protocol=app_protocol),),
                      (Endpoint(LO, backend_port, "node1", "backend", "default"),))
        snap = NodeSnapshot("node1", (svc,), config=tuple(config))
        inputs = L7Inputs.create("node1", HttpMetrics(CollectorRegistry()))
        listen = listen_http1 if mode == "h1" else listen_http2
        server = await listen(inputs, lambda: snap, LO, port, dst=(VIP, 80), backlog=4096)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
        server.close()

    if os.environ.get("HOSTMESH_PROFILE"):
        import cProfile
        cProfile.runctx("uvloop.run(main())", globals(), locals(), os.environ["HOSTMESH_PROFILE"])
    else:
        uvloop.run(main())


# ------------------------------------------------------------------ load generators
def wrk_rps(url: str, seconds: int, connections: int, pids: list[int]) -> tuple[float, float]:
    """(requests/s, CPU microseconds per request of ``pids``) of one wrk run."""
    before = cpu_seconds(pids)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url], capture_output=True,
                         text=True, timeout=seconds + 30).stdout
    used = cpu_seconds(pids) - before
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    if m is None or n is None:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+)", out)
    if "Non-2xx" in out or (errors and any(int(x) for x in errors.groups())):
        raise RuntimeError(f"wrk saw failed requests:\n{out}")
    return float(m.group(1)), used * 1e6 / max(1, int(n.group(1)))


async def _fixed_rate(port: int, rate: int, seconds: float, conns: int = 10) -> list[float]:
    """Request i is due at t0 + i/rate on connection i % conns; latency from its send to its response.

    Measured from the send, not the due time: uvloop's timers have millisecond resolution,
    which would add up to 1 ms of noise to every sample; at 1000/s over 10 connections a
    request never queues behind another on the client side.
    """
    clock = time.perf_counter  # uvloop's loop.time() has millisecond resolution
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    lat: list[float] = []
    total = int(rate * seconds)
    t0 = clock() + 0.2

    async def one(k: int) -> None:
        r, w = await asyncio.open_connection(LO, port)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(k, total, conns):
            due = t0 + i / rate
            delay = due - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = clock()
            w.write(req)
            head = await r.readuntil(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            await r.readexactly(int(m.group(1)) if m else 0)
            lat.append(clock() - sent)
        w.close()

    await asyncio.gather(*(one(k) for k in range(conns)))
    return lat


def fixed_rate(port: int, rate: int, seconds: float) -> list[float]:
    """Sorted latencies (s) of ``_fixed_rate``, run in a child process so the client has its own core share."""
    code = (f"import asyncio, json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            f"import l7, uvloop; lat = uvloop.run(l7._fixed_rate({port}, {rate}, {seconds})); "
            f"print(json.dumps(sorted(lat)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds + 60, check=True)
    return json.loads(out.stdout)


def fixed_rate_latency(port: int, rate: int, seconds: float) -> tuple[float, float]:
    """(p50, p99) in ms of ``fixed_rate``."""
    lat = fixed_rate(port, rate, seconds)
    return percentile_ms(lat, 0.50), percentile_ms(lat, 0.99)


def percentile_ms(lat: list[float], q: float) -> float:
    """The ``q`` quantile of sorted latencies in seconds, in ms."""
    return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000.0


def h2_fixed_rate(url: str, rate: int, seconds: int, clients: int = 10) -> list[float]:
    """Sorted latencies (s) of ``h2load --rps``: ``rate`` requests/s over ``clients`` h2c
    connections, one stream in flight each, for ``seconds`` (from h2load's ``--log-file``)."""
    with tempfile.NamedTemporaryFile(prefix="hostmesh-h2load-", suffix=".log") as log:
        h2load_rps(url, seconds, [], (f"-c{clients}", "-m1", f"--rps={max(1, rate // clients)}",
                                      f"--log-file={log.name}"))
        rows = [line.split("\t") for line in Path(log.name).read_text().splitlines() if line.strip()]
    return sorted(int(r[2]) / 1e6 for r in rows if r[1] == "200")


def h2load_rps(url: str, seconds: int, pids: list[int],
               args: tuple[str, ...] = ("-c4", "-m100")) -> tuple[float, float]:
    """(requests/s, CPU microseconds per request of ``pids``) of ``h2load -c4 -m100`` (``args``) for ``seconds``."""
    before = cpu_seconds(pids)
    r = subprocess.run(["h2load", *args, "-t1", f"-D{seconds}", url], capture_output=True, text=True,
                       timeout=seconds + 30)
    used = cpu_seconds(pids) - before
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", r.stdout)
    n = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", r.stdout)
    if m is None or n is None or int(n.group(2)) == 0:
        raise RuntimeError(f"h2load printed no rate:\n{r.stdout}\n{r.stderr}")
    if int(n.group(2)) != int(n.group(1)):
        raise RuntimeError(f"h2load: {n.group(1)} done but only {n.group(2)} succeeded")
    return float(m.group(1)), used * 1e6 / max(1, int(n.group(2)))


GRPC_CONCURRENCY = 32


async def _grpc_load(port: int, seconds: float, concurrency: int) -> tuple[int, int]:
    """(calls completed OK, failed) of ``concurrency`` loops of unary Echo for ``seconds``."""
    import grpc

    from meshlab.testapp import echo_pb2, echo_pb2_grpc
    ok = failed = 0
    async with grpc.aio.insecure_channel(f"{LO}:{port}") as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        await stub.Echo(echo_pb2.EchoRequest(message="warm"), timeout=10)
        end = time.monotonic() + seconds

        async def loop() -> None:
            nonlocal ok, failed
            req = echo_pb2.EchoRequest(message="bench")
            while time.monotonic() < end:
                try:
                    await stub.Echo(req, timeout=10)
                    ok += 1
                except grpc.RpcError:
                    failed += 1
        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return ok, failed


def grpc_rps(port: int, seconds: int, pids: list[int]) -> tuple[float, float]:
    """(calls/s, CPU microseconds per call of ``pids``); the client runs in its own process."""
    code = (f"import asyncio, json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            f"import l7; print(json.dumps(asyncio.run(l7._grpc_load({port}, {seconds}, {GRPC_CONCURRENCY}))))")
    before = cpu_seconds(pids)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds + 60,
                         check=True)
    elapsed = time.monotonic() - t0
    used = cpu_seconds(pids) - before
    ok, failed = json.loads(out.stdout)
    if failed or not ok:
        raise RuntimeError(f"gRPC load: {ok} calls ok, {failed} failed")
    # the client's start-up (imports, channel) is outside its timed loop: rate over the loop
    return ok / seconds, used * 1e6 / ok if elapsed else 0.0


# ------------------------------------------------------------------ orchestration
def wait_port(port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection((LO, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {LO}:{port}")


def measure(label: str, port: int, pids: list[int], seconds: int, connections: int, rate: int) -> dict:
    """``pids``: the processes of this hop (whose CPU time per request is reported)."""
    url = f"http://{LO}:{port}/"
    rps, cpu_us = wrk_rps(url, seconds, connections, pids)
    p50, p99 = fixed_rate_latency(port, rate, seconds)
    return {"path": label, "rps": rps, "cpu_us_per_request": cpu_us, "p50_ms": p50, "p99_ms": p99}


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise SystemExit(f"bench/l7.py needs {tool} on PATH")


def _start(procs: list, argv: list[str], **kw) -> subprocess.Popen:
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    procs.append(p)
    return p


def _stop(procs: list) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def _measure_paths(paths, rate_fn, seconds: int) -> list[dict]:
    """``rate_fn(port, seconds, pids)`` -> (rps, CPU us per request) for each (label, port, pids)."""
    out = []
    for label, port, pids in paths:
        rps, cpu_us = rate_fn(port, seconds, pids)
        out.append({"path": label, "rps": rps, "cpu_us_per_request": cpu_us})
    return out


def run_h2(seconds: int) -> list[dict]:
    """h2load -m100 rps: direct (nginx h2c) vs hostmesh HTTP/2 vs HAProxy h2."""
    _need("h2load", "nginx", "haproxy")
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="hostmesh-l7-bench-") as run_dir:
        os.makedirs(f"{run_dir}/logs")
        nginx_port, hm_port, ha_port = free_port(), free_port(), free_port()
        Path(run_dir, "nginx.conf").write_text(nginx_h2_config(run_dir, nginx_port))
        Path(run_dir, "haproxy.cfg").write_text(haproxy_h2_config(run_dir, ha_port, nginx_port))
        try:
            nginx = _start(procs, ["nginx", "-c", f"{run_dir}/nginx.conf", "-p", run_dir])
            ha = _start(procs, ["haproxy", "-f", f"{run_dir}/haproxy.cfg", "-db"])
            hm = _start(procs, [sys.executable, __file__, "--serve-proxy", str(hm_port), str(nginx_port), "h2"])
            for p in (nginx_port, ha_port, hm_port):
                wait_port(p)
            return _measure_paths([("direct", nginx_port, [nginx.pid] + _children(nginx.pid)),
                                   ("hostmesh", hm_port, [hm.pid]), ("haproxy", ha_port, [ha.pid])],
                                  lambda port, s, pids: h2load_rps(f"http://{LO}:{port}/", s, pids), seconds)
        finally:
            _stop(procs)


def run_grpc(seconds: int) -> list[dict]:
    """gRPC unary calls/s: direct (the test app) vs hostmesh vs HAProxy h2."""
    procs: list[subprocess.Popen] = []
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory(prefix="hostmesh-l7-bench-") as run_dir:
        app_port, hm_port, ha_port, http_port = free_port(), free_port(), free_port(), free_port()
        Path(run_dir, "haproxy.cfg").write_text(haproxy_h2_config(run_dir, ha_port, app_port))
        try:
            app = _start(procs, [sys.executable, "-m", "meshlab.testapp", "--pod", "bench", "--node", "node1",
                                 "--bind", LO, "--http-port", str(http_port), "--grpc-port", str(app_port)], env=env)
            ha = _start(procs, ["haproxy", "-f", f"{run_dir}/haproxy.cfg", "-db"])
            hm = _start(procs, [sys.executable, __file__, "--serve-proxy", str(hm_port), str(app_port), "grpc"])
            for p in (app_port, ha_port, hm_port):
                wait_port(p)
            return _measure_paths([("direct", app_port, [app.pid]), ("hostmesh", hm_port, [hm.pid]),
                                   ("haproxy", ha_port, [ha.pid])], grpc_rps, seconds)
        finally:
            _stop(procs)


def render_simple(title: str, results: list[dict]) -> str:
    by = {r["path"]: r for r in results}
    d, h = by["direct"], by["haproxy"]
    lines = [f"| path | {title} | vs direct | vs HAProxy | CPU us/req (hop) |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['path']} | {r['rps']:.0f} | {r['rps'] / d['rps']:.2f}x | {r['rps'] / h['rps']:.2f}x | "
                     f"{r['cpu_us_per_request']:.1f} |")
    return "\n".join(lines)


def run(seconds: int, connections: int, rate: int) -> list[dict]:
    _need("wrk", "nginx", "haproxy")
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="hostmesh-l7-bench-") as run_dir:
        os.makedirs(f"{run_dir}/logs")
        nginx_port, hm_port, ha_port = free_port(), free_port(), free_port()
        Path(run_dir, "nginx.conf").write_text(nginx_h1_config(run_dir, nginx_port))
        Path(run_dir, "haproxy.cfg").write_text(haproxy_config(run_dir, ha_port, nginx_port))
        try:
            procs.append(subprocess.Popen(["nginx", "-c", f"{run_dir}/nginx.conf", "-p", run_dir],
                                          stderr=subprocess.DEVNULL))
            procs.append(subprocess.Popen(["haproxy", "-f", f"{run_dir}/haproxy.cfg", "-db"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            procs.append(subprocess.Popen([sys.executable, __file__, "--serve-proxy", str(hm_port), str(nginx_port)],
                                          stdout=subprocess.DEVNULL))
            for p in (nginx_port, ha_port, hm_port):
                wait_port(p)
            nginx_pids = [procs[0].pid] + _children(procs[0].pid)
            return [measure("direct", nginx_port, nginx_pids, seconds, connections, rate),
                    measure("hostmesh", hm_port, [procs[2].pid], seconds, connections, rate),
                    measure("haproxy", ha_port, [procs[1].pid], seconds, connections, rate)]
        finally:
            _stop(procs)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (nginx's worker)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def render(results: list[dict], rate: int) -> str:
    by = {r["path"]: r for r in results}
    d, h = by["direct"], by["haproxy"]
    lines = [f"| path | keep-alive rps | vs direct | vs HAProxy | CPU us/req (hop) | p50 ms @{rate}/s | p99 ms | "
             "added p50 / p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['path']} | {r['rps']:.0f} | {r['rps'] / d['rps']:.2f}x | {r['rps'] / h['rps']:.2f}x | "
                     f"{r['cpu_us_per_request']:.1f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                     f"{r['p50_ms'] - d['p50_ms']:+.3f} / {r['p99_ms'] - d['p99_ms']:+.3f} |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--serve-proxy":
        serve_proxy(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) == 5 else "h1")
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=5, help="length of each measurement (1-60)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (1-1000)")
    p.add_argument("--rate", type=int, default=1000, help="fixed request rate for the latency run (1-20000)")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--only", choices=("h1", "h2", "grpc"), help="run one of the three tables")
    args = p.parse_args()
    if not 1 <= args.seconds <= 60:
        p.error("--seconds must be 1-60")
    if not 1 <= args.connections <= 1000:
        p.error("--connections must be 1-1000")
    if not 1 <= args.rate <= 20000:
        p.error("--rate must be 1-20000")
    results: dict[str, list[dict]] = {}
    if args.only in (None, "h1"):
        results["http1"] = run(args.seconds, args.connections, args.rate)
        print(render(results["http1"], args.rate))
    if args.only in (None, "h2"):
        results["http2"] = run_h2(args.seconds)
        print("\n" + render_simple("h2load -c4 -m100 rps", results["http2"]))
    if args.only in (None, "grpc"):
        results["grpc"] = run_grpc(args.seconds)
        print("\n" + render_simple(f"gRPC unary calls/s ({GRPC_CONCURRENCY} in flight)", results["grpc"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
