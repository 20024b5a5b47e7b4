"""`--capture auto`: the eBPF backend when this host can run it, iptables otherwise.

The choice is made twice, cheaply then for real: at construction ``ebpf.probe()`` checks
the prerequisites (root, cgroup v2, /sys/fs/bpf, bcc, kernel headers, the capture
cgroups); at ``install()`` an eBPF install that still fails (the kernel refuses a program,
a header mismatch breaks the compile, ...) leaves nothing behind, and the iptables backend
is installed instead. Each fallback is logged with its reason and shown by ``describe()``
(-> GET /capture) as ``selected_by: auto`` and ``reason``.
"""

from __future__ import annotations

import logging
import socket

from nodeagent.capture.base import Capture, CaptureSpec, CaptureStatus
from nodeagent.errors import CaptureError

log = logging.getLogger("hostmesh.capture")


class AutoCapture(Capture):
    name = "auto"

    def __init__(self, spec: CaptureSpec, *, netns: str | None = None) -> None:
        super().__init__(spec, netns=netns)
        from nodeagent.capture import ebpf

        ok, why = ebpf.probe(spec)
        if ok:
            self.active: Capture = ebpf.EbpfCapture(spec, netns=netns)
            self.reason = why
        else:
            self._fall_back(f"eBPF unavailable: {why}")

    def _fall_back(self, reason: str) -> None:
        from nodeagent.capture.iptables import IptablesCapture

        log.warning("capture auto: using iptables (%s)", reason)
        self.active = IptablesCapture(self.spec, netns=self.netns)
        self.reason = reason

    @property
    def backend(self) -> str:
        return self.active.name

    def install(self) -> None:
        if self.active.name == "ebpf":
            try:
                self.active.install()
                log.info("capture auto: using eBPF (%s)", self.reason)
                return
            except CaptureError as exc:
                self._fall_back(f"eBPF install failed: {exc}")
        self.active.install()

    def verify(self) -> CaptureStatus:
        st = self.active.verify()
        self.last_status = st
        return st

    def remove(self) -> None:
        self.active.remove()

    def describe(self) -> dict:
        d = self.active.describe()
        d["selected_by"] = "auto"
        d["reason"] = self.reason
        return d

    def original_destination(self, sock: socket.socket) -> tuple[str, int]:
        return self.active.original_destination(sock)

    def register_metrics(self, registry) -> None:
        self.active.register_metrics(registry)
