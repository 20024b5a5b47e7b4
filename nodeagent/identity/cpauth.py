"""How the agent talks to the control plane securely: TLS verified against the bootstrap
root bundle (plus the newest trust bundle the CA handed out, so a root rotation does not
cut the agent off), the node's bootstrap token as metadata on every call, and the
Certificates.Sign client the certificate manager uses.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509

from controlplane.api import NODE_METADATA, SIGN_METHOD, TOKEN_METADATA
from controlplane.api import certificates_pb2 as cpb
from nodeagent.endpoints import EndpointRotation
from nodeagent.errors import ConfigError

log = logging.getLogger("hostmesh.agent.cpauth")

SIGN_TIMEOUT = 10.0
_TLS_FAILURES = ("CERTIFICATE_VERIFY_FAILED", "Ssl handshake failed", "ssl_transport_security",
                 "Handshake failed", "WRONG_VERSION_NUMBER")


@dataclass(frozen=True)
class ControlPlaneAuth:
    """The node's credentials toward the control plane. The token file is read again when it
    changes: a projected Kubernetes service-account token is rotated by the kubelet."""

    node: str
    token: str
    root_bundle_pem: bytes
    root_bundle_path: str = ""
    server_name: str = ""  # TLS name to verify instead of the address's host
    token_path: str = ""
    _token_seen: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_files(cls, node: str, token_file: str, root_bundle: str, server_name: str = "") -> ControlPlaneAuth:
        from controlplane.auth import TokenFileError, read_token_file
        try:
            token = read_token_file(Path(token_file))
        except TokenFileError as exc:
            raise ConfigError(f"controlPlaneAuth.tokenFile: {exc}") from None
        try:
            data = Path(root_bundle).read_bytes()
            roots = x509.load_pem_x509_certificates(data)
        except OSError as exc:
            raise ConfigError(f"controlPlaneAuth.rootBundle: {root_bundle}: cannot read: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"controlPlaneAuth.rootBundle: {root_bundle}: not PEM certificates: {exc}") from None
        if not roots:
            raise ConfigError(f"controlPlaneAuth.rootBundle: {root_bundle}: holds no certificate")
        return cls(node=node, token=token, root_bundle_pem=data, root_bundle_path=root_bundle,
                   server_name=server_name, token_path=token_file)

    def current_token(self) -> str:
        """The token file's content now (one stat per call; the last good token if it broke)."""
        if not self.token_path:
            return self.token
        from controlplane.auth import TokenFileError, read_token_file
        try:
            st = os.stat(self.token_path)
        except OSError:
            return self._token_seen.get("token", self.token)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._token_seen.get("stamp") != stamp:
            try:
                self._token_seen["token"] = read_token_file(Path(self.token_path))
                self._token_seen["stamp"] = stamp
            except TokenFileError as exc:
                log.warning("the node token file changed but cannot be used; keeping the last one",
                            extra={"error": str(exc)})
                self._token_seen["stamp"] = stamp
        return self._token_seen.get("token", self.token)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_METADATA, f"Bearer {self.current_token()}"), (NODE_METADATA, self.node))

    def credentials(self, extra_roots_pem: str = "") -> grpc.ChannelCredentials:
        roots = self.root_bundle_pem
        if extra_roots_pem:
            roots = roots.rstrip(b"\n") + b"\n" + extra_roots_pem.encode()
        return grpc.ssl_channel_credentials(root_certificates=roots)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def explain(self, exc: grpc.aio.AioRpcError, address: str) -> str:
        """A readable reason for a failed call; TLS failures name the bundle to check."""
        details = exc.details() or ""
        if exc.code() == grpc.StatusCode.UNAVAILABLE and any(s in details for s in _TLS_FAILURES):
            return (f"TLS handshake with the control plane at {address} failed: its certificate does not verify "
                    f"against the root bundle {self.root_bundle_path or '(given at bootstrap)'}"
                    f"{' for name ' + self.server_name if self.server_name else ''} ({details})")
        return f"{exc.code().name}: {details}"


class GrpcSigner:
    """``await signer(csr_pem, namespace, service_account)`` -> SignResponse over one channel,
    created lazily in the running loop and recreated when the trust bundle changes."""

    def __init__(self, address: str | Sequence[str] | EndpointRotation, auth: ControlPlaneAuth,
                 extra_roots: Callable[[], str] = lambda: "", timeout: float = SIGN_TIMEOUT) -> None:
        # shared with the discovery client: a replica one of them found dead is skipped by both
        self.endpoints = address if isinstance(address, EndpointRotation) else EndpointRotation(address)
        self._dialled = ""
        self.auth = auth
        self.extra_roots = extra_roots
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._roots = ""

    @property
    def address(self) -> str:
        return self.endpoints.current

    def _call(self):
        roots = self.extra_roots()
        if self._channel is None or roots != self._roots or self._dialled != self.address:
            if self._channel is not None:
                old = self._channel
                # calls in flight on the old channel may finish; it closes after them
                asyncio.get_running_loop().create_task(old.close(grace=self.timeout))
            self._roots, self._dialled = roots, self.address
            self._channel = grpc.aio.secure_channel(self.address, self.auth.credentials(roots),
                                                    options=self.auth.options())
        return self._channel.unary_unary(SIGN_METHOD, request_serializer=cpb.SignRequest.SerializeToString,
                                         response_deserializer=cpb.SignResponse.FromString)

    async def __call__(self, csr_pem: str, namespace: str, service_account: str) -> cpb.SignResponse:
        request = cpb.SignRequest(csr_pem=csr_pem, namespace=namespace, service_account=service_account)
        for _ in range(len(self.endpoints.endpoints)):
            address = self.address
            try:
                return await self._call()(request, metadata=self.auth.metadata(), timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                error = SignError(self.auth.explain(exc, address), exc.code())
                if exc.code() != grpc.StatusCode.UNAVAILABLE or self.endpoints.failed(address):
                    raise error from None
        raise error

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class SignError(Exception):
    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.status = code
