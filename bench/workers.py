"""Workers benchmark: HTTP/1.1 keep-alive through the node agent with ``workers: 1`` and
``workers: 2``, and HAProxy with ``nbthread 1`` and ``nbthread 2``, in one run.

    sudo .venv/bin/python bench/workers.py [--seconds 5] [--rounds 3] [--connections 32] [--json out.json]

Topology: a throwaway lab (1 node, 2 pods). nginx (one worker, 200 "ok") in node1/pod-2;
``wrk -t1`` in node1/pod-1 against the Service VIP (``appProtocol: http``: the agent's
HTTP/1.1 driver, iptables capture, static snapshot) or against HAProxy, which runs in
pod-2's namespace in front of the same nginx (``mode http``, keep-alive both sides). The
agent is restarted between the workers settings with a hand-off (the same listeners).
Reported per path: requests/s, CPU microseconds per request of the proxy's processes
(agent + workers, or HAProxy), and the scaling of the 2 setting over the 1 setting.
Everything shares the machine's cores (wrk and nginx too): read the ratios. Rounds
alternate the order of the paths; medians are shown. The lab is removed at the end.
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
HAPROXY_PORT = 8090
WEB_VIP = "198.19.0.31"
PATHS = ("hostmesh workers=1", "hostmesh workers=2", "haproxy nbthread=1", "haproxy nbthread=2")


def haproxy_config(run_dir: str, threads: int) -> str:
    return haproxy_http_config(run_dir, f"0.0.0.0:{HAPROXY_PORT}", f"127.0.0.1:{WEB_PORT}", threads)


def tree(pid: int) -> list[int]:
    out = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            for child in f.read().split():
                out += tree(int(child))
    except OSError:
        pass
    return out


def wrk(lab, url: str, seconds: int, connections: int, pids: list[int]) -> dict:
    before = cpu_seconds(pids)
    out = lab.run("node1/pod-1", ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url],
                  timeout=seconds + 30).stdout
    used = cpu_seconds(pids) - before
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if not m:
        raise RuntimeError(f"wrk gave no rate for {url}:\n{out}")
    rps = float(m.group(1))
    return {"rps": rps, "cpu_us_per_request": used / (rps * seconds) * 1e6 if rps else 0.0,
            "errors": errors.group(0) if errors else ""}


def agent_with_workers(lab, n: int) -> list[int]:
    """(Re)start node1's agent with ``workers: n`` (a hand-off when one runs); its process tree."""
    from meshlab import mesh
    lab.workers = n
    if mesh.agent_pids(lab, "node1"):
        mesh.restart_agent(lab, "node1", "iptables", static=True)
    else:
        proc = mesh.spawn_agent(lab, "node1", "iptables", static=True)
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
    r = mesh.uninstall_agent(lab, "node1", "iptables")
    if r.returncode != 0:
        raise RuntimeError(f"uninstall failed: {r.stderr.strip()}")


def haproxy(lab, run_dir: str, threads: int):
    Path(run_dir, "haproxy.cfg").write_text(haproxy_config(run_dir, threads))
    proc = lab.spawn(lab.target("node1/pod-2"), ["haproxy", "-f", f"{run_dir}/haproxy.cfg", "-db"],
                     f"haproxy-{threads}")
    time.sleep(0.5)
    return proc


def run(seconds: int, rounds: int, connections: int) -> list[dict]:
    from meshlab import mesh
    from meshlab.lab import Lab
    from nodeagent.state import Endpoint, Service, ServicePort

    lab = Lab("bwrk")
    lab.down()
    try:
        lab.up(1, 2, apps=False)
        run_dir = lab.names.run_dir
        Path(run_dir, "nginx.conf").write_text(nginx_config(run_dir, WEB_PORT))
        lab.spawn(lab.target("node1/pod-2"), ["nginx", "-c", f"{run_dir}/nginx.conf"], "nginx")
        time.sleep(1.0)
        workloads = mesh.lab_workloads(lab)
        server = next(w for w in workloads if w.name == "pod-2")
        mesh.write_snapshots(lab, [Service("web", "default", WEB_VIP, (ServicePort(80, WEB_PORT, app_protocol="http"),),
                                           (Endpoint(server.address, WEB_PORT, server.node, server.name),))],
                             workloads)
        per_round: dict[str, list[dict]] = {p: [] for p in PATHS}
        for i in range(rounds):
            print(f"-- round {i + 1}/{rounds}", file=sys.stderr, flush=True)
            settings = (1, 2) if i % 2 == 0 else (2, 1)  # alternate: a noisy neighbour hits both alike
            for n in settings:  # the second start is a hand-off from the first
                pids = agent_with_workers(lab, n)
                per_round[f"hostmesh workers={n}"].append(wrk(lab, f"http://{WEB_VIP}/", seconds, connections, pids))
            stop_agent(lab)  # HAProxy alone in the path: no agent, no capture
            for n in settings:
                proc = haproxy(lab, run_dir, n)
                try:
                    per_round[f"haproxy nbthread={n}"].append(
                        wrk(lab, f"http://{server.address}:{HAPROXY_PORT}/", seconds, connections, tree(proc.pid)))
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
    lines = ["| path | keep-alive rps | scaling 2 vs 1 | rps per core used | CPU us/req (proxy) |",
             "|---|---|---|---|---|"]
    for r in results:
        kind, _, setting = r["path"].partition(" ")
        one = by[f"{kind} {setting.split('=')[0]}=1"]
        scale = f"{r['rps'] / one['rps']:.2f}x" if setting.endswith("=2") else "1.00x"
        per_core = 1e6 / r["cpu_us_per_request"] if r["cpu_us_per_request"] else 0
        lines.append(f"| {r['path']} | {r['rps']:.0f} | {scale} | {per_core:.0f} | {r['cpu_us_per_request']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--json")
    a = p.parse_args(argv)
    if not 1 <= a.seconds <= 60 or not 1 <= a.rounds <= 10 or not 1 <= a.connections <= 1000:
        p.error("--seconds 1-60, --rounds 1-10, --connections 1-1000")
    if os.geteuid() != 0:
        p.error("needs root (it builds a lab)")
    results = run(a.seconds, a.rounds, a.connections)
    print(render(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
