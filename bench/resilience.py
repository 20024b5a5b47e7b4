"""Cost of a typical TrafficPolicy in the HTTP drivers: rps and p99 with and without it, same run.

    .venv/bin/python bench/resilience.py [--seconds 5] [--rounds 3] [--connections 50] [--rate 1000]
                                         [--only h1|h2] [--no-calls] [--pin] [--json out.json]

Issue 14's goal: the policy costs at most 5 % (``GOAL``). bench/l7.py's topology (loopback,
nginx with one worker as the backend, the hostmesh driver in its own process under uvloop:
``l7.serve_proxy``), two proxies per protocol started side by side, identical but for the
snapshot: no TrafficPolicy, or ``POLICY`` (timeout, 2 retries with a per-try timeout,
``connectionPool`` limits — the breaker —, outlier detection) targeting the Service. The
backend never fails, so this is the price of the bookkeeping alone, no retry is sent.

Per protocol, ``--rounds`` rounds alternate the two (A B, then B A, ...; each proxy warmed
up first); medians are shown, and the cost is the median of the per-round ratios:

* HTTP/1.1: ``wrk -t1 -c<connections>`` keep-alive rps and the proxy's CPU per request,
  then p50 / p99 at a fixed ``--rate`` over 10 keep-alive connections (bench/l7.py's client);
* HTTP/2 (Service ``appProtocol: http2``, h2c upstream): ``h2load -c4 -m100`` rps and CPU
  per request, then p50 / p99 of ``h2load --rps`` at ``--rate`` over 10 connections, one
  stream in flight each.

``--pin``: both proxies on the last CPU, nginx and the load generators on the others. On a
small shared VM most of the run-to-run spread between the two proxies is where the
scheduler put each process (a write that wakes a reader on the other CPU costs several
microseconds of kernel time): pinned, both proxies pay the same.

Python calls per request (unless ``--no-calls``): each proxy once more under cProfile
(``HOSTMESH_PROFILE``), a fixed-rate run of ``CALLS_SECONDS``; all calls the process made
over the requests served, and the functions whose calls per request grew most with the
policy. cProfile slows the proxy several times over: read the counts, not its times.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import l7  # noqa: E402

GOAL = 0.05
SERVICE, NAMESPACE = "web", "default"  # l7.serve_proxy's Service
POLICY = {"timeout": "10s",
          "retries": {"attempts": 2, "perTryTimeout": "3s", "retryOn": ["5xx", "connect-failure"]},
          "connectionPool": {"maxRequests": 10000, "maxConnections": 1000},
          "outlierDetection": {"consecutive5xxErrors": 5, "baseEjectionTime": "30s"}}
MODES = (("none", "none"), ("policy", "typical"))
PROTOCOLS = {"h1": "HTTP/1.1 (wrk)", "h2": "HTTP/2 (h2load -m100)"}
WARMUP_SECONDS = 1
CALLS_SECONDS = 2
CALLS_TOP = 8
METRICS = ("rps", "cpu_us_per_request", "p50_ms", "p99_ms")


def config(mode: str) -> tuple:
    from nodeagent.state import ConfigObject
    if mode == "none":
        return ()
    return (ConfigObject("TrafficPolicy", NAMESPACE, f"{SERVICE}-tp",
                         json.dumps({"targetRef": {"kind": "Service", "name": SERVICE}, **POLICY})),)


# ------------------------------------------------------------------ one measurement
PROXY_CPUS: set[int] | None = None  # --pin: the proxies' CPUs (the rest of the run is on the others)


def _start_proxy(backend_port: int, proto: str, mode: str, profile: str | None = None):
    port = l7.free_port()
    env = dict(os.environ, HOSTMESH_PROFILE=profile) if profile else None
    cpus = PROXY_CPUS
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(backend_port), proto, mode],
                            stdout=subprocess.DEVNULL, env=env,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    l7.wait_port(port)
    return port, proc


def _load(proto: str, port: int, pids: list[int], seconds: int, connections: int) -> tuple[float, float]:
    if proto == "h1":
        return l7.wrk_rps(f"http://{l7.LO}:{port}/", seconds, connections, pids)
    return l7.h2load_rps(f"http://{l7.LO}:{port}/", seconds, pids)


def _latencies(proto: str, port: int, rate: int, seconds: int) -> list[float]:
    """Sorted latencies (s) of a fixed-rate run."""
    if proto == "h1":
        return l7.fixed_rate(port, rate, seconds)
    return l7.h2_fixed_rate(f"http://{l7.LO}:{port}/", rate, seconds)


def _measure(proto: str, port: int, pid: int, seconds: int, connections: int, rate: int) -> dict:
    rps, cpu_us = _load(proto, port, [pid], seconds, connections)
    lat = _latencies(proto, port, rate, seconds)
    return {"rps": rps, "cpu_us_per_request": cpu_us, "p50_ms": l7.percentile_ms(lat, 0.50),
            "p99_ms": l7.percentile_ms(lat, 0.99)}


def _backend(procs: list, run_dir: str, proto: str) -> int:
    os.makedirs(f"{run_dir}/logs")
    port = l7.free_port()
    conf = (l7.nginx_h1_config if proto == "h1" else l7.nginx_h2_config)(run_dir, port)
    Path(run_dir, "nginx.conf").write_text(conf)
    l7._start(procs, ["nginx", "-c", f"{run_dir}/nginx.conf", "-p", run_dir])
    l7.wait_port(port)
    return port


# ------------------------------------------------------------------ A/B rounds
def run_ab(proto: str, seconds: int, rounds: int, connections: int, rate: int) -> dict:
    """Both proxies up at once, measured alternately; the samples per mode."""
    procs: list[subprocess.Popen] = []
    samples: dict[str, list[dict]] = {mode: [] for mode, _ in MODES}
    with tempfile.TemporaryDirectory(prefix="hostmesh-resilience-bench-") as run_dir:
        try:
            backend = _backend(procs, run_dir, proto)
            proxies = {}
            for mode, _ in MODES:
                port, proc = _start_proxy(backend, proto, mode)
                procs.append(proc)
                proxies[mode] = (port, proc.pid)
                _load(proto, port, [], WARMUP_SECONDS, connections)
            for r in range(rounds):
                order = [m for m, _ in MODES][:: 1 if r % 2 == 0 else -1]
                for mode in order:
                    samples[mode].append(_measure(proto, *proxies[mode], seconds, connections, rate))
        finally:
            l7._stop(procs)
    return samples


def calls_per_request(proto: str, rate: int) -> dict:
    """Per mode: all Python calls of the proxy process / requests served, and per-function counts."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="hostmesh-resilience-calls-") as run_dir:
        procs: list[subprocess.Popen] = []
        try:
            backend = _backend(procs, run_dir, proto)
            for mode, _ in MODES:
                profile = f"{run_dir}/{mode}.prof"
                port, proc = _start_proxy(backend, proto, mode, profile)
                try:
                    n = len(_latencies(proto, port, rate, CALLS_SECONDS))
                finally:
                    l7._stop([proc])
                st = pstats.Stats(profile)
                per_fn = {f"{Path(f).name}:{line}({fn})": v[1] / n for (f, line, fn), v in st.stats.items()}
                out[mode] = {"requests": n, "calls_per_request": st.total_calls / n, "functions": per_fn}
        finally:
            l7._stop(procs)
    return out


# ------------------------------------------------------------------ report
def summarize(samples: dict) -> dict:
    med = {mode: {k: statistics.median(s[k] for s in runs) for k in METRICS} for mode, runs in samples.items()}
    ratios = {k: [b[k] / a[k] for a, b in zip(samples["none"], samples["policy"])] for k in METRICS}
    return {"median": med, "ratio": {k: statistics.median(v) for k, v in ratios.items()},
            "ratio_range": {k: (min(v), max(v)) for k, v in ratios.items()}}


def _verdict(cost: float) -> str:
    return "PASS" if cost <= GOAL else "MISS"


def render(results: dict, rate: int, rounds: int) -> str:
    lines = [f"| protocol | TrafficPolicy | rps | CPU µs/req | p50 ms @{rate}/s | p99 ms | Python calls/req |",
             "|---|---|---|---|---|---|---|"]
    for proto, res in results.items():
        for mode, label in MODES:
            m = res["median"][mode]
            calls = res.get("calls", {}).get(mode)
            per_req = f"{calls['calls_per_request']:.0f}" if calls else "—"
            lines.append(f"| {PROTOCOLS[proto]} | {label} | {m['rps']:.0f} | {m['cpu_us_per_request']:.1f} | "
                         f"{m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {per_req} |")
    lines += ["", f"Cost of the policy (policy/none, median of {rounds} alternated rounds [min-max]; "
              f"goal ≤ {GOAL:.0%}):", "",
              "| protocol | rps | rps cost | CPU/req cost | p99 cost | rps verdict | p99 verdict |",
              "|---|---|---|---|---|---|---|"]
    for proto, res in results.items():
        r, lo_hi = res["ratio"], res["ratio_range"]
        rps_cost, cpu_cost, p99_cost = 1 - r["rps"], r["cpu_us_per_request"] - 1, r["p99_ms"] - 1
        lines.append(f"| {PROTOCOLS[proto]} | {r['rps']:.3f}x [{lo_hi['rps'][0]:.3f}-{lo_hi['rps'][1]:.3f}] | "
                     f"{rps_cost:+.1%} | {cpu_cost:+.1%} | {p99_cost:+.1%} | {_verdict(rps_cost)} | "
                     f"{_verdict(p99_cost)} |")
    for proto, res in results.items():
        calls = res.get("calls")
        if not calls:
            continue
        none, pol = calls["none"]["functions"], calls["policy"]["functions"]
        extra = sorted(((pol.get(k, 0) - none.get(k, 0), k) for k in set(none) | set(pol)), reverse=True)
        added = calls["policy"]["calls_per_request"] - calls["none"]["calls_per_request"]
        lines += ["", f"{PROTOCOLS[proto]}: {added:+.1f} Python calls/request with the policy; most added:", "",
                  "| function | calls/req none | policy | added |", "|---|---|---|---|"]
        lines += [f"| {k} | {none.get(k, 0):.2f} | {pol.get(k, 0):.2f} | {d:+.2f} |"
                  for d, k in extra[:CALLS_TOP] if d > 0.01]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="length of each measurement (1-60)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds per protocol (1-9)")
    ap.add_argument("--connections", type=int, default=50, help="wrk connections (1-1000)")
    ap.add_argument("--rate", type=int, default=1000, help="fixed request rate of the latency runs (10-20000)")
    ap.add_argument("--only", choices=tuple(PROTOCOLS), help="one protocol")
    ap.add_argument("--no-calls", action="store_true", help="skip the Python calls per request")
    ap.add_argument("--pin", action="store_true",
                    help="proxies on the last CPU, nginx and the load generators on the others")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--serve", nargs=4, metavar=("PORT", "BACKEND_PORT", "PROTO", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        l7.serve_proxy(int(args.serve[0]), int(args.serve[1]), args.serve[2], config(args.serve[3]))
        return 0
    if not 1 <= args.seconds <= 60 or not 1 <= args.rounds <= 9 or not 1 <= args.connections <= 1000 \
            or not 10 <= args.rate <= 20000:
        ap.error("--seconds 1-60, --rounds 1-9, --connections 1-1000, --rate 10-20000")
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--pin needs at least 2 CPUs")
        global PROXY_CPUS
        PROXY_CPUS = {cpus[-1]}
        os.sched_setaffinity(0, set(cpus[:-1]))  # inherited by nginx, wrk, h2load and the clients
    results: dict[str, dict] = {}
    for proto in PROTOCOLS:
        if args.only not in (None, proto):
            continue
        l7._need("nginx", "wrk" if proto == "h1" else "h2load")
        samples = run_ab(proto, args.seconds, args.rounds, args.connections, args.rate)
        results[proto] = {**summarize(samples), "samples": samples}
        if not args.no_calls:
            results[proto]["calls"] = calls_per_request(proto, args.rate)
    print(render(results, args.rate, args.rounds))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
