"""Leader election among control-plane replicas, on an etcd lease.

Every replica serves agents (snapshots are computed from the same etcd state; reads need no
leader) and every replica signs workload certificates with the shared CA (signing is
stateless). Only writes back to etcd need one writer: today the config status record
(``<prefix>status/config``) that `hostmesh status` and operators read.

Why two leaders cannot both write, by construction:
- Winning is one etcd transaction: "if <prefix>leader does not exist, create it bound to my
  lease". etcd is linearizable, so at most one replica's create succeeds per key lifetime.
- Every leader write is a transaction guarded by "the leader key still has the create
  revision I made and my identity". A replica that was paused or partitioned past its lease
  and still believes it leads has its writes refused by etcd itself, and steps down.
- A leader also steps down on its own once it cannot confirm its lease within the TTL it
  was last granted, measured from before the refresh was sent.

A clean stop revokes the lease, so a successor takes over at once; a killed leader is
replaced once its lease expires (the TTL, 5 s by default).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from aetcd import rpc

from controlplane.etcd import DEFAULT_PREFIX, EtcdClient, EtcdError, create_revision_is, get_op, put_op, value_is

log = logging.getLogger("hostmesh.controlplane.election")

DEFAULT_TTL = 5


def leader_key(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix.rstrip('/')}/leader"


class LeaderElection:
    def __init__(self, client: EtcdClient, identity: str, *, prefix: str = DEFAULT_PREFIX, ttl: int = DEFAULT_TTL,
                 on_change: Callable[[bool], None] = lambda leading: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl < 2:
            raise ValueError("the leader lease TTL must be at least 2 s")
        self.client = client
        self.identity = identity
        self.key = leader_key(prefix)
        self.ttl = ttl
        self.on_change = on_change
        self.clock = clock
        self.leading = False
        self.leader: str | None = None       # who leads, as last seen
        self.transitions = 0
        self.last_error = ""
        self._lease = 0
        self._create_revision = 0
        self._valid_until = 0.0

    def describe(self) -> dict:
        return {"identity": self.identity, "leading": self.leading, "leader": self.leader, "key": self.key,
                "ttl": self.ttl, "transitions": self.transitions, "last_error": self.last_error or None}

    # ------------------------------------------------------------------ campaign
    async def run(self) -> None:
        """Campaign, lead while the lease holds, campaign again; forever (cancel to stop)."""
        while True:
            try:
                await self.campaign_once()
            except EtcdError as exc:
                self.last_error = str(exc)
                self._step_down(f"etcd: {exc}")
                await asyncio.sleep(self.ttl / 3)

    async def campaign_once(self) -> None:
        lease = await self.client.grant(self.ttl)
        granted_at = self.clock()
        resp = await self.client.txn([create_revision_is(self.key, 0)],
                                     [put_op(self.key, self.identity.encode(), lease)], [get_op(self.key)])
        if resp.succeeded:
            self._lease, self._create_revision = lease, resp.header.revision
            self._valid_until = granted_at + self.ttl
            self._become_leader()
            await self._hold()
            return
        await self.client.revoke(lease)
        kvs = resp.responses[0].response_range.kvs
        self.leader = kvs[0].value.decode("utf-8", "replace") if kvs else None
        await self._wait_for_vacancy(resp.header.revision)

    async def _hold(self) -> None:
        """Refresh the lease every TTL/3 until it is lost, then return."""
        while self.leading:
            await asyncio.sleep(self.ttl / 3)
            sent = self.clock()
            try:
                left = await asyncio.wait_for(self.client.keepalive(self._lease), self.ttl / 3)
            except (EtcdError, asyncio.TimeoutError) as exc:
                self.last_error = str(exc) or "lease refresh timed out"
                if self.clock() >= self._valid_until - self.ttl / 3:
                    self._step_down("could not refresh the leader lease within its TTL")
                continue
            if left <= 0:
                self._step_down("the leader lease expired")
                return
            self._valid_until = sent + left
            try:
                if not await self._still_holder():
                    return
            except EtcdError as exc:   # unknown for now: the lease deadline above still bounds us
                self.last_error = str(exc)

    async def _still_holder(self) -> bool:
        kv = await self.client.get(self.key)
        if kv is None or kv.create_revision != self._create_revision:
            self._step_down("the leader key is gone or belongs to another replica")
            return False
        return True

    async def _wait_for_vacancy(self, revision: int) -> None:
        """Return once the leader key is deleted (lease expired or revoked)."""
        async for resp in self.client.watch_key(self.key, revision + 1):
            if any(ev.type == 1 for ev in resp.events):
                self.leader = None
                return
            for ev in resp.events:
                self.leader = ev.kv.value.decode("utf-8", "replace")

    # ------------------------------------------------------------------ leader writes
    async def fenced_txn(self, ops: Sequence[rpc.RequestOp]) -> bool:
        """Apply `ops` only while this replica provably holds the leader key."""
        if not self.leading:
            return False
        resp = await self.client.txn([create_revision_is(self.key, self._create_revision),
                                      value_is(self.key, self.identity.encode())], ops)
        if not resp.succeeded:
            self._step_down("a fenced write was refused: another replica holds the leader key")
        return resp.succeeded

    async def resign(self) -> None:
        """Give leadership up now (a clean stop), so another replica need not wait out the TTL."""
        lease, self._lease = self._lease, 0
        self._step_down("resigned")
        if lease:
            try:
                await self.client.revoke(lease)
            except EtcdError as exc:
                log.warning("could not revoke the leader lease; it expires by itself",
                            extra={"error": str(exc), "ttl": self.ttl})

    # ------------------------------------------------------------------ state
    def _become_leader(self) -> None:
        self.leading, self.leader = True, self.identity
        self.transitions += 1
        log.info("leading the control plane", extra={"identity": self.identity, "key": self.key, "ttl": self.ttl})
        self.on_change(True)

    def _step_down(self, why: str) -> None:
        if not self.leading:
            return
        self.leading = False
        self.leader = None
        self.transitions += 1
        log.warning("no longer leading the control plane", extra={"identity": self.identity, "reason": why})
        self.on_change(False)
