"""Workers benchmark: the node agent with ``workers: 1`` and ``workers: 2`` against HAProxy
with ``nbthread 1`` and ``nbthread 2``, HTTP/1.1 keep-alive and HTTP/2, in one run.

    sudo .venv/bin/python bench/workers.py [--seconds 5] [--rounds 3] [--connections 32] [--json out.json]

Topology: a throwaway lab (1 node, 2 pods). nginx (one worker, 200 "ok"; 8081 HTTP/1.1,
8082 h2c) in node1/pod-2; the client in node1/pod-1: ``wrk -t1 -c<connections>`` (h1) or
``h2load -t1 -c8 -m32`` (h2) against a Service VIP (``appProtocol: http`` / ``http2``: the
agent's HTTP drivers, iptables capture or ``--capture ebpf``, static snapshot) or against HAProxy, which runs in
pod-2's namespace in front of the same nginx (``mode http``, keep-alive / h2 both sides)
with the agent stopped and capture removed, so each path has exactly one proxy hop. The
agent's second workers setting is started with a hand-off from the first.

Reported per path: requests/s, the 2-vs-1 scaling, and the proxy's CPU per request (agent
and workers, or HAProxy) with the rps one fully used core would give. The client, nginx
and the kernel's veth path share the same cores: on a 2-core machine a second proxy core
can only be taken from them, which caps the scaling of every proxy, HAProxy included; the
CPU per request says what a core buys. Rounds alternate the settings' order; medians
are shown. The lab is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import cpu_seconds, haproxy_http_config, nginx_config  # noqa: E402

WEB_PORT = 8081
H2_PORT = 8082
HAPROXY_PORT = 8090
WEB_VIP = "198.19.0.31"
H2_VIP = "198.19.0.32"
MODES = ("h1", "h2")
PATHS = tuple(f"{m} {p}" for m in MODES for p in ("hostmesh workers=1", "hostmesh workers=2",
                                                   "haproxy nbthread=1", "haproxy nbthread=2"))


def haproxy_config(run_dir: str, threads: int, mode: str) -> str:
    text = haproxy_http_config(run_dir, f"0.0.0.0:{HAPROXY_PORT}",
                               f"127.0.0.1:{WEB_PORT if mode == 'h1' else H2_PORT}", threads)
    if mode == "h2":  # h2c on both sides
        text = text.replace(f"bind 0.0.0.0:{HAPROXY_PORT}", f"bind 0.0.0.0:{HAPROXY_PORT} proto h2")
        text = text.replace(f"server s1 127.0.0.1:{H2_PORT}", f"server s1 127.0.0.1:{H2_PORT} proto h2")
    return text


def tree(pid: int) -> list[int]:
    out = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            for child in f.read().split():
                out += tree(int(child))
    except OSError:
        pass
    return out


def load(lab, mode: str, url: str, seconds: int, connections: int, pids: list[int]) -> dict:
    """One measurement: (rps, CPU microseconds per request of ``pids``)."""
    before = cpu_seconds(pids)
    if mode == "h1":
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url]
    else:
        argv = ["h2load", "-t1", "-c8", "-m32", f"-D{seconds}", url]
    out = lab.run("node1/pod-1", argv, timeout=seconds + 30).stdout
    used = cpu_seconds(pids) - before
    m = re.search(r"Requests/sec:\s+([\d.]+)" if mode == "h1" else r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if not m:
        raise RuntimeError(f"{argv[0]} gave no rate for {url}:\n{out}")
    rps = float(m.group(1))
    return {"rps": rps, "cpu_us_per_request": used / (rps * seconds) * 1e6 if rps else 0.0}


def agent_with_workers(lab, n: int) -> list[int]:
    """(Re)start node1's agent with ``workers: n`` (a hand-off when one runs); its process tree."""
    from meshlab import mesh
    lab.workers = n
    if mesh.agent_pids(lab, "node1"):
        mesh.restart_agent(lab, "node1", lab.capture, static=True)
    else:
        proc = mesh.spawn_agent(lab, "node1", lab.capture, static=True)
        mesh.wait_ready(lab, "node1", proc)
    deadline = time.monotonic() + 30
    while len(mesh.agent_pids(lab, "node1")) != 1 and time.monotonic() < deadline:
        time.sleep(0.1)  # the predecessor drains and exits
    (pid,) = mesh.agent_pids(lab, "node1")
    time.sleep(0.5)
    return tree(pid)


def stop_agent(lab) -> None:
    from meshlab import mesh
    for pid in mesh.agent_pids(lab, "node1"):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while mesh.agent_running(lab, "node1") and time.monotonic() < deadline:
        time.sleep(0.05)
    r = mesh.uninstall_agent(lab, "node1", lab.capture)
    if r.returncode != 0:
        raise RuntimeError(f"uninstall failed: {r.stderr.strip()}")


def haproxy(lab, run_dir: str, threads: int, mode: str):
    Path(run_dir, "haproxy.cfg").write_text(haproxy_config(run_dir, threads, mode))
    proc = lab.spawn(lab.target("node1/pod-2"), ["haproxy", "-f", f"{run_dir}/haproxy.cfg", "-db"],
                     f"haproxy-{threads}")
    time.sleep(0.5)
    return proc


def run(seconds: int, rounds: int, connections: int, capture: str = "iptables") -> list[dict]:
    from meshlab import mesh
    from meshlab.lab import Lab
    from nodeagent.state import Endpoint, Service, ServicePort

    lab = Lab("bwrk")
    lab.down()
    lab.capture = capture
    try:
        lab.up(1, 2, apps=False)
        run_dir = lab.names.run_dir
        nginx = nginx_config(run_dir, WEB_PORT).replace(
            f"listen {WEB_PORT} reuseport backlog=4096;",
            f"listen {WEB_PORT} reuseport backlog=4096;\n        listen {H2_PORT} http2 backlog=4096;")
        Path(run_dir, "nginx.conf").write_text(nginx)
        lab.spawn(lab.target("node1/pod-2"), ["nginx", "-c", f"{run_dir}/nginx.conf"], "nginx")
        time.sleep(1.0)
        workloads = mesh.lab_workloads(lab)
        server = next(w for w in workloads if w.name == "node1-pod-2")

        def service(name: str, vip: str, port: int, app_protocol: str) -> Service:
            return Service(name, "default", vip, (ServicePort(80, port, app_protocol=app_protocol),),
                           (Endpoint(server.address, port, server.node, server.name),))

        mesh.write_snapshots(lab, [service("web", WEB_VIP, WEB_PORT, "http"), service("h2", H2_VIP, H2_PORT, "http2")],
                             workloads)
        per_round: dict[str, list[dict]] = {p: [] for p in PATHS}
        for i in range(rounds):
            print(f"-- round {i + 1}/{rounds}", file=sys.stderr, flush=True)
            settings = (1, 2) if i % 2 == 0 else (2, 1)  # alternate: a noisy neighbour hits both alike
            for n in settings:  # the second start is a hand-off from the first
                pids = agent_with_workers(lab, n)
                for mode, vip in (("h1", WEB_VIP), ("h2", H2_VIP)):
                    per_round[f"{mode} hostmesh workers={n}"].append(
                        load(lab, mode, f"http://{vip}/", seconds, connections, pids))
            stop_agent(lab)  # HAProxy alone in the path: no agent, no capture
            for n in settings:
                for mode in MODES:
                    proc = haproxy(lab, run_dir, n, mode)
                    try:
                        per_round[f"{mode} haproxy nbthread={n}"].append(
                            load(lab, mode, f"http://{server.address}:{HAPROXY_PORT}/", seconds, connections,
                                 tree(proc.pid)))
                    finally:
                        proc.send_signal(signal.SIGTERM)
                        proc.wait(10)
        return [{"path": p, "rps": statistics.median(r["rps"] for r in per_round[p]),
                 "cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in per_round[p]),
                 "rounds": per_round[p]} for p in PATHS]
    finally:
        lab.down()


def render(results: list[dict]) -> str:
    by = {r["path"]: r for r in results}
    lines = ["| protocol | path | rps | scaling 2 vs 1 | CPU us/req (proxy) | rps per proxy core |",
             "|---|---|---|---|---|---|"]
    for r in results:
        mode, kind, setting = r["path"].split(" ")
        one = by[f"{mode} {kind} {setting.split('=')[0]}=1"]
        scale = f"{r['rps'] / one['rps']:.2f}x" if setting.endswith("=2") else "1.00x"
        per_core = 1e6 / r["cpu_us_per_request"] if r["cpu_us_per_request"] else 0
        proto = "HTTP/1.1 keep-alive" if mode == "h1" else "HTTP/2 (h2load -c8 -m32)"
        lines.append(f"| {proto} | {kind} {setting} | {r['rps']:.0f} | {scale} | {r['cpu_us_per_request']:.1f} | "
                     f"{per_core:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--capture", choices=("iptables", "ebpf"), default="iptables")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if not 1 <= a.seconds <= 60 or not 1 <= a.rounds <= 10 or not 1 <= a.connections <= 1000:
        p.error("--seconds 1-60, --rounds 1-10, --connections 1-1000")
    if os.geteuid() != 0:
        p.error("needs root (it builds a lab)")
    results = run(a.seconds, a.rounds, a.connections, a.capture)
    print(render(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
