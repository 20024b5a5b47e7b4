"""Steady mixed traffic for restart and upgrade tests, run inside a lab pod:

    python -m meshlab.restartload --http HOST:PORT --tcp HOST:PORT --grpc HOST:PORT \
        --stop-file PATH [--max-seconds 300] [--rate 20] [--stream-seconds 2]

Four clients run side by side until the stop file appears (or max-seconds pass):
HTTP/1.1 keep-alive (one connection, reused as curl and urllib3 reuse one: a connection
the server closed while idle is replaced before the next request, never retried after
sending), a new connection per request, back-to-back TCP echo streams (a block every
50 ms, echoed and compared), and back-to-back gRPC bidi streams (Echo.Bidi). Nothing is
retried. One JSON object is printed: per client, how many requests (or streams)
succeeded, how many failed, and the first errors.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import socket
import sys
import threading
import time


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def good(self) -> None:
        with self._lock:
            self.ok += 1

    def bad(self, what: str) -> None:
        with self._lock:
            self.failed += 1
            if len(self.errors) < 10:
                self.errors.append(f"{time.strftime('%H:%M:%S')} {what}")

    def to_dict(self) -> dict:
        return {"ok": self.ok, "failed": self.failed, "errors": self.errors}


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Did the server close this idle connection? (urllib3's is_connection_dropped)"""
    sock = conn.sock
    if sock is None:
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)  # an idle HTTP/1.1 connection is readable only at EOF (or garbage)


def _check(resp: http.client.HTTPResponse) -> str:
    body = resp.read()
    if resp.status != 200:
        return f"status {resp.status}: {body[:120]!r}"
    return ""


def keepalive(addr, rate: float, stop: threading.Event, tally: Tally) -> None:
    conn = None
    while not stop.wait(1 / rate):
        try:
            if conn is None or _dropped(conn):
                if conn is not None:
                    conn.close()
                conn = http.client.HTTPConnection(*addr, timeout=10)
            conn.request("GET", "/?client=keepalive")
            resp = conn.getresponse()
            why = _check(resp)
            if resp.will_close:
                conn.close()
                conn = None
            tally.bad(why) if why else tally.good()
        except (OSError, http.client.HTTPException) as exc:
            tally.bad(f"keep-alive: {type(exc).__name__}: {exc}")
            if conn is not None:
                conn.close()
            conn = None


def fresh(addr, rate: float, stop: threading.Event, tally: Tally) -> None:
    while not stop.wait(1 / rate):
        conn = http.client.HTTPConnection(*addr, timeout=10)
        try:
            conn.request("GET", "/?client=fresh", headers={"Connection": "close"})
            why = _check(conn.getresponse())
            tally.bad(why) if why else tally.good()
        except (OSError, http.client.HTTPException) as exc:
            tally.bad(f"new connection: {type(exc).__name__}: {exc}")
        finally:
            conn.close()


def tcp_streams(addr, seconds: float, stop: threading.Event, tally: Tally) -> None:
    while not stop.is_set():
        try:
            with socket.create_connection(addr, timeout=10) as s:
                end = time.monotonic() + seconds
                n = 0
                while time.monotonic() < end:
                    block = os.urandom(512) + n.to_bytes(8, "big")
                    s.sendall(block)
                    got = b""
                    while len(got) < len(block):
                        chunk = s.recv(len(block) - len(got))
                        if not chunk:
                            raise ConnectionError(f"closed after {n} echoes")
                        got += chunk
                    if got != block:
                        raise ValueError(f"echo {n} differs")
                    n += 1
                    time.sleep(0.05)
                s.shutdown(socket.SHUT_WR)
                if s.recv(1):
                    raise ValueError("data after our EOF")
            tally.good()
        except (OSError, ValueError) as exc:
            tally.bad(f"tcp stream: {type(exc).__name__}: {exc}")


def grpc_streams(target: str, seconds: float, stop: threading.Event, tally: Tally) -> None:
    import grpc

    from meshlab.testapp import echo_pb2, echo_pb2_grpc

    def messages(count: list[int]):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            count[0] += 1
            yield echo_pb2.EchoRequest(message=f"m{count[0]}")
            time.sleep(0.05)

    with grpc.insecure_channel(target) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        while not stop.is_set():
            sent = [0]
            try:
                replies = [r.message for r in stub.Bidi(messages(sent), timeout=seconds + 10)]
                if replies != [f"m{i}" for i in range(1, sent[0] + 1)]:
                    raise ValueError(f"sent {sent[0]}, got {len(replies)} replies")
                tally.good()
            except grpc.RpcError as exc:
                tally.bad(f"grpc stream: {exc.code().name}: {exc.details()}")
            except ValueError as exc:
                tally.bad(f"grpc stream: {exc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m meshlab.restartload")
    ap.add_argument("--http", required=True, help="HOST:PORT of an HTTP/1.1 server")
    ap.add_argument("--tcp", required=True, help="HOST:PORT of a TCP echo server")
    ap.add_argument("--grpc", required=True, help="HOST:PORT of the test app's gRPC port")
    ap.add_argument("--stop-file", required=True)
    ap.add_argument("--ready-file", help="written once every client made its first success")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--rate", type=float, default=20.0, help="requests/s of each HTTP client")
    ap.add_argument("--stream-seconds", type=float, default=2.0)
    a = ap.parse_args(argv)
    stop = threading.Event()
    tallies = {k: Tally() for k in ("keepalive", "fresh", "tcp", "grpc")}
    http_addr = _addr(a.http)
    threads = [
        threading.Thread(target=keepalive, args=(http_addr, a.rate, stop, tallies["keepalive"])),
        threading.Thread(target=fresh, args=(http_addr, a.rate, stop, tallies["fresh"])),
        threading.Thread(target=tcp_streams, args=(_addr(a.tcp), a.stream_seconds, stop, tallies["tcp"])),
        threading.Thread(target=grpc_streams, args=(a.grpc, a.stream_seconds, stop, tallies["grpc"])),
    ]
    for t in threads:
        t.daemon = True
        t.start()
    deadline = time.monotonic() + a.max_seconds
    ready = False
    while not os.path.exists(a.stop_file) and time.monotonic() < deadline:
        if not ready and a.ready_file and all(t.ok for t in tallies.values()):
            with open(a.ready_file, "w") as f:
                f.write("ready\n")
            ready = True
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(timeout=a.stream_seconds + 15)
    print(json.dumps({k: t.to_dict() for k, t in tallies.items()}))
    return 0 if all(t.failed == 0 for t in tallies.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
