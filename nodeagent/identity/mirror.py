"""``WorkloadIdentities`` in a proxy worker process: the certificate manager's contexts,
rebuilt from its files.

The agent's ``CertificateManager`` owns keys and talks to the CA; after every install or
drop it tells each worker which identities have certificates (``held_files``: directory,
serial, expiry; never key material on the wire). The worker's mirror builds the same
TLS contexts from those files (``build_contexts``, the manager's own function), keeps a
context until its certificate expires (fail closed afterwards, as the manager does), and
keeps the previous one when a new serial's files cannot be loaded yet.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nodeagent.identity.manager import build_contexts
from nodeagent.identity.spiffe import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId, parse_spiffe_id

log = logging.getLogger("hostmesh.worker.identities")


@dataclass(frozen=True)
class _Held:
    serial: str
    not_after: float
    server: ssl.SSLContext
    client: ssl.SSLContext


class IdentityMirror:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._trust_domain = DEFAULT_TRUST_DOMAIN
        self._held: dict[SpiffeId, _Held] = {}

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    def update(self, trust_domain: str, identities: list[dict]) -> None:
        """Make the held identities exactly ``identities`` (``CertificateManager.held_files``)."""
        self._trust_domain = trust_domain or DEFAULT_TRUST_DOMAIN
        wanted: dict[SpiffeId, dict] = {}
        for entry in identities:
            try:
                wanted[parse_spiffe_id(entry["uri"])] = entry
            except (IdentityError, KeyError, TypeError):
                log.error("ignoring a malformed identity from the agent", extra={"entry": repr(entry)[:200]})
        for ident in [i for i in self._held if i not in wanted]:
            del self._held[ident]
        for ident, entry in wanted.items():
            have = self._held.get(ident)
            if have is not None and have.serial == entry.get("serial"):
                continue
            d = Path(entry["dir"])
            try:
                server, client = build_contexts(d / "cert-chain.pem", d / "key.pem",
                                                (d / "root-cert.pem").read_text())
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.error("cannot load the certificate files; keeping the previous certificate",
                          extra={"identity": ident.uri, "error": str(exc)})
                continue
            self._held[ident] = _Held(str(entry.get("serial")), float(entry.get("not_after", 0)), server, client)

    def _valid(self, identity: SpiffeId) -> _Held | None:
        h = self._held.get(identity)
        if h is None or self.clock() >= h.not_after:
            return None
        return h

    def server_context(self, identity: SpiffeId) -> ssl.SSLContext | None:
        h = self._valid(identity)
        return h.server if h else None

    def client_context(self, identity: SpiffeId) -> ssl.SSLContext | None:
        h = self._valid(identity)
        return h.client if h else None
