"""Workload identities on this node: SPIFFE IDs, their certificates and TLS contexts.

The seam between the certificate manager (which obtains and rotates certificates from the
control plane's CA) and the proxy (which only reads them) is ``WorkloadIdentities``: the
proxy asks for a ready ``ssl.SSLContext`` per identity and gets None when no valid
certificate exists, in which case it must refuse the connection (fail closed), never fall
back to plaintext.
"""

from __future__ import annotations

import ssl
from typing import Protocol

from nodeagent.identity.spiffe import (DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId, leaf_identity, verify_chain,
                                       leaf_identity_der, parse_spiffe_id, spiffe_id)


class WorkloadIdentities(Protocol):
    """What the proxy reads from the certificate manager (no I/O, never blocks)."""

    @property
    def trust_domain(self) -> str: ...

    def server_context(self, identity: SpiffeId) -> ssl.SSLContext | None:
        """TLS server context presenting ``identity``'s certificate and requiring a client
        certificate that chains to the trusted roots; None without a valid certificate."""

    def client_context(self, identity: SpiffeId) -> ssl.SSLContext | None:
        """TLS client context presenting ``identity``'s certificate and verifying the server's
        chain against the trusted roots (SAN checked by the caller); None without one."""


__all__ = ["DEFAULT_TRUST_DOMAIN", "IdentityError", "SpiffeId", "WorkloadIdentities", "leaf_identity",
           "leaf_identity_der", "parse_spiffe_id", "spiffe_id", "verify_chain"]
