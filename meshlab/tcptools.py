"""Raw-TCP tools the tests and benchmarks run inside lab pods.

    python -m meshlab.tcptools serve --port 7000                 # echo server
    python -m meshlab.tcptools serve --port 7001 --reply-after-eof   # reads to EOF, then answers its sha256
    python -m meshlab.tcptools stream HOST:PORT --bytes N        # send N bytes, read the echo, compare
    python -m meshlab.tcptools halfclose HOST:PORT --bytes N     # send, shut down writing, read the answer
    python -m meshlab.tcptools concurrent HOST:PORT --connections 500

Clients print one JSON object; exit status 0 means the check held.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import sys
import threading

BLOCK = os.urandom(1 << 20)  # 1 MiB of random bytes, repeated: cheap to generate, not compressible


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _serve(port: int, reply_after_eof: bool, ready_file: str | None) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def digest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        h, n = hashlib.sha256(), 0
        try:
            while data := await reader.read(1 << 16):
                h.update(data)
                n += len(data)
            writer.write(f"{n} {h.hexdigest()}\n".encode())
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(digest if reply_after_eof else echo, "0.0.0.0", port, backlog=4096)
    if ready_file:
        open(ready_file, "w").close()
    async with server:
        await server.serve_forever()


def stream(addr: tuple[str, int], total: int) -> dict:
    """Send `total` bytes and read the echo concurrently; compare sha256 both ways."""
    sock = socket.create_connection(addr, timeout=60)
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    received = 0

    def sender() -> None:
        left = total
        while left:
            chunk = BLOCK if left >= len(BLOCK) else BLOCK[:left]
            sock.sendall(chunk)
            sent_hash.update(chunk)
            left -= len(chunk)
        sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=sender)
    t.start()
    while data := sock.recv(1 << 20):
        recv_hash.update(data)
        received += len(data)
    t.join()
    sock.close()
    return {"sent": total, "received": received, "sent_sha256": sent_hash.hexdigest(),
            "received_sha256": recv_hash.hexdigest(), "ok": received == total and
            sent_hash.hexdigest() == recv_hash.hexdigest()}


def halfclose(addr: tuple[str, int], total: int) -> dict:
    """Send, shut down our write side, and still read the whole answer the server sends after EOF."""
    sock = socket.create_connection(addr, timeout=30)
    h = hashlib.sha256()
    left = total
    while left:
        chunk = BLOCK[:min(left, len(BLOCK))]
        sock.sendall(chunk)
        h.update(chunk)
        left -= len(chunk)
    sock.shutdown(socket.SHUT_WR)
    answer = b""
    while data := sock.recv(4096):
        answer += data
    sock.close()
    expected = f"{total} {h.hexdigest()}\n".encode()
    return {"answer": answer.decode(errors="replace").strip(), "ok": answer == expected}


async def concurrent(addr: tuple[str, int], count: int) -> dict:
    """Open `count` connections at once, keep them all open, then echo one message on each."""
    conns = await asyncio.gather(*(asyncio.open_connection(*addr) for _ in range(count)), return_exceptions=True)
    opened = [c for c in conns if not isinstance(c, BaseException)]
    errors = [repr(c) for c in conns if isinstance(c, BaseException)]

    async def one(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        msg = f"connection {i}\n".encode()
        writer.write(msg)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(msg)), 30)
        writer.close()
        return got == msg

    results = await asyncio.gather(*(one(i, r, w) for i, (r, w) in enumerate(opened)), return_exceptions=True)
    done = sum(1 for r in results if r is True)
    errors += [repr(r) for r in results if isinstance(r, BaseException)]
    return {"requested": count, "opened": len(opened), "completed": done, "errors": errors[:5],
            "ok": done == count}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshlab.tcptools")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--reply-after-eof", action="store_true")
    s.add_argument("--ready-file")
    for name in ("stream", "halfclose"):
        c = sub.add_parser(name)
        c.add_argument("target")
        c.add_argument("--bytes", type=int, default=1 << 20)
    c = sub.add_parser("concurrent")
    c.add_argument("target")
    c.add_argument("--connections", type=int, default=100)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        try:
            asyncio.run(_serve(args.port, args.reply_after_eof, args.ready_file))
        except KeyboardInterrupt:
            pass
        return 0
    if args.cmd == "stream":
        out = stream(_addr(args.target), args.bytes)
    elif args.cmd == "halfclose":
        out = halfclose(_addr(args.target), args.bytes)
    else:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.connections + 64)), hard))
        out = asyncio.run(concurrent(_addr(args.target), args.connections))
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
