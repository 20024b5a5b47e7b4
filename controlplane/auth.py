"""Who is calling: per-node bootstrap tokens, and which identities a node may obtain.

Authentication (lab and bare metal): the control plane is given a directory of token
files, one per node, ``<node>.token`` (mode 0600; a file group/other can read is refused).
Every agent call carries ``authorization: Bearer <token>`` and ``x-hostmesh-node: <node>``
(see controlplane/api/certificates.proto); the token is compared in constant time. The
directory is re-read when it changes, so adding a node or revoking a token needs no restart.

Authorization (the node authorizer, as istiod's): a node gets a certificate only for an
identity (namespace/serviceAccount) that has a Workload on that node in the config in
force right now. ``NodeIdentities`` is built from each new model; decisions are plain
functions of it.
"""

from __future__ import annotations

import hmac
import logging
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.api import NODE_METADATA, TOKEN_METADATA
from controlplane.errors import ControlPlaneError
from controlplane.model.objects import MeshModel

log = logging.getLogger("hostmesh.controlplane.auth")

TOKEN_SUFFIX = ".token"
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 4096


class TokenFileError(ControlPlaneError):
    """The token directory or one of its files is unusable; names the file."""


class Unauthenticated(Exception):
    """A call without valid node credentials; the message is safe to return to the caller."""


def read_token_file(path: Path) -> str:
    """A token file's content, refusing files group or others can read (shared by both sides)."""
    try:
        st = path.stat()
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"{path}: cannot read the token: {getattr(exc, 'strerror', None) or exc}") from None
    if st.st_mode & 0o077:
        raise TokenFileError(f"{path}: the token is readable by group or others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}); run chmod 600 {path}")
    if not MIN_TOKEN_CHARS <= len(text) <= MAX_TOKEN_CHARS or any(c.isspace() for c in text):
        raise TokenFileError(f"{path}: a token must be {MIN_TOKEN_CHARS}-{MAX_TOKEN_CHARS} characters "
                             f"without whitespace")
    return text


def credentials_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str, str]:
    """(node, bearer token) of a call, or Unauthenticated saying what is missing."""
    md: dict[str, str] = {}
    for k, v in metadata or ():
        md[k.lower()] = v.decode(errors="replace") if isinstance(v, bytes) else v
    node = md.get(NODE_METADATA, "")
    auth = md.get(TOKEN_METADATA, "")
    if not node:
        raise Unauthenticated(f"missing {NODE_METADATA} metadata: the agent must name its node")
    if not auth:
        raise Unauthenticated(f"missing {TOKEN_METADATA} metadata: node {node!r} sent no bootstrap token")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated(f"{TOKEN_METADATA} metadata must be 'Bearer <token>'")
    return node, token


class NodeTokens:
    """The node -> token map of a token directory, reloaded when the directory changes."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._tokens: dict[str, bytes] = {}
        self._fingerprint: tuple | None = None
        self.reload_if_changed()

    def _scan(self) -> tuple:
        try:
            entries = sorted(p for p in self.directory.iterdir() if p.name.endswith(TOKEN_SUFFIX))
        except OSError as exc:
            raise TokenFileError(f"{self.directory}: cannot read the node token directory: {exc.strerror}") from None
        out = []
        for p in entries:
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((p.name, st.st_mtime_ns, st.st_size, st.st_mode))
        return tuple(out)

    def reload_if_changed(self) -> bool:
        """Re-read the directory when a file changed; a broken file raises TokenFileError and
        the tokens already loaded stay in force."""
        fp = self._scan()
        if fp == self._fingerprint:
            return False
        tokens = {}
        for name, *_ in fp:
            node = name[: -len(TOKEN_SUFFIX)]
            if node:
                tokens[node] = read_token_file(self.directory / name).encode()
        self._tokens = tokens
        self._fingerprint = fp
        log.info("node tokens loaded", extra={"directory": str(self.directory), "nodes": len(tokens)})
        return True

    @property
    def nodes(self) -> list[str]:
        return sorted(self._tokens)

    def knows(self, node: str) -> bool:
        return node in self._tokens

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The node the call's credentials belong to, or Unauthenticated saying what is wrong."""
        node, token = credentials_of(metadata)
        return self.check(node, token)

    def check(self, node: str, token: str) -> str:
        expected = self._tokens.get(node)
        # compare even for an unknown node so the timing does not tell which nodes exist
        ok = hmac.compare_digest(token.encode(), expected if expected is not None else b"\0" * 43)
        if expected is None or not ok:
            raise Unauthenticated(f"invalid bootstrap token for node {node!r}")
        return node


@dataclass(frozen=True)
class NodeIdentities:
    """What the config in force allows: node -> {(namespace, serviceAccount)}, plus the
    mesh settings a certificate needs."""

    trust_domain: str
    certificate_ttl: float
    by_node: Mapping[str, frozenset[tuple[str, str]]] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: MeshModel) -> NodeIdentities:
        by_node: dict[str, set[tuple[str, str]]] = {}
        for w in model.workloads:
            spec = w.spec_view
            by_node.setdefault(spec["node"], set()).add((w.namespace, spec.get("serviceAccount") or "default"))
        settings = model.settings
        return cls(trust_domain=settings.trust_domain, certificate_ttl=settings.certificate_ttl_seconds,
                   by_node={n: frozenset(s) for n, s in by_node.items()})

    def denial(self, node: str, namespace: str, service_account: str) -> str | None:
        """Why ``node`` may not have ``namespace/service_account`` (None: it may)."""
        if (namespace, service_account) in self.by_node.get(node, frozenset()):
            return None
        return f"no workload running as {namespace}/{service_account} is scheduled on node {node!r}"
