"""Recover a redirected connection's original destination (iptables REDIRECT / DNAT).

When netfilter NATs a connection to the proxy, conntrack remembers the address the client
asked for; ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` returns it as a ``sockaddr_in``
(``IP6T_SO_ORIGINAL_DST`` on ``SOL_IPV6`` for native IPv6). The eBPF backend answers the
same option with a cgroup/getsockopt program, so the proxy has one code path.

For a connection that was not NATed conntrack answers with the local address (or the
call fails): the proxy refuses such connections as loops.
"""

from __future__ import annotations

import socket
import struct

from nodeagent.errors import CaptureError

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
_SOCKADDR_IN_LEN = 16
_SOCKADDR_IN6_LEN = 28


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """Parse a raw ``sockaddr_in`` / ``sockaddr_in6`` as the kernel returns it."""
    if len(raw) < 8:
        raise ValueError(f"sockaddr too short ({len(raw)} bytes)")
    (family,) = struct.unpack_from("=H", raw, 0)  # host byte order
    (port,) = struct.unpack_from("!H", raw, 2)  # network byte order
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raise ValueError(f"unsupported address family {family} in sockaddr")


def so_original_dst(sock: socket.socket) -> tuple[str, int]:
    """SO_ORIGINAL_DST of an accepted TCP socket (uvloop's pseudo-sockets work too).

    IPv4 and IPv4-mapped connections on dual-stack sockets use SOL_IP; native IPv6 uses
    SOL_IPV6. Raises CaptureError when there is no answer.
    """
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise CaptureError(f"original destination: needs a TCP/IP socket, got family={sock.family!r} "
                           f"type={sock.type!r}")
    v6 = False
    if sock.family == socket.AF_INET6:
        try:
            v6 = not sock.getpeername()[0].startswith("::ffff:")
        except OSError as exc:
            raise CaptureError(f"original destination: socket is not connected ({exc})") from exc
    try:
        if v6:
            raw = sock.getsockopt(socket.SOL_IPV6, SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
    except OSError as exc:
        raise CaptureError(f"original destination: SO_ORIGINAL_DST failed ({exc.strerror or exc}); "
                           f"the connection has no conntrack entry (not redirected, or "
                           f"nf_conntrack unavailable)") from exc
    return parse_sockaddr(raw)
