"""A real etcd server (Debian's etcd-server) for tests and the lab: one member, its own data
directory, client and peer ports picked free on 127.0.0.1 (or given), optionally inside a
network namespace. Started and stopped by whoever needs it; never left running."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from meshlab.errors import LabError

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
READY_TIMEOUT = 20.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EtcdServer:
    def __init__(self, data_dir: str | Path, *, host: str = "127.0.0.1", client_port: int = 0, peer_port: int = 0,
                 netns: str | None = None, log_path: str | Path | None = None, tls=None) -> None:
        """`tls`: a controlplane.etcd.EtcdTLS whose ca/cert/key are the server's (clients must
        present a certificate from the same CA)."""
        self.data_dir = Path(data_dir)
        self.host = host
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.netns = netns
        self.log_path = Path(log_path) if log_path else self.data_dir.with_suffix(".log")
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def argv(self) -> list[str]:
        """The command line, inside `netns` when one is given."""
        argv = self.server_argv()
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def server_argv(self) -> list[str]:
        scheme = "https" if self.tls else "http"
        client, peer = f"{scheme}://{self.endpoint}", f"http://{self.host}:{self.peer_port}"
        argv = [ETCD, "--name", "hostmesh-test", "--data-dir", str(self.data_dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"hostmesh-test={peer}", "--log-level", "warn",
                # no background snapshots to slow the tests; auto-compaction off: tests compact
                "--snapshot-count", "100000"]
        if self.tls:
            argv += ["--cert-file", self.tls.cert_file, "--key-file", self.tls.key_file,
                     "--trusted-ca-file", self.tls.ca_file, "--client-cert-auth"]
        return argv

    def start(self, client_tls=None) -> EtcdServer:
        if not os.path.exists(ETCD):
            raise LabError("etcd is not installed (Debian package etcd-server; ./quickstart installs it)")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        self.wait_ready(client_tls=client_tls or self.tls)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT, client_tls=None) -> None:
        import asyncio

        from controlplane.etcd import EtcdClient, EtcdError

        async def probe() -> bool:
            client = EtcdClient([self.endpoint], timeout=1.0, tls=client_tls)
            try:
                await client.get("/")
                return True
            except EtcdError:
                return False
            finally:
                await client.close()

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LabError(f"etcd exited with {self.proc.returncode}; see {self.log_path}")
            if self.netns is None and asyncio.run(probe()):
                return
            if self.netns is not None and self._probe_in_netns():
                return
            if time.monotonic() > deadline:
                raise LabError(f"etcd was not ready within {timeout:g}s; see {self.log_path}")
            time.sleep(0.1)

    def _probe_in_netns(self) -> bool:
        r = subprocess.run(["ip", "netns", "exec", self.netns, "curl", "-sf", "--max-time", "1",
                            f"http://{self.endpoint}/health"], capture_output=True, timeout=5)
        return r.returncode == 0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()
