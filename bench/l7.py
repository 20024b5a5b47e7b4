"""L7 (HTTP/1.1) benchmark on loopback: direct vs the hostmesh HTTP/1.1 driver vs HAProxy.

    .venv/bin/python bench/l7.py [--seconds 5] [--connections 50] [--rate 1000] [--json out.json]

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

from peers import nginx_config  # noqa: E402

LO = "127.0.0.1"
VIP = "198.19.0.40"  # only looked up in the proxy's snapshot


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LO, 0))
        return s.getsockname()[1]


def haproxy_config(run_dir: str, port: int, backend_port: int) -> str:
    return f"""global
    nbthread 1
    maxconn 4096
    pidfile {run_dir}/haproxy.pid
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend web
    bind {LO}:{port}
    default_backend web
backend web
    http-reuse always
    server s1 {LO}:{backend_port}
"""


# ------------------------------------------------------------------ the hostmesh proxy process
def serve_proxy(port: int, backend_port: int) -> None:
    """Run the HTTP/1.1 driver on ``port`` in front of ``backend_port`` (the ``--serve-proxy`` mode)."""
    import uvloop
    from prometheus_client import CollectorRegistry

    from nodeagent.proxy.l7.context import L7Inputs
    from nodeagent.proxy.l7.http1_proxy import listen_http1
    from nodeagent.proxy.l7.metrics import HttpMetrics
    from nodeagent.state import Endpoint, NodeSnapshot, Service, ServicePort

    async def main() -> None:
        svc = Service("web", "default", VIP, (ServicePort(80, backend_port),),
                      (Endpoint(LO, backend_port, "node1", "nginx", "default"),))
        snap = NodeSnapshot("node1", (svc,))
        inputs = L7Inputs.create("node1", HttpMetrics(CollectorRegistry()))
        server = await listen_http1(inputs, lambda: snap, LO, port, dst=(VIP, 80), backlog=4096)
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
def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of processes (and their reaped children) from /proc, in seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


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


def fixed_rate_latency(port: int, rate: int, seconds: float) -> tuple[float, float]:
    """(p50, p99) in ms. Run in a child process so the client has its own core share."""
    code = (f"import asyncio, json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            f"import l7, uvloop; lat = uvloop.run(l7._fixed_rate({port}, {rate}, {seconds})); "
            f"print(json.dumps(sorted(lat)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds + 60, check=True)
    lat = json.loads(out.stdout)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000.0  # noqa: E731
    return pick(0.50), pick(0.99)


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


def run(seconds: int, connections: int, rate: int) -> list[dict]:
    for tool in ("wrk", "nginx", "haproxy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench/l7.py needs {tool} on PATH")
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="hostmesh-l7-bench-") as run_dir:
        os.makedirs(f"{run_dir}/logs")
        nginx_port, hm_port, ha_port = free_port(), free_port(), free_port()
        Path(run_dir, "nginx.conf").write_text(nginx_config(run_dir, nginx_port).replace(
            f"listen {nginx_port}", f"listen {LO}:{nginx_port}"))
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
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


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
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-proxy":
        serve_proxy(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=5, help="length of each measurement (1-60)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (1-1000)")
    p.add_argument("--rate", type=int, default=1000, help="fixed request rate for the latency run (1-20000)")
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args()
    if not 1 <= args.seconds <= 60:
        p.error("--seconds must be 1-60")
    if not 1 <= args.connections <= 1000:
        p.error("--connections must be 1-1000")
    if not 1 <= args.rate <= 20000:
        p.error("--rate must be 1-20000")
    results = run(args.seconds, args.connections, args.rate)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(render(results, args.rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
