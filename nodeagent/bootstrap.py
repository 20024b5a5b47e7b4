"""The agent's bootstrap configuration: a YAML file and/or flags, validated before anything starts.

Every problem is reported at once, each naming its field (``capture.mode: ...``), so a
malformed bootstrap never gets as far as installing capture rules.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from nodeagent.errors import ConfigError

CAPTURE_MODES = ("iptables", "ebpf", "auto", "none")
UNKNOWN_DESTINATION = ("passthrough", "refuse")
LOG_LEVELS = ("debug", "info", "warning", "error")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@dataclass(frozen=True)
class Bootstrap:
    node: str
    capture_mode: str = "iptables"
    pod_cidrs: tuple[str, ...] = ()
    mesh_cidrs: tuple[str, ...] = ()
    capture_cgroups: tuple[str, ...] = ()  # eBPF: cgroup v2 dirs captured outbound (pods, host units)
    redirect_address: str = ""  # eBPF: where pods reach the node's proxy (their gateway)
    capture_instance: str = ""  # eBPF: names the pins, /sys/fs/bpf/hostmesh/<instance>
    capture_accelerate: bool = False  # eBPF: sockops + sk_msg for same-node socket pairs (README: measured)
    admin_host: str = "127.0.0.1"
    admin_port: int = 15000
    # read-only health and metrics endpoint (probes, Prometheus), e.g. 0.0.0.0:15020; 0 = none
    health_host: str = ""
    health_port: int = 0
    outbound_port: int = 15001
    inbound_port: int = 15006
    socket_mark: int = 0x539
    unknown_destination: str = "passthrough"
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    max_connections: int = 10000
    drain_grace: float = 10.0
    snapshot_file: str = ""
    # host:port of each control-plane replica's gRPC endpoint; the agent fails over in order
    control_plane: tuple[str, ...] = ()
    # TLS + node token toward the control plane (required unless insecure: tests only)
    cp_token_file: str = ""
    cp_root_bundle: str = ""
    cp_server_name: str = ""
    cp_insecure: bool = False
    cert_dir: str = ""  # workload keys and certificates (tmpfs); default /run/hostmesh/<node>/certs
    state_dir: str = "/var/lib/hostmesh"
    log_level: str = "info"
    # RequestAuthentication jwksUri fetches: extra CA certificates (PEM) trusted besides the
    # system's (a private identity provider); "" = the system's only
    jwks_ca_file: str = ""
    jwks_refresh_interval: float = 20 * 60.0  # how often jwksUri keys are fetched again (istiod: 20 min)
    # an agent started while another runs on this state directory takes its listeners over
    # (handoff.py); off: it refuses to start, as before
    handoff_enabled: bool = True
    handoff_timeout: float = 60.0  # how long a successor may take to ready its config before giving up
    # proxy worker processes on the shared listening sockets (workers.py); 1: the proxy runs
    # inside the agent process
    workers: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "capture": {"mode": self.capture_mode, "podCIDRs": list(self.pod_cidrs), "meshCIDRs": list(self.mesh_cidrs),
                        "cgroups": list(self.capture_cgroups), "redirectAddress": self.redirect_address,
                        "instance": self.capture_instance, "accelerate": self.capture_accelerate},
            "admin": {"address": f"{self.admin_host}:{self.admin_port}",
                      **({"healthAddress": f"{self.health_host}:{self.health_port}"} if self.health_port else {})},
            "proxy": {
                "outboundPort": self.outbound_port, "inboundPort": self.inbound_port,
                "socketMark": self.socket_mark, "unknownDestination": self.unknown_destination,
                "connectTimeout": self.connect_timeout, "idleTimeout": self.idle_timeout,
                "maxConnections": self.max_connections,
            },
            "drainGrace": self.drain_grace,
            "snapshotFile": self.snapshot_file,
            "controlPlane": list(self.control_plane),
            "controlPlaneAuth": {"tokenFile": self.cp_token_file, "rootBundle": self.cp_root_bundle,
                                 "serverName": self.cp_server_name, "insecure": self.cp_insecure},
            "certDir": self.cert_dir,
            "stateDir": self.state_dir,
            "logLevel": self.log_level,
            "jwks": {"caFile": self.jwks_ca_file, "refreshInterval": self.jwks_refresh_interval},
            "handoff": {"enabled": self.handoff_enabled, "timeout": self.handoff_timeout},
            "workers": self.workers,
        }


# the file's shape: a key maps to its kind, or to a nested section
_SCHEMA: dict[str, Any] = {
    "node": str, "snapshotFile": str, "controlPlane": "endpoints", "stateDir": str, "logLevel": str, "drainGrace": "duration",
    "capture": {"mode": str, "podCIDRs": "cidrs", "meshCIDRs": "cidrs", "cgroups": "strings",
                "redirectAddress": "ipv4", "instance": "instance", "accelerate": "bool"},
    "admin": {"address": "hostport", "healthAddress": "hostport"},
    "controlPlaneAuth": {"tokenFile": str, "rootBundle": str, "serverName": str, "insecure": "bool"},
    "certDir": "abspath",
    "jwks": {"caFile": "abspath", "refreshInterval": "duration"},
    "handoff": {"enabled": "bool", "timeout": "duration"},
    "workers": "workers",
    "proxy": {"outboundPort": "port", "inboundPort": "port", "socketMark": "mark",
              "unknownDestination": str, "connectTimeout": "duration", "idleTimeout": "duration",
              "maxConnections": "count"},
}


MAX_WORKERS = 64
AUTO_WORKERS_CAP = 8  # "auto": one per usable core, at most this many


def resolve_workers(value: Any) -> int:
    """``auto`` -> the cores this process may run on (its CPU affinity), capped."""
    if value != "auto":
        return int(value)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, AUTO_WORKERS_CAP))


def parse_duration(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ConfigError(f"{where}: {value!r} is not a duration (use e.g. 250ms, 5s, 10m, 1h)")
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if seconds <= 0:
        raise ConfigError(f"{where}: must be greater than zero, got {value!r}")
    return seconds


def _check(kind: Any, value: Any, where: str) -> Any:
    if kind is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: must be a non-empty string")
        return value
    if kind == "duration":
        return parse_duration(value, where)
    if kind == "workers":
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
            raise ConfigError(f"{where}: must be auto or a number of worker processes (1-{MAX_WORKERS}), "
                              f"got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {value!r}")
        return value
    if kind == "abspath":
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(f"{where}: must be an absolute path, got {value!r}")
        return value
    if kind in ("port", "count", "mark"):
        if isinstance(value, str) and kind == "mark":
            try:
                value = int(value, 0)
            except ValueError:
                raise ConfigError(f"{where}: {value!r} is not a number") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, got {value!r}")
        lo, hi = {"port": (1, 65535), "count": (1, 1_000_000), "mark": (1, 0xFFFFFFFF)}[kind]
        if not lo <= value <= hi:
            raise ConfigError(f"{where}: {value} is out of range {lo}-{hi}")
        return value
    if kind == "cidrs":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be a list of CIDRs")
        out = []
        for i, c in enumerate(value):
            try:
                out.append(str(ipaddress.IPv4Network(str(c), strict=True)))
            except ValueError as exc:
                raise ConfigError(f"{where}[{i}]: {c!r} is not an IPv4 CIDR ({exc})") from None
        return tuple(out)
    if kind == "strings":
        if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
            raise ConfigError(f"{where}: must be a list of non-empty strings")
        return tuple(value)
    if kind == "ipv4":
        try:
            return str(ipaddress.IPv4Address(str(value)))
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not an IPv4 address") from None
    if kind == "instance":
        if not isinstance(value, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", value):
            raise ConfigError(f"{where}: {value!r} must be 1-64 letters, digits, '.', '_' or '-'")
        return value
    if kind == "endpoints":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not items:
            raise ConfigError(f"{where}: must be host:port, or a list of them (one per control-plane replica)")
        out = tuple(_check("endpoint", str(x).strip(), f"{where}[{i}]" if len(items) > 1 else where)
                    for i, x in enumerate(items))
        if len(set(out)) != len(out):
            raise ConfigError(f"{where}: lists an endpoint twice")
        return out
    if kind == "endpoint":
        host, sep, port = str(value).rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{where}: {value!r} is not a host:port address")
        return f"{host}:{int(port)}"
    if kind == "hostport":
        host, sep, port = str(value).rpartition(":")
        try:
            ipaddress.IPv4Address(host)
            p = int(port)
            if not sep or not 1 <= p <= 65535:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not an IPv4 address:port") from None
        return host, p
    raise AssertionError(kind)


def _flatten(doc: dict, schema: dict, prefix: str, errors: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        where = f"{prefix}{key}"
        if key not in schema:
            errors.append(f"{where}: unknown field (known: {', '.join(sorted(schema))})")
            continue
        kind = schema[key]
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                errors.append(f"{where}: must be a mapping")
                continue
            out.update(_flatten(value, kind, f"{where}.", errors))
            continue
        try:
            out[where] = _check(kind, value, where)
        except ConfigError as exc:
            errors.append(str(exc))
    return out


def load_file(path: str) -> dict[str, Any]:
    """Read a bootstrap YAML file into flat `section.key` -> value, all errors at once."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read bootstrap file: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the bootstrap file must be a mapping, got {type(doc).__name__}")
    errors: list[str] = []
    flat = _flatten(doc, _SCHEMA, "", errors)
    if errors:
        raise ConfigError("\n".join(f"{path}: {e}" for e in errors))
    return flat


def build(file_values: dict[str, Any], overrides: dict[str, Any]) -> Bootstrap:
    """Merge file values with flag overrides (flags win) and validate the whole."""
    v = {**file_values, **{k: val for k, val in overrides.items() if val is not None}}
    errors: list[str] = []
    node = v.get("node")
    if not node:
        errors.append("node: is required (--node NAME or 'node:' in the bootstrap file)")
    mode = v.get("capture.mode", "iptables")
    if mode not in CAPTURE_MODES:
        errors.append(f"capture.mode: {mode!r} is not a capture mode (valid: {', '.join(CAPTURE_MODES)})")
    unknown = v.get("proxy.unknownDestination", "passthrough")
    if unknown not in UNKNOWN_DESTINATION:
        errors.append(f"proxy.unknownDestination: {unknown!r} is not valid (valid: {', '.join(UNKNOWN_DESTINATION)})")
    level = v.get("logLevel", "info")
    if level not in LOG_LEVELS:
        errors.append(f"logLevel: {level!r} is not valid (valid: {', '.join(LOG_LEVELS)})")
    pods, mesh = v.get("capture.podCIDRs", ()), v.get("capture.meshCIDRs", ())
    if mode != "none" and (not pods or not mesh):
        errors.append("capture: podCIDRs and meshCIDRs are required when capture is on "
                      "(which pods are local, and which destinations belong to the mesh)")
    if v.get("capture.accelerate") and mode not in ("ebpf", "auto"):
        errors.append(f"capture.accelerate: only the eBPF backend accelerates (capture.mode is {mode!r}; "
                      f"use ebpf or auto)")
    ports = {k: v.get(k) for k in ("proxy.outboundPort", "proxy.inboundPort") if v.get(k)}
    admin = v.get("admin.address", ("127.0.0.1", 15000))
    ports["admin.address"] = admin[1]
    health = v.get("admin.healthAddress")
    if health:
        ports["admin.healthAddress"] = health[1]
    ports.setdefault("proxy.outboundPort", 15001)
    ports.setdefault("proxy.inboundPort", 15006)
    if len(set(ports.values())) != len(ports):
        errors.append(f"ports must differ: {', '.join(f'{k}={p}' for k, p in ports.items())}")
    if not v.get("snapshotFile") and not v.get("controlPlane"):
        errors.append("controlPlane: is required (--control-plane HOST:PORT), unless a static snapshotFile is given")
    errors += _check_cp_auth(v)
    if errors:
        raise ConfigError("\n".join(errors))
    b = Bootstrap(node=node)
    return replace(
        b, capture_mode=mode, pod_cidrs=tuple(pods), mesh_cidrs=tuple(mesh),
        capture_cgroups=v.get("capture.cgroups", ()), redirect_address=v.get("capture.redirectAddress", ""),
        capture_instance=v.get("capture.instance", ""),
        capture_accelerate=v.get("capture.accelerate", b.capture_accelerate),
        admin_host=admin[0], admin_port=admin[1],
        health_host=health[0] if health else "", health_port=health[1] if health else 0,
        outbound_port=ports["proxy.outboundPort"], inbound_port=ports["proxy.inboundPort"],
        socket_mark=v.get("proxy.socketMark", b.socket_mark), unknown_destination=unknown,
        connect_timeout=v.get("proxy.connectTimeout", b.connect_timeout),
        idle_timeout=v.get("proxy.idleTimeout", b.idle_timeout),
        max_connections=v.get("proxy.maxConnections", b.max_connections),
        drain_grace=v.get("drainGrace", b.drain_grace), snapshot_file=v.get("snapshotFile", ""),
        control_plane=v.get("controlPlane", ()),
        cp_token_file=v.get("controlPlaneAuth.tokenFile", ""), cp_root_bundle=v.get("controlPlaneAuth.rootBundle", ""),
        cp_server_name=v.get("controlPlaneAuth.serverName", ""),
        cp_insecure=v.get("controlPlaneAuth.insecure", False),
        cert_dir=v.get("certDir") or f"/run/hostmesh/{node}/certs",
        state_dir=v.get("stateDir", b.state_dir), log_level=level,
        jwks_ca_file=v.get("jwks.caFile", ""),
        jwks_refresh_interval=v.get("jwks.refreshInterval", b.jwks_refresh_interval),
        handoff_enabled=v.get("handoff.enabled", b.handoff_enabled),
        handoff_timeout=v.get("handoff.timeout", b.handoff_timeout),
        workers=resolve_workers(v.get("workers", "auto")),
    )


def _check_cp_auth(v: dict[str, Any]) -> list[str]:
    """A control plane is reached over TLS with a node token, unless explicitly insecure."""
    if not v.get("controlPlane") or v.get("snapshotFile"):
        return []
    token, bundle = v.get("controlPlaneAuth.tokenFile"), v.get("controlPlaneAuth.rootBundle")
    if v.get("controlPlaneAuth.insecure"):
        if token:
            return ["controlPlaneAuth.tokenFile: not allowed with insecure: true (the token would travel in "
                    "plaintext)"]
        return []
    errors = []
    if not token:
        errors.append("controlPlaneAuth.tokenFile: is required (--token-file): the node's bootstrap token "
                      "(or controlPlaneAuth.insecure: true, for tests only)")
    if not bundle:
        errors.append("controlPlaneAuth.rootBundle: is required (--root-bundle): the mesh root certificate(s) "
                      "the control plane's TLS certificate must chain to")
    return errors


def parse_host_port(value: str, where: str) -> tuple[str, int]:
    """'0.0.0.0:15014' -> ('0.0.0.0', 15014); a clear ConfigError otherwise."""
    return _check("hostport", value, where)


def flag_overrides(args: Any) -> dict[str, Any]:
    """Turn the CLI's parsed `hostmesh agent` flags into checked `section.key` values."""
    raw = {
        "node": args.node, "capture.mode": args.capture, "snapshotFile": args.snapshot,
        "proxy.unknownDestination": args.unknown_destination, "logLevel": args.agent_log_level,
        "stateDir": args.state_dir, "capture.accelerate": getattr(args, "accelerate", None),
        "controlPlaneAuth.tokenFile": getattr(args, "token_file", None),
        "controlPlaneAuth.rootBundle": getattr(args, "root_bundle", None),
        "controlPlaneAuth.insecure": True if getattr(args, "insecure_control_plane", False) else None,
    }
    checked: dict[str, Any] = {k: v for k, v in raw.items() if v is not None}
    errors: list[str] = []
    for key, kind, value, flag in (
        ("capture.podCIDRs", "cidrs", args.pod_cidr, "--pod-cidr"),
        ("capture.meshCIDRs", "cidrs", args.mesh_cidr, "--mesh-cidr"),
        ("admin.address", "hostport", args.admin_address, "--admin-address"),
        ("controlPlane", "endpoints", args.control_plane, "--control-plane"),
        ("drainGrace", "duration", args.drain_grace, "--drain-grace"),
    ):
        if value:
            try:
                checked[key] = _check(kind, value, flag)
            except ConfigError as exc:
                errors.append(str(exc))
    if errors:
        raise ConfigError("\n".join(errors))
    return checked
