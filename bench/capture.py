"""Capture benchmark: direct vs iptables vs eBPF vs eBPF + same-node acceleration, in one run.

    sudo .venv/bin/python bench/capture.py [--seconds 5] [--rate 500] [--rounds 5] [--json out.json]

Topology: a throwaway lab (1 node, 2 + 3 x rounds pods). nginx and iperf3 run in
node1/pod-2, the clients in the other pods (a fresh one per backend and round, see
client_pod()), so every capture path has exactly one proxy hop on the same node:
  direct      pod-1 -> pod-2:8081                         (no agent: no capture)
  iptables    pod-a -> VIP:80, nat REDIRECT -> node agent -> pod-2
  ebpf        pod-b -> VIP:80, cgroup/connect4 -> node agent -> pod-2
  ebpf-accel  pod-c -> VIP:80, cgroup/connect4 -> node agent -> pod-2, both legs (pod <->
              proxy, proxy <-> pod) in the hm_socks sockhash: sk_msg hands the bytes to the
              peer socket, skipping TCP/IP and the veth
Measured per path:
  connect   new connections at a fixed rate: connect() time, and time to the whole HTTP
            response on that new connection (connect + request + response)
  request   small requests at a fixed rate on one keep-alive connection: latency
  conns/s   new TCP connections per second (wrk -t1 -c16, 'Connection: close')
  tput      iperf3 single stream, both directions (Gbit/s)
  stalled   flow control: bytes a client can write into a connection whose server never
            reads before its send() blocks (capped at STALL_CAP). TCP bounds it by the socket
            buffers on the way; sk_msg's ingress redirect charges the receiving socket without
            looking at its receive buffer, so only the cap (or the kernel's tcp_mem) stops it
Latencies are measured from the *scheduled* send time (no coordinated omission); p50/p99
in microseconds. Everything shares the machine's cores: read the ratios. Each round runs
every path, the backends in a rotated order (interleaved A/B rounds: a noisy neighbour hits
all of them alike); the table shows per-path medians over the rounds and the spread
(min-max of the per-round values). The lab is removed when the run ends, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
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
IPERF_PORT = 5201
IPERF_VIP = "198.19.0.30"
STALL_PORT = 7003
STALL_CAP = 256 << 20
BACKENDS = ("iptables", "ebpf", "ebpf-accel")  # every one behind the node agent
PATHS = ("direct",) + BACKENDS
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
    return f"node1/pod-{3 + len(BACKENDS) * round_no + BACKENDS.index(path)}"


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


def stall_client(addr: tuple[str, int]) -> dict:
    """Write as fast as possible into a connection whose server never reads: how much is taken
    before send() blocks for a second (bounded: STALL_CAP bytes, 10 s)."""
    s = socket.create_connection(addr, timeout=5)
    s.setblocking(False)
    block = b"\0" * (1 << 20)
    total, start = 0, time.monotonic()
    last = start
    try:
        while total < STALL_CAP and time.monotonic() - start < 10:
            try:
                total += s.send(block[:STALL_CAP - total])
                last = time.monotonic()
            except BlockingIOError:
                if time.monotonic() - last > 1.0:
                    break
                select.select([], [s], [], 0.1)
    finally:
        s.close()
    return {"bytes": total, "capped": total >= STALL_CAP}


def stall_server(port: int) -> None:
    """Accept and never read; a connection is dropped 20 s after it came (bounded memory)."""
    ls = socket.create_server(("0.0.0.0", port), backlog=64)
    held: list[tuple[float, socket.socket]] = []
    while True:
        ready, _, _ = select.select([ls], [], [], 1.0)
        if ready:
            held.append((time.monotonic(), ls.accept()[0]))
        while held and time.monotonic() - held[0][0] > 20:
            held.pop(0)[1].close()


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


def iperf(lab, client: str, host: str, seconds: int, reverse: bool) -> float:
    argv = ["iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"] + (["-R"] if reverse else [])
    r = lab.run(client, argv, timeout=seconds + 30)
    data = json.loads(r.stdout or "{}")
    if "error" in data or "end" not in data:
        raise RuntimeError(f"iperf3 to {host}:{IPERF_PORT}: {data.get('error') or r.stderr.strip()}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def measure(lab, label: str, rate: float, seconds: int, round_no: int = 0, throughput: bool = True) -> dict:
    print(f"== {label}", file=sys.stderr, flush=True)
    host, port, iperf_host = (SERVER_IP, WEB_PORT, SERVER_IP) if label == "direct" else (WEB_VIP, 80, IPERF_VIP)
    addr, client = f"{host}:{port}", client_pod(label, round_no)
    out = {"path": label,
           "connect": run_client(lab, client, addr, "connect", rate, seconds),
           "request": run_client(lab, client, addr, "request", rate, seconds),
           "connections_per_s": conn_rate(lab, client, f"http://{addr}/", seconds)}
    if throughput:
        out["throughput_gbps"] = iperf(lab, client, iperf_host, seconds, reverse=False)
        out["throughput_reverse_gbps"] = iperf(lab, client, iperf_host, seconds, reverse=True)
    r = lab.run(client, [sys.executable, str(Path(__file__).resolve()), "stall", "--addr",
                         f"{SERVER_IP}:{STALL_PORT}"], timeout=60)  # the pod IP: captured, no service needed
    if r.returncode != 0:
        raise RuntimeError(f"stall client failed: {r.stderr.strip()}")
    out["stalled_receiver_mib"] = json.loads(r.stdout)["bytes"] / (1 << 20)
    return out


def start_agent(lab, backend: str) -> None:
    """The node agent with static snapshots (no control plane), capture `backend` (BACKENDS)."""
    from meshlab import mesh
    capture, _, variant = backend.partition("-")
    lab.accelerate = (variant == "accel") if capture == "ebpf" else None  # read by mesh.agent_bootstrap
    proc = mesh.spawn_agent(lab, "node1", capture, static=True)
    mesh.wait_ready(lab, "node1", proc)
    time.sleep(0.5)


def stop_agent(lab, backend: str) -> None:
    """Stop the agent and remove its capture: a stop alone leaves capture installed (fail
    closed), and the next backend or the direct path must start from a clean node."""
    from meshlab import mesh
    for pid in mesh.agent_pids(lab, "node1"):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while mesh.agent_running(lab, "node1") and time.monotonic() < deadline:
        time.sleep(0.05)
    r = mesh.uninstall_agent(lab, "node1", backend.partition("-")[0])
    if r.returncode != 0:
        raise RuntimeError(f"uninstall ({backend}) failed: {r.stderr.strip()}")


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2]


SCALARS = ("connections_per_s", "throughput_gbps", "throughput_reverse_gbps", "stalled_receiver_mib")


def combine(rounds: list[list[dict]]) -> list[dict]:
    """Per path, the median of every number over the rounds (the machine is shared: be robust),
    and the spread (min, max) of the ones the table shows."""
    out = []
    for i, first in enumerate(rounds[0]):
        same = [r[i] for r in rounds]
        row = {"path": first["path"], "rounds": len(rounds),
               "connect": {k: _median([s["connect"][k] for s in same]) for k in first["connect"]},
               "request": {k: _median([s["request"][k] for s in same]) for k in first["request"]},
               "raw": same}
        spread = {"request_p50_us": [s["request"]["p50_us"] for s in same],
                  "connect_p50_us": [s["connect"]["p50_us"] for s in same]}
        for k in SCALARS:
            if k in first:
                row[k] = _median([s[k] for s in same])
                spread[k] = [s[k] for s in same]
        row["spread"] = {k: (min(v), max(v)) for k, v in spread.items()}
        out.append(row)
    return out


def run(seconds: int, rate: float, rounds: int = 1, throughput: bool = True) -> list[dict]:
    from meshlab import mesh
    from meshlab.lab import Lab
    from nodeagent.state import Endpoint, Service, ServicePort

    lab = Lab("bcap")
    lab.down()  # leftovers of an interrupted run
    try:
        lab.up(1, 2 + len(BACKENDS) * rounds, apps=False)
        run_dir = lab.names.run_dir
        Path(run_dir, "nginx.conf").write_text(nginx_config(run_dir, WEB_PORT))
        server = lab.target("node1/pod-2")
        lab.spawn(server, ["nginx", "-c", f"{run_dir}/nginx.conf"], "nginx")
        lab.spawn(server, ["iperf3", "-s", "-p", str(IPERF_PORT)], "iperf3")
        lab.spawn(server, [sys.executable, str(Path(__file__).resolve()), "stall-server", "--port", str(STALL_PORT)],
                  "stall-server")
        time.sleep(1.0)
        workloads = mesh.lab_workloads(lab)
        wl = next(w for w in workloads if w.address == SERVER_IP)
        ep = lambda port: (Endpoint(SERVER_IP, port, wl.node, wl.name),)  # noqa: E731
        services = [Service("web", "default", WEB_VIP, (ServicePort(80, WEB_PORT),), ep(WEB_PORT)),
                    Service("iperf", "default", IPERF_VIP, (ServicePort(IPERF_PORT, IPERF_PORT),), ep(IPERF_PORT))]
        mesh.write_snapshots(lab, services, workloads)
        all_rounds = []
        for i in range(rounds):
            print(f"-- round {i + 1}/{rounds}", file=sys.stderr, flush=True)
            results = [measure(lab, "direct", rate, seconds, i, throughput)]
            # rotate the backends' order between rounds: interleaved A/B against a noisy machine
            for backend in BACKENDS[i % len(BACKENDS):] + BACKENDS[:i % len(BACKENDS)]:
                start_agent(lab, backend)
                results.append(measure(lab, backend, rate, seconds, i, throughput))
                stop_agent(lab, backend)
            all_rounds.append(sorted(results, key=lambda r: PATHS.index(r["path"])))
        return combine(all_rounds)
    finally:
        lab.down()


def _spread(r: dict, key: str, fmt: str = "{:.0f}") -> str:
    lo, hi = r["spread"].get(key, (None, None))
    return "" if lo is None or r["rounds"] < 2 else f" [{fmt.format(lo)}-{fmt.format(hi)}]"


def render(results: list[dict]) -> str:
    by = {r["path"]: r for r in results}
    d = by["direct"]
    tput = "throughput_gbps" in d
    lines = ["| path | connect p50/p99 us | new-conn request p50/p99 us | keep-alive request p50/p99 us "
             "| new conns/s" + (" | single stream Gbit/s fwd / rev" if tput else "") + " | stalled receiver MiB |",
             "|---|---|---|---|---" + ("|---" if tput else "") + "|---|"]
    for r in results:
        c, q = r["connect"], r["request"]
        row = (f"| {r['path']} | {c['connect_p50_us']:.0f} / {c['connect_p99_us']:.0f} | "
               f"{c['p50_us']:.0f} / {c['p99_us']:.0f}{_spread(r, 'connect_p50_us')} | "
               f"{q['p50_us']:.0f} / {q['p99_us']:.0f}{_spread(r, 'request_p50_us')} | "
               f"{r['connections_per_s']:.0f}{_spread(r, 'connections_per_s')}")
        if tput:
            row += (f" | {r['throughput_gbps']:.2f}{_spread(r, 'throughput_gbps', '{:.1f}')} / "
                    f"{r['throughput_reverse_gbps']:.2f}{_spread(r, 'throughput_reverse_gbps', '{:.1f}')}")
        cap = " (cap)" if r["stalled_receiver_mib"] >= STALL_CAP >> 20 else ""
        lines.append(row + f" | {r['stalled_receiver_mib']:.0f}{cap} |")
    lines.append("\n[min-max] = spread of the per-round values; the numbers are medians over the rounds")
    for a, b in (("ebpf", "iptables"), ("ebpf-accel", "ebpf")):
        if a not in by or b not in by:
            continue
        ra, rb = by[a], by[b]
        for what, key in (("keep-alive request", "request"), ("new-connection request", "connect")):
            added_a = ra[key]["p50_us"] - d[key]["p50_us"]
            added_b = rb[key]["p50_us"] - d[key]["p50_us"]
            if added_b > 0:
                lines.append(f"{what} p50: {a} adds {added_a:.0f} us, {b} adds {added_b:.0f} us over direct: "
                             f"{a} adds {100 * (1 - added_a / added_b):.0f}% less latency "
                             f"(p50 ratio {ra[key]['p50_us'] / rb[key]['p50_us']:.2f}x)")
        ratios = [f"new conns/s {ra['connections_per_s'] / rb['connections_per_s']:.2f}x"]
        if tput:
            ratios += [f"throughput {ra['throughput_gbps'] / rb['throughput_gbps']:.2f}x fwd / "
                       f"{ra['throughput_reverse_gbps'] / rb['throughput_reverse_gbps']:.2f}x rev"]
        lines.append(f"{a} / {b}: " + ", ".join(ratios))
        lines.append(f"{a} / {b} paired per round (median [min-max] of the round's ratios): " + paired(ra, rb, tput))
    return "\n".join(lines)


def paired(ra: dict, rb: dict, tput: bool) -> str:
    """Ratios within each round (same minute, same neighbours), then their median and range:
    steadier than the ratio of medians on a shared machine."""
    metrics = [("keep-alive p50", lambda x: x["request"]["p50_us"]), ("new-conn p50", lambda x: x["connect"]["p50_us"]),
               ("conns/s", lambda x: x["connections_per_s"])]
    if tput:
        metrics += [("tput fwd", lambda x: x["throughput_gbps"]), ("tput rev", lambda x: x["throughput_reverse_gbps"])]
    out = []
    for name, get in metrics:
        ratios = [get(a) / get(b) for a, b in zip(ra["raw"], rb["raw"])]
        out.append(f"{name} {_median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]")
    return ", ".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("client", help="(runs inside the client pod)")
    c.add_argument("--addr", required=True)
    c.add_argument("--mode", choices=["connect", "request"], required=True)
    c.add_argument("--rate", type=float, default=500)
    c.add_argument("--seconds", type=float, default=5)
    c = sub.add_parser("stall", help="(runs inside the client pod)")
    c.add_argument("--addr", required=True)
    c = sub.add_parser("stall-server", help="(runs inside the server pod)")
    c.add_argument("--port", type=int, default=STALL_PORT)
    p.add_argument("--seconds", type=int, default=5, help="length of each measurement (1-60)")
    p.add_argument("--rate", type=float, default=500, help="fixed request rate for the latency runs (per second)")
    p.add_argument("--rounds", type=int, default=3, help="repeat everything, report medians (1-10)")
    p.add_argument("--no-throughput", action="store_true", help="skip the iperf3 single-stream runs")
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args(argv)
    if args.cmd == "client":
        host, _, port = args.addr.rpartition(":")
        print(json.dumps(client((host, int(port)), args.mode, args.rate, args.seconds)))
        return 0
    if args.cmd == "stall":
        host, _, port = args.addr.rpartition(":")
        print(json.dumps(stall_client((host, int(port)))))
        return 0
    if args.cmd == "stall-server":
        stall_server(args.port)
        return 0
    if not 1 <= args.seconds <= 60:
        p.error("--seconds must be 1-60")
    if os.geteuid() != 0:
        p.error("the benchmark builds a netns lab: run it as root")
    if not 1 <= args.rounds <= MAX_ROUNDS:
        p.error(f"--rounds must be 1-{MAX_ROUNDS}")
    results = run(args.seconds, args.rate, args.rounds, throughput=not args.no_throughput)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
