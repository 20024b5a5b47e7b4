"""A small asyncio etcd v3 client: etcd's own gRPC API (the stubs generated from etcd's
protos, shipped by the `aetcd` package) over a grpc.aio channel we make ourselves.

Why not aetcd's `Client`: it has no TLS and no endpoint list, and its watcher hands
events over one by one. Here a watch yields whole `WatchResponse`s (all the events of one
revision together, so a `config apply` of 50 objects is one rebuild, not 50), a compacted
start revision raises `Compacted`, and every call fails over to the next endpoint of the
list when one is unreachable.

Used by the etcd config source (sources/etcd.py), leader election (election.py) and
`hostmesh config apply --etcd`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from aetcd import rpc
from aetcd.rpc import rpc_pb2_grpc

from controlplane.errors import ControlPlaneError

DEFAULT_TIMEOUT = 5.0
DEFAULT_PREFIX = "/hostmesh/"


class EtcdError(ControlPlaneError):
    """etcd could not be used; the message names the endpoints and the reason."""


class Compacted(EtcdError):
    """A watch asked for history etcd has compacted away: list again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"etcd compacted its history up to revision {revision}")
        self.revision = revision


@dataclass(frozen=True)
class EtcdTLS:
    ca_file: str
    cert_file: str = ""
    key_file: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            if not path:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as exc:
                raise EtcdError(f"cannot read {path}: {exc.strerror}") from None
        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))


def parse_endpoints(value: str | Sequence[str]) -> tuple[str, ...]:
    """"h1:2379,h2:2379" or a list -> ("h1:2379", "h2:2379"); an http(s):// scheme is accepted
    (etcdctl's spelling) and dropped."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for raw in items:
        item = raw.strip()
        for scheme in ("http://", "https://"):
            if item.startswith(scheme):
                item = item[len(scheme):]
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise EtcdError(f"etcd endpoint {raw.strip()!r} is not host:port")
        out.append(f"{host}:{int(port)}")
    if not out:
        raise EtcdError("no etcd endpoint given")
    return tuple(out)


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix` (etcd's convention)."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[:i + 1])
    return b"\0"


class EtcdClient:
    """Unary calls retry once on every other endpoint when the current one is unreachable."""

    def __init__(self, endpoints: Sequence[str], *, tls: EtcdTLS | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.tls = tls
        self.timeout = timeout
        self._current = 0
        self._channel: grpc.aio.Channel | None = None

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            target = self.endpoint
            opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.keepalive_time_ms", 10_000),
                    ("grpc.keepalive_timeout_ms", 5_000), ("grpc.keepalive_permit_without_calls", 1)]
            self._channel = (grpc.aio.secure_channel(target, self.tls.credentials(), options=opts)
                             if self.tls else grpc.aio.insecure_channel(target, options=opts))
        return self._channel

    async def _next_endpoint(self) -> None:
        if self._channel is not None:
            old, self._channel = self._channel, None
            await old.close(grace=None)
        self._current = (self._current + 1) % len(self.endpoints)

    def _kv(self) -> rpc_pb2_grpc.KVStub:
        return rpc_pb2_grpc.KVStub(self._open())

    async def _unary(self, make_call):
        last: grpc.aio.AioRpcError | None = None
        for _ in range(len(self.endpoints)):
            try:
                return await make_call()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise EtcdError(f"etcd at {self.endpoint}: {exc.code().name}: {exc.details()}") from None
                last = exc
                await self._next_endpoint()
        raise EtcdError(f"etcd unreachable at {', '.join(self.endpoints)}: "
                        f"{last.code().name if last else ''}: {last.details() if last else ''}")

    # ------------------------------------------------------------------ KV
    async def get_prefix(self, prefix: str) -> tuple[int, list[rpc.KeyValue]]:
        """(revision of the read, every key-value under `prefix`), one consistent read."""
        p = prefix.encode()
        req = rpc.RangeRequest(key=p, range_end=prefix_end(p))
        resp = await self._unary(lambda: self._kv().Range(req, timeout=self.timeout))
        return resp.header.revision, list(resp.kvs)

    async def get(self, key: str, revision: int = 0) -> rpc.KeyValue | None:
        """The key now, or as it was at `revision` (etcd keeps history until compaction)."""
        req = rpc.RangeRequest(key=key.encode(), revision=revision)
        resp = await self._unary(lambda: self._kv().Range(req, timeout=self.timeout))
        return resp.kvs[0] if resp.kvs else None

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        req = rpc.PutRequest(key=key.encode(), value=value, lease=lease)
        resp = await self._unary(lambda: self._kv().Put(req, timeout=self.timeout))
        return resp.header.revision

    async def delete(self, key: str) -> int:
        req = rpc.DeleteRangeRequest(key=key.encode())
        resp = await self._unary(lambda: self._kv().DeleteRange(req, timeout=self.timeout))
        return resp.deleted

    async def txn(self, compare: Sequence[rpc.Compare], success: Sequence[rpc.RequestOp],
                  failure: Sequence[rpc.RequestOp] = ()) -> rpc.TxnResponse:
        req = rpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        return await self._unary(lambda: self._kv().Txn(req, timeout=self.timeout))

    async def compact(self, revision: int) -> None:
        req = rpc.CompactionRequest(revision=revision, physical=True)
        await self._unary(lambda: self._kv().Compact(req, timeout=self.timeout))

    # ------------------------------------------------------------------ leases
    async def grant(self, ttl: int) -> int:
        stub = rpc_pb2_grpc.LeaseStub(self._open())
        resp = await self._unary(lambda: stub.LeaseGrant(rpc.LeaseGrantRequest(TTL=ttl), timeout=self.timeout))
        return resp.ID

    async def keepalive(self, lease: int) -> int:
        """Refresh a lease once; returns its remaining TTL (0: it has expired)."""
        async def once():
            stub = rpc_pb2_grpc.LeaseStub(self._open())
            call = stub.LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=lease)]), timeout=self.timeout)
            async for reply in call:
                return reply.TTL
            return 0
        return await self._unary(once)

    async def revoke(self, lease: int) -> None:
        stub = rpc_pb2_grpc.LeaseStub(self._open())
        await self._unary(lambda: stub.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease), timeout=self.timeout))

    # ------------------------------------------------------------------ watch
    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[rpc.WatchResponse]:
        """Every WatchResponse carrying events under `prefix` from `start_revision` on. Raises
        Compacted when that history is gone, EtcdError when the stream breaks (the caller
        lists again and watches from the new revision)."""
        p = prefix.encode()
        return self._watch(p, prefix_end(p), start_revision)

    def watch_key(self, key: str, start_revision: int) -> AsyncIterator[rpc.WatchResponse]:
        return self._watch(key.encode(), b"", start_revision)

    async def _watch(self, key: bytes, range_end: bytes, start_revision: int) -> AsyncIterator[rpc.WatchResponse]:
        create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=start_revision, progress_notify=True))
        requests: asyncio.Queue = asyncio.Queue()
        requests.put_nowait(create)

        async def outgoing():
            while True:
                item = await requests.get()
                if item is None:
                    return
                yield item

        stub = rpc_pb2_grpc.WatchStub(self._open())
        call = stub.Watch(outgoing())
        try:
            async for resp in call:
                if resp.compact_revision:
                    raise Compacted(resp.compact_revision)
                if resp.canceled:
                    raise EtcdError(f"etcd at {self.endpoint} cancelled the watch: {resp.cancel_reason or 'no reason'}")
                if resp.events:
                    yield resp
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                await self._next_endpoint()
            raise EtcdError(f"etcd watch at {self.endpoint} broke: {exc.code().name}: {exc.details()}") from None
        finally:
            requests.put_nowait(None)
            call.cancel()
        raise EtcdError(f"etcd at {self.endpoint} closed the watch")

    async def close(self) -> None:
        if self._channel is not None:
            ch, self._channel = self._channel, None
            await ch.close(grace=None)


# ---------------------------------------------------------------------- txn helpers
def put_op(key: str, value: bytes, lease: int = 0) -> rpc.RequestOp:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=value, lease=lease))


def delete_op(key: str) -> rpc.RequestOp:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key.encode()))


def get_op(key: str) -> rpc.RequestOp:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key.encode()))


def create_revision_is(key: str, revision: int) -> rpc.Compare:
    return rpc.Compare(key=key.encode(), target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL,
                       create_revision=revision)


def value_is(key: str, value: bytes) -> rpc.Compare:
    return rpc.Compare(key=key.encode(), target=rpc.Compare.VALUE, result=rpc.Compare.EQUAL, value=value)
