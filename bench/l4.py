"""L4 benchmark: direct vs the hostmesh node proxy vs HAProxy, side by side in one run.

    sudo .venv/bin/python bench/l4.py [--seconds 5] [--json out.json]

Topology: a throwaway lab (1 node, 2 pods). The client runs in node1/pod-1, the servers
(iperf3 and nginx) in node1/pod-2, so every path has exactly one proxy hop on node1:
  direct    pod-1 -> pod-2                        (agent stopped: no capture)
  hostmesh  pod-1 -> VIP, captured by iptables -> node agent (uvloop) -> pod-2
  haproxy   pod-1 -> node1:port -> HAProxy 'mode tcp', nbthread 1 -> pod-2
Measured: iperf3 single-stream throughput (both directions) and new TCP connections per
second (wrk with 'Connection: close' against nginx). Everything shares the machine's
cores, so read the ratios, not the absolute numbers. The run is bounded in time and
removes the lab when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from meshlab import mesh  # noqa: E402
from meshlab.lab import Lab  # noqa: E402
from nodeagent.state import Endpoint, Service, ServicePort  # noqa: E402
from peers import nginx_config  # noqa: E402

IPERF_PORT, WEB_PORT = 5201, 8081
IPERF_VIP, WEB_VIP = "198.19.0.30", "198.19.0.31"
HAPROXY_IPERF, HAPROXY_WEB = 15201, 18081
SERVER_IP, NODE_IP = "198.18.1.2", "198.18.0.11"


def haproxy_config(run_dir: str) -> str:
    return f"""global
    nbthread 1
    maxconn 4096
    pidfile {run_dir}/haproxy.pid
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend iperf
    bind {NODE_IP}:{HAPROXY_IPERF}
    default_backend iperf
backend iperf
    server s1 {SERVER_IP}:{IPERF_PORT}
frontend web
    bind {NODE_IP}:{HAPROXY_WEB}
    default_backend web
backend web
    server s1 {SERVER_IP}:{WEB_PORT}
"""


def iperf(lab: Lab, host: str, port: int, seconds: int, reverse: bool) -> float:
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J"] + (["-R"] if reverse else [])
    r = lab.run("node1/pod-1", argv, timeout=seconds + 30)
    data = json.loads(r.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3 to {host}:{port}: {data['error']}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def conn_rate(lab: Lab, url: str, seconds: int) -> float:
    argv = ["wrk", "-t1", "-c16", f"-d{seconds}s", "-H", "Connection: close", url]
    out = lab.run("node1/pod-1", argv, timeout=seconds + 30).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk gave no rate for {url}:\n{out}")
    errors = re.search(r"Socket errors: (.*)", out)
    if errors:
        print(f"   note: wrk {url}: socket errors {errors.group(1)}", file=sys.stderr)
    return float(m.group(1))


def measure(lab: Lab, label: str, iperf_addr: tuple[str, int], web_url: str, seconds: int) -> dict:
    print(f"== {label}", file=sys.stderr, flush=True)
    return {
        "path": label,
        "throughput_gbps": iperf(lab, *iperf_addr, seconds, reverse=False),
        "throughput_reverse_gbps": iperf(lab, *iperf_addr, seconds, reverse=True),
        "connections_per_s": conn_rate(lab, web_url, seconds),
    }


def stop_agent(lab: Lab) -> None:
    """Stop the agent and remove its capture: a stop alone leaves capture installed (fail
    closed), which would refuse the HAProxy measurement that follows."""
    for pid in mesh.agent_pids(lab, "node1"):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while mesh.agent_running(lab, "node1") and time.monotonic() < deadline:
        time.sleep(0.05)
    r = mesh.uninstall_agent(lab, "node1", "iptables")
    if r.returncode != 0:
        raise RuntimeError(f"uninstall failed: {r.stderr.strip()}")


def run(seconds: int) -> list[dict]:
    lab = Lab("bench")
    lab.down()  # leftovers of an interrupted run
    try:
        lab.up(1, 2, apps=False)
        run_dir = lab.names.run_dir
        Path(run_dir, "nginx.conf").write_text(nginx_config(run_dir, WEB_PORT))
        Path(run_dir, "haproxy.cfg").write_text(haproxy_config(run_dir))
        server = lab.target("node1/pod-2")
        lab.spawn(server, ["iperf3", "-s", "-p", str(IPERF_PORT)], "iperf3")
        lab.spawn(server, ["nginx", "-c", f"{run_dir}/nginx.conf"], "nginx")
        lab.spawn(lab.target("node1"), ["haproxy", "-f", f"{run_dir}/haproxy.cfg", "-db"], "haproxy")
        time.sleep(1.0)

        results = [measure(lab, "direct", (SERVER_IP, IPERF_PORT), f"http://{SERVER_IP}:{WEB_PORT}/", seconds)]

        workloads = mesh.lab_workloads(lab)
        server_wl = next(w for w in workloads if w.address == SERVER_IP)
        ep = lambda port: (Endpoint(SERVER_IP, port, server_wl.node, server_wl.name),)  # noqa: E731
        services = [Service("iperf", "default", IPERF_VIP, (ServicePort(IPERF_PORT, IPERF_PORT),), ep(IPERF_PORT)),
                    Service("web", "default", WEB_VIP, (ServicePort(80, WEB_PORT),), ep(WEB_PORT))]
        mesh.write_snapshots(lab, services, workloads)
        proc = mesh.spawn_agent(lab, "node1", "iptables", static=True)
        mesh.wait_ready(lab, "node1", proc)
        results.append(measure(lab, "hostmesh", (IPERF_VIP, IPERF_PORT), f"http://{WEB_VIP}/", seconds))
        stop_agent(lab)

        results.append(measure(lab, "haproxy", (NODE_IP, HAPROXY_IPERF), f"http://{NODE_IP}:{HAPROXY_WEB}/", seconds))
        return results
    finally:
        lab.down()


def render(results: list[dict]) -> str:
    by = {r["path"]: r for r in results}
    lines = ["| path | throughput Gbit/s (fwd / rev) | new conns/s | vs direct (tput / conns) | vs HAProxy (tput / conns) |",
             "|---|---|---|---|---|"]
    for r in results:
        d, h = by["direct"], by["haproxy"]
        ratio = lambda a, b: f"{a / b:.2f}x"  # noqa: E731
        lines.append(
            f"| {r['path']} | {r['throughput_gbps']:.2f} / {r['throughput_reverse_gbps']:.2f} | "
            f"{r['connections_per_s']:.0f} | {ratio(r['throughput_gbps'], d['throughput_gbps'])} / "
            f"{ratio(r['connections_per_s'], d['connections_per_s'])} | "
            f"{ratio(r['throughput_gbps'], h['throughput_gbps'])} / {ratio(r['connections_per_s'], h['connections_per_s'])} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=5, help="length of each measurement (1-60)")
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args()
    if not 1 <= args.seconds <= 60:
        p.error("--seconds must be 1-60")
    if os.geteuid() != 0:
        p.error("the benchmark builds a netns lab: run it as root")
    results = run(args.seconds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
