"""A highly available control plane in a lab: a real etcd and N control-plane replicas in the
lab's control-plane namespace, each on its own fabric address (198.18.0.2, .4, .5, ...).

etcd listens on that namespace's loopback only (no node can reach it; agents talk to the
replicas). The config directory is written to etcd with `hostmesh config apply`, the same
command an operator runs. Agents get every replica's address (``lab.control_plane_endpoints``)
and fail over between them. Everything runs in the lab's namespaces and cgroups, so
`lab down` removes it like the rest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from meshlab import mesh, naming
from meshlab.errors import LabError
from meshlab.etcdserver import EtcdServer
from meshlab.lab import CONTROLPLANE, Lab

ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
READY_TIMEOUT = 30.0


def replica_ip(i: int) -> str:
    """Replica 0 is the lab's usual control-plane address; 198.18.0.3 is left to the tests'
    non-mesh host, so the others are 198.18.0.4 and up."""
    return naming.CONTROLPLANE_IP if i == 0 else f"198.18.0.{3 + i}"


class HAControlPlane:
    def __init__(self, lab: Lab, replicas: int = 2, lease_ttl: int = 3) -> None:
        if not 1 <= replicas <= 5:
            raise LabError("1 to 5 control-plane replicas")
        self.lab = lab
        self.replicas = replicas
        self.lease_ttl = lease_ttl
        self.etcd = EtcdServer(Path(lab.names.run_dir, "etcd"), client_port=ETCD_CLIENT_PORT,
                               peer_port=ETCD_PEER_PORT, netns=lab.names.controlplane_ns)
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def endpoints(self) -> list[str]:
        return [f"{replica_ip(i)}:15010" for i in range(self.replicas)]

    def start(self) -> None:
        ns = self.lab.names.controlplane_ns
        for i in range(1, self.replicas):
            subprocess.run(["ip", "-n", ns, "addr", "replace", f"{replica_ip(i)}/24", "dev", "eth0"], check=True)
        mesh.write_pki(self.lab)
        self.lab.spawn(self.lab.target(CONTROLPLANE), self.etcd.server_argv(), "etcd")
        self._wait(lambda: self._run(["curl", "-sf", "--max-time", "1", f"http://{self.etcd.endpoint}/health"]),
                   "etcd")
        self.apply(mesh.cp_config_dir(self.lab))
        for i in range(self.replicas):
            self.start_replica(i)
        self.lab.control_plane_endpoints = self.endpoints
        self.lab.control_plane_ips = [replica_ip(i) for i in range(self.replicas)]

    def apply(self, directory: Path) -> str:
        r = self._run([sys.executable, "-m", "hostmesh.cli", "config", "apply", "-f", str(directory),
                       "--etcd", self.etcd.endpoint, "--prune"])
        if r.returncode != 0:
            raise LabError(f"config apply failed: {r.stderr.strip()}")
        return r.stdout

    def start_replica(self, i: int) -> None:
        ip = replica_ip(i)
        argv = [sys.executable, "-m", "hostmesh.cli", "controlplane", "--etcd", self.etcd.endpoint,
                "--replica", f"cp{i}", "--leader-ttl", str(self.lease_ttl),
                "--grpc-address", f"{ip}:15010", "--http-address", f"{ip}:15014",
                "--ca-dir", str(mesh.pki_dir(self.lab) / "ca"), "--node-tokens", str(mesh.pki_dir(self.lab) / "tokens"),
                *[a for j in range(self.replicas) for a in ("--tls-san", replica_ip(j))]]
        self.procs[i] = self.lab.spawn(self.lab.target(CONTROLPLANE), argv, f"controlplane-{i}")
        self._wait(lambda: self._get(i, "/ready").returncode == 0, f"control-plane replica {i}",
                   proc=self.procs[i])

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(i)
        os.killpg(proc.pid, sig)
        proc.wait(10)

    def view(self, i: int) -> dict | None:
        r = self._get(i, "/debug/config")
        return json.loads(r.stdout) if r.returncode == 0 else None

    def leader(self) -> int | None:
        """The replica that says it leads (exactly one, or None)."""
        leading = [i for i in self.procs if (v := self.view(i)) and v["election"]["leading"]]
        return leading[0] if len(leading) == 1 else None

    def _get(self, i: int, path: str) -> subprocess.CompletedProcess:
        return self._run(["curl", "-sS", "--fail-with-body", "--max-time", "3", f"http://{replica_ip(i)}:15014{path}"])

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess:
        return self.lab.run(CONTROLPLANE, argv, timeout=60)

    def _wait(self, check, what: str, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc is not None and proc.poll() is not None:
                raise LabError(f"{what} exited with {proc.returncode}; see {self.lab.names.run_dir}/logs")
            result = check()
            if result is True or getattr(result, "returncode", 1) == 0:
                return
            if time.monotonic() > deadline:
                raise LabError(f"{what} was not ready within {READY_TIMEOUT:g}s")
            time.sleep(0.1)
