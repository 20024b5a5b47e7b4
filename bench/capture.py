"""Capture benchmark: direct vs iptables capture vs eBPF capture, side by side in one run.

    sudo .venv/bin/python bench/capture.py [--seconds 5] [--rate 500] [--json out.json]

Topology: a throwaway lab (1 node, 2 + 2 x rounds pods). nginx runs in node1/pod-2, the
clients in the other pods (a fresh one per backend and round, see client_pod()), so both
capture paths have exactly one proxy hop on the same node:
  direct    pod-1 -> pod-2:8081                         (no agent: no capture)
  iptables  pod-3/5/.. -> VIP:80, nat REDIRECT -> node agent -> pod-2
  ebpf      pod-4/6/.. -> VIP:80, cgroup/connect4 -> node agent -> pod-2
Measured per path:
  connect   new connections at a fixed rate: connect() time, and time to the whole HTTP
            response on that new connection (connect + request + response)
  request   small requests at a fixed rate on one keep-alive connection: latency
  conns/s   new TCP connections per second (wrk -t1 -c16, 'Connection: close')
Latencies are measured from the *scheduled* send time (no coordinated omission); p50/p99
in microseconds. Everything shares the machine's cores: read the ratios. Each round runs
all three paths (the backends' order alternates); the table shows per-path medians over
the rounds. The lab is removed when the run ends, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import nginx_config  # noqa: E402

WEB_PORT = 8081
WEB_VIP = "198.19.0.31"
SERVER_IP = "198.18.1.2"
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
MAX_ROUNDS = 10


def client_pod(path: str, round_no: int) -> str:
    """A fresh client pod per (path, round) behind a proxy. The proxy's side of each closed
    connection stays in TIME_WAIT on the node for 60 s; a restarted proxy that sees the same
    client reuse those ports answers its SYNs with the old connection's ACK, the client
    resets and retries after 1 s: seconds-long connect stalls that would be measured as
    the backend's (they hit iptables and eBPF alike). Direct connections have no proxy."""
    if path == "direct":
        return "node1/pod-1"
    return f"node1/pod-{3 + 2 * round_no + (path == 'ebpf')}"


# ------------------------------------------------------------------ the client (in the pod)


def _read_response(s: socket.socket, buf: bytearray) -> None:
    """Read one nginx 'ok\\n' response (headers + 3-byte body)."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            m = re.search(rb"[Cc]ontent-[Ll]ength: (\d+)", bytes(buf[:end]))
            need = end + 4 + (int(m.group(1)) if m else 0)
            if len(buf) >= need:
                del buf[:need]
                return
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] * 1e6 if v else float("nan")


def client(addr: tuple[str, int], mode: str, rate: float, seconds: float) -> dict:
    interval = 1.0 / rate
    n = int(rate * seconds)
    lat, conn_lat = [], []
    errors = 0
    start = time.perf_counter() + 0.05
    s = None
    buf = bytearray()
    if mode == "request":
        s = socket.create_connection(addr, timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(REQUEST)
        _read_response(s, buf)  # warm-up
    for i in range(n):
        due = start + i * interval
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        try:
            if mode == "connect":
                c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                c.settimeout(5)
                c.connect(addr)
                conn_lat.append(time.perf_counter() - due)
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                c.sendall(REQUEST)
                _read_response(c, bytearray())
                lat.append(time.perf_counter() - due)
                c.close()
            else:
                s.sendall(REQUEST)
                _read_response(s, buf)
                lat.append(time.perf_counter() - due)
        except OSError:
            errors += 1
    if s is not None:
        s.close()
    out = {"n": n, "errors": errors, "p50_us": _pct(lat, 0.50), "p99_us": _pct(lat, 0.99)}
    if mode == "connect":
        out.update(connect_p50_us=_pct(conn_lat, 0.50), connect_p99_us=_pct(conn_lat, 0.99))
    return out


# ------------------------------------------------------------------ the orchestration (root)


def run_client(lab, client: str, addr: str, mode: str, rate: float, seconds: float) -> dict:
    r = lab.run(client, [sys.executable, str(Path(__file__).resolve()), "client", "--addr", addr,
                                "--mode", mode, "--rate", str(rate), "--seconds", str(seconds)],
                timeout=seconds + 60)
    if r.returncode != 0:
        raise RuntimeError(f"client {mode} {addr} failed: {r.stderr.strip()}")
    return json.loads(r.stdout)


def conn_rate(lab, client: str, url: str, seconds: int) -> float:
    out = lab.run(client, ["wrk", "-t1", "-c16", f"-d{seconds}s", "-H", "Connection: close", url],
                  timeout=seconds + 30).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk gave no rate for {url}:\n{out}")
    return float(m.group(1))


def measure(lab, label: str, host: str, port: int, rate: float, seconds: int, round_no: int = 0) -> dict:
    print(f"== {label}", file=sys.stderr, flush=True)
    addr, client = f"{host}:{port}", client_pod(label, round_no)
    return {"path": label,
            "connect": run_client(lab, client, addr, "connect", rate, seconds),
            "request": run_client(lab, client, addr, "request", rate, seconds),
            "connections_per_s": conn_rate(lab, client, f"http://{addr}/", seconds)}


def stop_agent(lab) -> None:
    from meshlab import mesh
    for pid in mesh.agent_pids(lab, "node1"):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while mesh.agent_running(lab, "node1") and time.monotonic() < deadline:
        time.sleep(0.05)


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2]


def combine(rounds: list[list[dict]]) -> list[dict]:
    """Per path, the median of every number over the rounds (the machine is shared: be robust)."""
    out = []
    for i, first in enumerate(rounds[0]):
        same = [r[i] for r in rounds]
        out.append({"path": first["path"], "rounds": len(rounds),
                    "connect": {k: _median([s["connect"][k] for s in same]) for k in first["connect"]},
                    "request": {k: _median([s["request"][k] for s in same]) for k in first["request"]},
                    "connections_per_s": _median([s["connections_per_s"] for s in same]),
                    "raw": same})
    return out


def run(seconds: int, rate: float, rounds: int = 1) -> list[dict]:
    from meshlab import mesh
    from meshlab.lab import Lab
    from nodeagent.state import Endpoint, Service, ServicePort

    lab = Lab("bcap")
    lab.down()  # leftovers of an interrupted run
    try:
        lab.up(1, 2 + 2 * rounds, apps=False)
        run_dir = lab.names.run_dir
        Path(run_dir, "nginx.conf").write_text(nginx_config(run_dir, WEB_PORT))
        lab.spawn(lab.target("node1/pod-2"), ["nginx", "-c", f"{run_dir}/nginx.conf"], "nginx")
        time.sleep(1.0)
        workloads = mesh.lab_workloads(lab)
        wl = next(w for w in workloads if w.address == SERVER_IP)
        services = [Service("web", "default", WEB_VIP, (ServicePort(80, WEB_PORT),),
                            (Endpoint(SERVER_IP, WEB_PORT, wl.node, wl.name),))]
        mesh.write_snapshots(lab, services, workloads)
        all_rounds = []
        for i in range(rounds):
            print(f"-- round {i + 1}/{rounds}", file=sys.stderr, flush=True)
            results = [measure(lab, "direct", SERVER_IP, WEB_PORT, rate, seconds, i)]
            # alternate the order of the two backends between rounds
            for backend in (("iptables", "ebpf") if i % 2 == 0 else ("ebpf", "iptables")):
                proc = mesh.spawn_agent(lab, "node1", backend, static=True)  # static snapshots, no control plane
                mesh.wait_ready(lab, "node1", proc)
                time.sleep(0.5)
                results.append(measure(lab, backend, WEB_VIP, 80, rate, seconds, i))
                stop_agent(lab)
            all_rounds.append(sorted(results, key=lambda r: ["direct", "iptables", "ebpf"].index(r["path"])))
        return combine(all_rounds)
    finally:
        lab.down()


def render(results: list[dict]) -> str:
    by = {r["path"]: r for r in results}
    d = by["direct"]
    lines = ["| path | connect p50/p99 us | new-conn request p50/p99 us | keep-alive request p50/p99 us "
             "| new conns/s | added request p50 vs direct |", "|---|---|---|---|---|---|"]
    for r in results:
        c, q = r["connect"], r["request"]
        added = q["p50_us"] - d["request"]["p50_us"]
        lines.append(f"| {r['path']} | {c['connect_p50_us']:.0f} / {c['connect_p99_us']:.0f} | "
                     f"{c['p50_us']:.0f} / {c['p99_us']:.0f} | {q['p50_us']:.0f} / {q['p99_us']:.0f} | "
                     f"{r['connections_per_s']:.0f} | {added:+.0f} us |")
    if "iptables" in by and "ebpf" in by:
        i, e = by["iptables"], by["ebpf"]
        for what, key in (("keep-alive request", "request"), ("new-connection request", "connect")):
            ai = i[key]["p50_us"] - d[key]["p50_us"]
            ae = e[key]["p50_us"] - d[key]["p50_us"]
            if ai > 0:
                lines.append(f"\n{what}: eBPF adds {ae:.0f} us, iptables adds {ai:.0f} us over direct (p50): "
                             f"eBPF adds {100 * (1 - ae / ai):.0f}% less latency")
        lines.append(f"new conns/s: eBPF / iptables = {e['connections_per_s'] / i['connections_per_s']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("client", help="(runs inside the client pod)")
    c.add_argument("--addr", required=True)
    c.add_argument("--mode", choices=["connect", "request"], required=True)
    c.add_argument("--rate", type=float, default=500)
    c.add_argument("--seconds", type=float, default=5)
    p.add_argument("--seconds", type=int, default=5, help="length of each measurement (1-60)")
    p.add_argument("--rate", type=float, default=500, help="fixed request rate for the latency runs (per second)")
    p.add_argument("--rounds", type=int, default=3, help="repeat everything, report medians (1-10)")
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args(argv)
    if args.cmd == "client":
        host, _, port = args.addr.rpartition(":")
        print(json.dumps(client((host, int(port)), args.mode, args.rate, args.seconds)))
        return 0
    if not 1 <= args.seconds <= 60:
        p.error("--seconds must be 1-60")
    if os.geteuid() != 0:
        p.error("the benchmark builds a netns lab: run it as root")
    if not 1 <= args.rounds <= MAX_ROUNDS:
        p.error(f"--rounds must be 1-{MAX_ROUNDS}")
    results = run(args.seconds, args.rate, args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
