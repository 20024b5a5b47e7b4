"""Traffic capture: make this node's pod traffic land on the agent's listeners.

    from nodeagent.capture import CaptureSpec, make_capture
    cap = make_capture("iptables", CaptureSpec(pod_cidrs=("198.18.1.0/24",),
                                               mesh_cidrs=("198.19.0.0/16", "198.18.0.0/15")))
    cap.install()            # idempotent reconcile
    cap.verify().ok          # installed == desired?
    cap.original_destination(accepted_socket)   # ("198.19.0.10", 80)
    cap.remove()             # no trace left

Backends live in their own modules behind `Capture` (base.py); `make_capture` picks one.
"""

from __future__ import annotations

from typing import Callable

from nodeagent.capture.base import Capture, CaptureSpec, CaptureStatus, so_original_dst
from nodeagent.errors import CaptureError


def _iptables(spec: CaptureSpec, netns: str | None) -> Capture:
    from nodeagent.capture.iptables import IptablesCapture

    return IptablesCapture(spec, netns=netns)


def _ebpf(spec: CaptureSpec, netns: str | None) -> Capture:
    from nodeagent.capture.ebpf import EbpfCapture

    return EbpfCapture(spec, netns=netns)


def _auto(spec: CaptureSpec, netns: str | None) -> Capture:
    """eBPF when this host can run it, else iptables; the reason is logged and in describe()."""
    from nodeagent.capture.ebpf_auto import AutoCapture

    return AutoCapture(spec, netns=netns)


# mode -> factory; a new backend registers here
BACKENDS: dict[str, Callable[[CaptureSpec, str | None], Capture]] = {
    "iptables": _iptables,
    "ebpf": _ebpf,
    "auto": _auto,
}


def make_capture(mode: str, spec: CaptureSpec, *, netns: str | None = None) -> Capture:
    """The capture backend for `mode`, bound to `spec`, acting in `netns` (None: this namespace)."""
    factory = BACKENDS.get(mode) if isinstance(mode, str) else None
    if factory is None:
        raise CaptureError(f"capture mode {mode!r} is not known; valid modes: {', '.join(BACKENDS)}")
    return factory(spec, netns)


def remove_other_backends(capture: Capture) -> list[str]:
    """Remove what the *other* backends left for this spec (capture.mode changed across a
    stop and start: the new backend is installed first, then the old one goes, so capture
    never lapses). Returns the backends removed; failures are logged, never raised."""
    import logging

    active = getattr(capture, "backend", capture.name)
    removed = []
    for name, factory in BACKENDS.items():
        if name in (active, "auto"):
            continue
        try:
            other = factory(capture.spec, capture.netns)
            if other.leftovers():
                other.remove()
                removed.append(name)
        except (CaptureError, OSError, ImportError) as exc:
            logging.getLogger("hostmesh.capture").warning(
                "cannot check or remove leftovers of another capture backend",
                extra={"backend": name, "error": str(exc)})
    return removed


__all__ = ["BACKENDS", "remove_other_backends", "Capture", "CaptureError", "CaptureSpec", "CaptureStatus", "make_capture",
           "so_original_dst"]
