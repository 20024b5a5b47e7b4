"""Control-plane push benchmark: 1000 Services x 10 endpoints to 100 and then 1000 agents.

    .venv/bin/python bench/controlplane.py                 # the default run (~2 min on 2 cores)
    .venv/bin/python bench/controlplane.py --agents 100 --rounds 3 --json

Loopback only, bounded (every wait has a deadline), stops by itself.

The control plane (SnapshotCache + DiscoveryServer, the real code) runs in this process.
Simulated agents are lightweight grpc.aio clients of the real protocol (Hello with what
they hold, apply changed/removed to a name -> version map, ACK), several hundred per
process in 2-4 client processes started with ``subprocess`` (each creates its gRPC
objects itself, nothing is forked after gRPC exists). Every agent has its own channel
and TCP connection.

World: 1000 Services x 10 endpoints, 10 000 Workloads spread over the simulated nodes.
Every node's snapshot holds every service and every workload (as the lab does today:
the worst case for snapshot size), built the way a builder should: the per-kind tuples
are shared by all nodes and only the changed Service object is new after a change.
Snapshot versions are passed explicitly (see the note printed at the end).

Measured per agent count:
  * initial sync: client processes started -> every agent ACKed its first snapshot
  * change -> all ACKs: one service's endpoints change; from the call to
    ``cache.set_snapshots`` (so indexing and diffing are included) to the last ACK;
    several rounds, min / median / max
  * bytes per push: delta (measured) vs a full snapshot (one change pushed with the
    server in state-of-the-world mode, ``delta=False``)
  * control-plane restart: a fresh cache + server on the same port, agents reconnect
    with the digest of what they hold; once with the config unchanged, once with one
    service changed while the control plane was down
  * control-plane CPU and RSS (this process: cache + server + the bench's world model)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOAL_SECONDS = 1.0


# ============================================================================ world model

class World:
    """The desired state and its per-node snapshots, built with shared tuples."""

    def __init__(self, n_services: int, n_endpoints: int, nodes: list[str]) -> None:
        from nodeagent.state import Endpoint, Service, ServicePort, Workload

        self.nodes = nodes
        self.n_endpoints = n_endpoints
        self._Endpoint, self._Service = Endpoint, Service
        wl = []
        self.services = []
        for i in range(n_services):
            eps = []
            for j in range(n_endpoints):
                n = i * n_endpoints + j
                addr = f"198.18.{n // 250}.{n % 250 + 1}"
                node = nodes[n % len(nodes)]
                name = f"svc{i:04d}-{j}"
                wl.append(Workload(name=name, namespace="default", node=node, address=addr,
                                   service_account=f"svc{i:04d}", labels=(("app", f"svc{i:04d}"),)))
                eps.append(Endpoint(address=addr, port=8080, node=node, workload=name, namespace="default"))
            self.services.append(Service(name=f"svc{i:04d}", namespace="default",
                                         cluster_ip=f"198.19.{i // 250}.{i % 250 + 1}",
                                         ports=(ServicePort(port=80, target_port=8080, name="http"),),
                                         endpoints=tuple(eps)))
        self.workloads = tuple(wl)
        self.generation = 0

    def change_one_service(self, round_no: int) -> None:
        """Scale one service's endpoints (drop the first, add a new one): a new Service object."""
        i = (round_no * 37) % len(self.services)
        svc = self.services[i]
        n = len(self.services) * self.n_endpoints + round_no
        new_ep = self._Endpoint(address=f"198.18.{200 + n // 250}.{n % 250 + 1}", port=8080,
                                node=self.nodes[round_no % len(self.nodes)], workload=f"extra-{round_no}",
                                namespace="default")
        self.services[i] = self._Service(name=svc.name, namespace=svc.namespace, cluster_ip=svc.cluster_ip,
                                         ports=svc.ports, endpoints=svc.endpoints[1:] + (new_ep,))
        self.generation += 1

    def snapshots(self) -> dict:
        from nodeagent.state import NodeSnapshot

        services = tuple(self.services)  # one tuple shared by every node
        token = hashlib.sha256(f"{self.generation}".encode()).hexdigest()
        return {node: NodeSnapshot(node=node, services=services, workloads=self.workloads,
                                   version=hashlib.sha256(f"{node}|{token}".encode()).hexdigest()[:16])
                for node in self.nodes}


def rss_mb() -> tuple[float, float]:
    cur = peak = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return cur, peak


# ============================================================================ simulated agents

async def client_main(address: str, nodes: list[str], deadline: float) -> None:
    """One client process: an agent per node, each on its own channel; stop on 'stop' on stdin."""
    import grpc

    from controlplane.api import STREAM_METHOD
    from controlplane.api import discovery_pb2 as pb
    from controlplane.resources import bucket_digests, bucket_of, resource_digest
    from nodeagent.cpclient import INLINE_VERSIONS_MAX, channel_options

    stats = {"updates": 0, "bytes": 0, "max_update_bytes": 0, "errors": 0, "parse_seconds": 0.0,
             "versions_requests": 0}

    def deserialize(raw: bytes):
        t = time.perf_counter()
        msg = pb.SnapshotUpdate.FromString(raw)
        stats["parse_seconds"] += time.perf_counter() - t
        stats["bytes"] += len(raw)
        stats["max_update_bytes"] = max(stats["max_update_bytes"], len(raw))
        return msg

    # A real agent computes its digests once on its own host (~20 ms at this size); here
    # hundreds of agents share a CPU and hold identical sets, so the bucket digests are
    # computed once per distinct set (keyed by the set's digest from the control plane).
    bucket_cache: dict[str, bytes] = {}

    async def agent(node: str) -> None:
        held: dict[str, str] = {}
        held_digest = ""  # the control plane's digest of `held` (from the last update)
        attempt = 0
        while True:
            channel = grpc.aio.insecure_channel(address, options=channel_options())
            try:
                call = channel.stream_stream(STREAM_METHOD, request_serializer=pb.AgentMessage.SerializeToString,
                                             response_deserializer=deserialize)()
                def hello(held: dict[str, str], held_digest: str, full: bool, buckets=()):  # as the real client
                    h = pb.Hello(node=node, agent_version="bench")
                    if held:
                        h.resource_digest = held_digest or resource_digest(held)
                        if full:
                            wanted = set(buckets)
                            h.resource_versions.update({n: v for n, v in held.items() if bucket_of(n) in wanted}
                                                       if wanted else held)
                        else:
                            if h.resource_digest not in bucket_cache:
                                bucket_cache[h.resource_digest] = bucket_digests(held)
                            h.bucket_digests = bucket_cache[h.resource_digest]
                    return pb.AgentMessage(hello=h)

                await call.write(hello(held, held_digest, len(held) <= INLINE_VERSIONS_MAX))
                while True:
                    u = await call.read()
                    if u is grpc.aio.EOF:
                        break
                    attempt = 0
                    if u.send_versions:
                        stats["versions_requests"] += 1
                        await call.write(hello(held, held_digest, True, u.version_buckets))
                        continue
                    held_digest = u.resource_digest
                    if u.full_state:
                        held = {}
                    for name in u.removed:
                        held.pop(name, None)
                    for r in u.changed:
                        held[r.name] = r.version
                    stats["updates"] += 1
                    await call.write(pb.AgentMessage(ack=pb.Ack(nonce=u.nonce, snapshot_version=u.snapshot_version)))
            except grpc.aio.AioRpcError:
                stats["errors"] += 1
            finally:
                await channel.close()
            # the real client's policy: exponential backoff with full jitter (capped low here)
            await asyncio.sleep(random.uniform(0, min(2.0, 0.2 * 2 ** attempt)))
            attempt += 1

    tasks = [asyncio.create_task(agent(n)) for n in nodes]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        await asyncio.wait_for(reader.readline(), max(1.0, deadline - time.time()))
    except TimeoutError:
        pass
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(stats), flush=True)


# ============================================================================ the benchmark

def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.port = 0
        self.rows: list[dict] = []
        self.cache = self.server = self.metrics = None

    async def start_control_plane(self, port: int = 0) -> None:
        """A fresh cache + server, as a (re)started control-plane process would have."""
        from prometheus_client import CollectorRegistry

        from controlplane.cache import SnapshotCache
        from controlplane.grpcserver import DiscoveryServer
        from controlplane.metrics import ControlPlaneMetrics

        self.metrics = ControlPlaneMetrics(CollectorRegistry())
        self.cache = SnapshotCache(metrics=self.metrics)
        self.server = DiscoveryServer(self.cache, self.metrics)
        self.port = await self.server.start(f"127.0.0.1:{port}")

    def counters(self) -> tuple[float, float]:
        return self.metrics.pushes._value.get(), self.metrics.push_bytes._value.get()

    async def publish_and_wait(self, world: World, timeout: float) -> dict:
        p0, b0 = self.counters()
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        snaps = world.snapshots()
        t_built = time.perf_counter()
        self.cache.set_snapshots(snaps)
        t_pub = time.perf_counter()
        ok = await self.cache.wait_for_acks({n: s.version for n, s in snaps.items()}, timeout)
        t1 = time.perf_counter()
        p1, b1 = self.counters()
        pushes = p1 - p0
        return {"ok": ok, "build_s": t_built - t0, "publish_s": t_pub - t_built, "acks_s": t1 - t_built,
                "cp_cpu_s": cpu_seconds() - c0,
                "pushes": pushes, "bytes_per_push": (b1 - b0) / pushes if pushes else 0.0,
                "missing": 0 if ok else len(self.cache.pending_acks({n: s.version for n, s in snaps.items()}))}

    async def scenario(self, n_agents: int) -> dict:
        args = self.args
        nodes = [f"node-{i:04d}" for i in range(n_agents)]
        t = time.perf_counter()
        world = World(args.services, args.endpoints, nodes)
        world_s = time.perf_counter() - t
        snaps = world.snapshots()
        t = time.perf_counter()
        self.cache.set_snapshots(snaps)
        first_publish_s = time.perf_counter() - t
        versions = {n: s.version for n, s in snaps.items()}
        procs_n = args.procs or max(2, min(4, math.ceil(n_agents / 350)))
        per = math.ceil(n_agents / procs_n)
        deadline = time.time() + args.client_deadline
        p0, b0 = self.counters()
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        procs = []
        for k in range(procs_n):
            chunk = nodes[k * per:(k + 1) * per]
            if not chunk:
                continue
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--client", f"127.0.0.1:{self.port}", "--deadline", str(deadline),
                 "--nodes", ",".join(chunk)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env={**os.environ, "GRPC_VERBOSITY": os.environ.get("GRPC_VERBOSITY", "ERROR")}))
        row: dict = {"agents": n_agents, "client_procs": len(procs), "world_build_s": world_s,
                     "first_publish_s": first_publish_s}
        try:
            ok = await self.cache.wait_for_acks(versions, args.sync_timeout)
            row["initial_sync_s"] = time.perf_counter() - t0
            row["initial_sync_cp_cpu_s"] = cpu_seconds() - c0
            row["initial_sync_ok"] = ok
            p1, b1 = self.counters()
            row["initial_bytes_per_agent"] = (b1 - b0) / max(1, p1 - p0)
            row["rss_after_sync_mb"], row["rss_peak_mb"] = rss_mb()
            if not ok:
                row["initial_missing"] = len(self.cache.pending_acks(versions))
                return row
            await asyncio.sleep(args.settle)
            rounds = []
            for r in range(args.rounds):
                world.change_one_service(r + 1 + 1000 * n_agents)
                rounds.append(await self.publish_and_wait(world, args.change_timeout))
                await asyncio.sleep(0.2)
            row["rounds"] = rounds
            times = [x["acks_s"] for x in rounds if x["ok"]]
            row["change_all_acks_s"] = {"min": min(times), "median": statistics.median(times),
                                        "max": max(times)} if times else None
            row["change_ok"] = all(x["ok"] for x in rounds)
            row["delta_bytes_per_push"] = statistics.median(x["bytes_per_push"] for x in rounds)
            row["change_cp_cpu_s"] = statistics.median(x["cp_cpu_s"] for x in rounds)
            if n_agents <= args.full_compare_max_agents:
                self.server.delta = False
                world.change_one_service(999_999 + n_agents)
                row["full_state_round"] = await self.publish_and_wait(world, args.sync_timeout)
                self.server.delta = True
                await asyncio.sleep(0.2)
            # control-plane restart: a new process rebuilds the snapshots; the agents reconnect
            # declaring the digest of what they hold. "same" = unchanged config (the new
            # control plane recognises the digest); "changed" = one service changed while it was
            # down (digest unknown: the agents upload their versions, then get a delta)
            if args.restart:
                row["rss_before_restarts_mb"], row["rss_peak_mb"] = rss_mb()  # peak of sync + pushes
                row["restart_resync"] = {}
                for label in ("same", "changed"):
                    await self.server.stop(0)
                    if label == "changed":
                        world.change_one_service(777_777 + n_agents)
                    await asyncio.sleep(0.5)
                    reset_peak_rss()
                    t_r = time.perf_counter()
                    c_r = cpu_seconds()
                    await self.start_control_plane(self.port)
                    snaps = world.snapshots()
                    self.cache.set_snapshots(snaps)
                    ok = await self.cache.wait_for_acks({n: s.version for n, s in snaps.items()},
                                                        args.sync_timeout)
                    pushes, nbytes = self.counters()
                    row["restart_resync"][label] = {
                        "ok": ok, "all_acks_s": time.perf_counter() - t_r, "cp_cpu_s": cpu_seconds() - c_r,
                        "bytes_per_push": nbytes / pushes if pushes else 0.0, "peak_rss_mb": rss_mb()[1]}
                    await asyncio.sleep(0.2)
            row["rss_end_mb"] = rss_mb()[0]
            row["index"] = self.cache.index_stats()
        finally:
            client_stats = []
            for p in procs:
                try:
                    p.stdin.write("stop\n")
                    p.stdin.flush()
                except BrokenPipeError:
                    pass
            for p in procs:
                try:
                    out, _ = await asyncio.to_thread(p.communicate, timeout=30)
                    client_stats.append(json.loads(out.strip().splitlines()[-1]))
                except Exception:
                    p.kill()
                    p.wait()
            row["client_stats"] = client_stats
            # wait until the server saw every stream go
            end = time.time() + 10
            while self.server.streams and time.time() < end:
                await asyncio.sleep(0.05)
        return row

    async def run(self) -> list[dict]:
        await self.start_control_plane()
        try:
            for n in self.args.agents:
                self.rows.append(await self.scenario(n))
        finally:
            await self.server.stop(1)
        return self.rows


def full_snapshot_bytes(n_services: int, n_endpoints: int, n_nodes: int) -> int:
    """Size of one agent's complete snapshot as a single update (encoded like the server does)."""
    from controlplane.resources import (
        Delta,
        ResourceIndex,
        encode_update,
    )

    world = World(n_services, n_endpoints, [f"node-{i:04d}" for i in range(n_nodes)])
    snap = next(iter(world.snapshots().values()))
    nr = ResourceIndex().index(snap, time.time())
    return len(encode_update("1.1", nr, Delta(len(nr), 0, (nr.full_body(),), True)))


def content_version_cost(n_services: int, n_endpoints: int) -> float:
    from nodeagent.state import NodeSnapshot, content_version

    world = World(n_services, n_endpoints, ["node-0000"])
    snap = NodeSnapshot(node="node-0000", services=tuple(world.services), workloads=world.workloads, version="x")
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        content_version(snap)
        best = min(best, time.perf_counter() - t)
    return best


def print_table(rows: list[dict], args, full_bytes: int, cv_cost: float) -> None:
    def ms(x):
        return f"{x * 1000:8.0f} ms" if x is not None else "       n/a"

    print()
    print(f"hostmesh control plane: {args.services} services x {args.endpoints} endpoints, "
          f"{args.services * args.endpoints} workloads, every node sees everything; loopback, "
          f"{os.cpu_count()} CPUs")
    print()
    hdr = (f"{'agents':>6} {'procs':>5} {'initial sync':>13} {'change->all ACKs (min/median/max)':>36} "
           f"{'goal':>5} {'delta B/push':>12} {'full B/push':>12} {'RSS MB':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        c = r.get("change_all_acks_s")
        span = f"{ms(c['min']).strip()} / {ms(c['median']).strip()} / {ms(c['max']).strip()}" if c else "n/a"
        goal = ("ok" if c and c["max"] <= GOAL_SECONDS and r.get("change_ok") else "MISS") if c else "n/a"
        print(f"{r['agents']:>6} {r['client_procs']:>5} {ms(r.get('initial_sync_s')):>13} {span:>36} {goal:>5} "
              f"{r.get('delta_bytes_per_push', 0):>12.0f} {full_bytes:>12} "
              f"{r.get('rss_end_mb', r.get('rss_after_sync_mb', 0)):>10.0f}")
    print()
    for r in rows:
        n = r["agents"]
        fr = r.get("full_state_round")
        if fr:
            print(f"{n:>5} agents, state-of-the-world push (server delta=False): one change -> all ACKs "
                  f"{fr['acks_s'] * 1000:.0f} ms{'' if fr['ok'] else ' (TIMED OUT)'}, "
                  f"{fr['bytes_per_push'] / 1e6:.2f} MB/push, {fr['bytes_per_push'] * n / 1e9:.2f} GB per change, "
                  f"CP CPU {fr['cp_cpu_s']:.1f} s")
        if r.get("rounds"):
            print(f"{n:>5} agents, delta push: CP CPU per change {r['change_cp_cpu_s'] * 1000:.0f} ms; "
                  f"set_snapshots ({n} nodes) median "
                  f"{statistics.median(x['publish_s'] for x in r['rounds']) * 1000:.1f} ms")
        if r.get("initial_sync_s") is not None:
            print(f"{n:>5} agents, initial sync: {r['initial_bytes_per_agent'] / 1e6:.2f} MB/agent, "
                  f"CP CPU {r['initial_sync_cp_cpu_s']:.1f} s (the rest is the simulated agents parsing "
                  f"{n * r['initial_bytes_per_agent'] / 1e9:.2f} GB on the same CPUs)")
        for label, rr in (r.get("restart_resync") or {}).items():
            what = "unchanged config" if label == "same" else "one service changed while it was down"
            print(f"{n:>5} agents, control plane restarted, {what}: all ACKs {rr['all_acks_s'] * 1000:.0f} ms "
                  f"(includes the agents' reconnect backoff){'' if rr['ok'] else ' (TIMED OUT)'}, "
                  f"{rr['bytes_per_push']:.0f} B/push, CP CPU {rr['cp_cpu_s']:.1f} s, peak RSS {rr['peak_rss_mb']:.0f} MB")
        if r.get("rss_peak_mb"):
            print(f"{n:>5} agents, control-plane peak RSS during the initial sync and the pushes "
                  f"{r['rss_peak_mb']:.0f} MB")
    print(f"note: NodeSnapshot's automatic content_version costs {cv_cost * 1000:.0f} ms per node at this size "
          f"({cv_cost * 1000:.0f} s for 1000 nodes); like controlplane/builder.py, the bench passes versions "
          f"computed once for the shared part of the snapshots.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=lambda s: [int(x) for x in s.split(",")], default=[100, 1000])
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--procs", type=int, default=0, help="client processes (default: 2-4 by agent count)")
    ap.add_argument("--sync-timeout", type=float, default=90.0)
    ap.add_argument("--change-timeout", type=float, default=10.0)
    ap.add_argument("--client-deadline", type=float, default=170.0,
                    help="client processes exit by themselves after this many seconds")
    ap.add_argument("--full-compare-max-agents", type=int, default=1000,
                    help="also time one state-of-the-world push at agent counts up to this")
    ap.add_argument("--settle", type=float, default=1.0, help="pause after the initial sync")
    ap.add_argument("--no-restart", dest="restart", action="store_false",
                    help="skip the control-plane restart / resync measurement")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    # client-process mode (internal)
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--nodes", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.client:
        asyncio.run(client_main(args.client, args.nodes.split(","), args.deadline))
        return 0

    t0 = time.perf_counter()
    rows = asyncio.run(Bench(args).run())
    full_bytes = full_snapshot_bytes(args.services, args.endpoints, max(args.agents))
    cv_cost = content_version_cost(args.services, args.endpoints)
    print_table(rows, args, full_bytes, cv_cost)
    print(f"total bench time {time.perf_counter() - t0:.0f} s")
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    ok = all(r.get("initial_sync_ok") and r.get("change_ok") for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
