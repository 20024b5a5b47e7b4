"""The certificate RPC (hostmesh.api.v1.Certificates/Sign) and the control plane's own TLS
certificate for port 15010.

Sign: authenticate the node (controlplane/auth.py: bootstrap token) -> parse the identity
asked for -> authorize it against the config in force (a Workload running as it on that
node) -> check the CSR -> sign a leaf whose SAN the CA decides. Every refusal is logged
with node, identity and reason and counted in
``hostmesh_controlplane_certificate_requests_total{result}``.

The serving certificate is issued by the same CA for the names given (``--tls-san``) and
handed to gRPC through ``grpc.dynamic_ssl_server_credentials``: gRPC asks for the current
one on every handshake, so it is renewed at half life and re-issued after a CA rotation
without restarting the server.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import grpc

from controlplane.api import CERTIFICATES_SERVICE
from controlplane.api import certificates_pb2 as cpb
from controlplane.auth import NodeIdentities, NodeTokens, Unauthenticated
from controlplane.tokenreview import Authenticator, resolve
from controlplane.ca import CAError, CertificateAuthority, CSRRejected
from controlplane.metrics import ControlPlaneMetrics
from nodeagent.identity.spiffe import IdentityError, spiffe_id

log = logging.getLogger("hostmesh.controlplane.certificates")

SERVING_TTL = 30 * 86400.0


class CertificateService:
    """The Sign handler; ``identities()`` returns the authorization in force (None: no config yet)."""

    def __init__(self, ca: CertificateAuthority, tokens: NodeTokens | Authenticator,
                 identities: Callable[[], NodeIdentities | None], metrics: ControlPlaneMetrics) -> None:
        self.ca = ca
        self.tokens = tokens
        self.identities = identities
        self.metrics = metrics

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.unary_unary_rpc_method_handler(self.sign, request_deserializer=cpb.SignRequest.FromString,
                                                     response_serializer=cpb.SignResponse.SerializeToString)
        return grpc.method_handlers_generic_handler(CERTIFICATES_SERVICE, {"Sign": method})

    def _refuse(self, result: str, node: str, identity: str, reason: str) -> None:
        self.metrics.certificate_requests.labels(result).inc()
        log.warning("certificate request refused", extra={"result": result, "node": node or "(unauthenticated)",
                                                          "identity": identity, "reason": reason})

    async def sign(self, request: cpb.SignRequest, context: grpc.aio.ServicerContext) -> cpb.SignResponse:
        asked = f"{request.namespace}/{request.service_account}"
        try:
            node = await resolve(self.tokens.authenticate(context.invocation_metadata()))
        except Unauthenticated as exc:
            self.metrics.authentication_failures.labels("sign").inc()
            self._refuse("unauthenticated", "", asked, str(exc))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        code, result, reason, response = self.decide(node, request)
        if code is not grpc.StatusCode.OK:
            self._refuse(result, node, asked, reason)
            await context.abort(code, reason)
        self.metrics.certificate_requests.labels("issued").inc()
        log.info("certificate issued", extra={"node": node, "identity": response.spiffe_id,
                                              "serial": response.serial, "not_after": response.not_after})
        return response

    def decide(self, node: str, request: cpb.SignRequest) -> tuple[grpc.StatusCode, str, str, cpb.SignResponse | None]:
        """(status, result label, reason, response) for an authenticated node's request; no I/O."""
        policy = self.identities()
        if policy is None:
            return grpc.StatusCode.UNAVAILABLE, "unavailable", "the control plane has no valid config loaded yet", None
        try:
            ident = spiffe_id(policy.trust_domain, request.namespace, request.service_account)
        except IdentityError as exc:
            return grpc.StatusCode.INVALID_ARGUMENT, "invalid", f"requested identity: {exc}", None
        denial = policy.denial(node, ident.namespace, ident.service_account)
        if denial is not None:
            return grpc.StatusCode.PERMISSION_DENIED, "denied", f"node {node!r} may not obtain {ident.uri}: {denial}", None
        try:
            issued = self.ca.sign_workload(request.csr_pem, ident.uri, policy.certificate_ttl)
        except CSRRejected as exc:
            return grpc.StatusCode.INVALID_ARGUMENT, "invalid", f"certificate request for {ident.uri}: {exc}", None
        except CAError as exc:
            return grpc.StatusCode.UNAVAILABLE, "unavailable", str(exc), None
        return grpc.StatusCode.OK, "issued", "", cpb.SignResponse(
            cert_chain_pem=issued.chain_pem, trust_bundle_pem=self.ca.trust_bundle_pem,
            not_before=int(issued.not_before), not_after=int(issued.not_after), spiffe_id=ident.uri,
            serial=f"{issued.serial:x}")


class ServingCertificate:
    """The control plane's TLS certificate for 15010, re-issued at half life or when the CA
    changed; ``credentials()`` is what the gRPC server is given."""

    def __init__(self, ca: CertificateAuthority, names: Sequence[str], ttl: float = SERVING_TTL) -> None:
        self.ca = ca
        self.names = tuple(names)
        self.ttl = ttl
        self._lock = threading.Lock()  # gRPC calls the fetcher from its own threads
        self._signer = None
        self._renew_at = 0.0
        self._config = self._issue()

    def _issue(self) -> grpc.ServerCertificateConfiguration:
        chain, key, not_after = self.ca.issue_server(self.names, self.ttl)
        now = self.ca.clock()
        self._renew_at = now + (not_after - now) / 2
        self._signer = self.ca.signer
        self.chain_pem = chain
        log.info("control-plane TLS certificate issued", extra={"names": list(self.names)})
        return grpc.ssl_server_certificate_configuration([(key, chain.encode())])

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            if self.ca.signer is self._signer and self.ca.clock() < self._renew_at:
                return None  # gRPC keeps the current one
            try:
                self._config = self._issue()
            except CAError as exc:
                log.error("cannot renew the control plane's TLS certificate", extra={"error": str(exc)})
                return None
            return self._config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._config, self._fetch, require_client_authentication=False)
