"""Agents in a Kubernetes cluster authenticate with their projected service-account token,
checked by the API server (TokenReview), instead of a hand-copied per-node token file.

A call is accepted when the API server says the token is authenticated for our audience
(`hostmesh` by default), belongs to the agents' service account, and is bound to a pod on
the node the call names (the `authentication.kubernetes.io/node-name` extra a projected
token carries), so the node authorizer keeps working: a stolen token cannot speak for
another node. Every other outcome is a refusal, and so is an API server that cannot be
asked (fail closed). Good answers are cached for `cache_ttl` seconds by token digest, so
agents' frequent calls cost one review a minute each.

`Authenticator` puts the two together: a node with a token file uses it (bare-metal nodes
in the same mesh), any other node's token is reviewed.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from controlplane.auth import NodeTokens, Unauthenticated, credentials_of

log = logging.getLogger("hostmesh.controlplane.tokenreview")

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
DEFAULT_AUDIENCE = "hostmesh"
DEFAULT_SERVICE_ACCOUNT = "hostmesh-system/hostmesh-agent"
REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"

#: (review body) -> the API server's TokenReview answer (a dict); raises when it cannot be asked
ReviewCall = Callable[[dict], Awaitable[dict]]


@dataclass(frozen=True)
class ReviewPolicy:
    audience: str = DEFAULT_AUDIENCE
    service_accounts: tuple[str, ...] = (DEFAULT_SERVICE_ACCOUNT,)   # "namespace/name"
    cache_ttl: float = 60.0


def judge(answer: dict, node: str, policy: ReviewPolicy) -> str:
    """'' when the review lets the token speak for `node`, else why not (no I/O)."""
    status = answer.get("status") or {}
    if not status.get("authenticated"):
        return f"the API server did not authenticate the token: {status.get('error') or 'no reason given'}"
    if policy.audience not in (status.get("audiences") or [policy.audience]):
        return f"the token is not for audience {policy.audience!r}"
    user = status.get("user") or {}
    username = user.get("username", "")
    allowed = {f"system:serviceaccount:{sa.replace('/', ':')}" for sa in policy.service_accounts}
    if username not in allowed:
        return f"the token belongs to {username!r}, not to the agents' service account"
    bound = (user.get("extra") or {}).get(NODE_NAME_EXTRA) or []
    if node not in bound:
        return (f"the token is bound to node {bound[0]!r}, not {node!r}" if bound
                else "the token is not bound to a node (use a projected service-account token)")
    return ""


class TokenReviewer:
    def __init__(self, review: ReviewCall, policy: ReviewPolicy = ReviewPolicy(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.review = review
        self.policy = policy
        self.clock = clock
        self.reviews = 0
        self._cache: dict[tuple[str, str], float] = {}   # (token digest, node) -> valid until

    async def check(self, node: str, token: str) -> str:
        key = (hashlib.sha256(token.encode()).hexdigest(), node)
        now = self.clock()
        if self._cache.get(key, 0.0) > now:
            return node
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [self.policy.audience]}}
        try:
            self.reviews += 1
            answer = await self.review(body)
        except Exception as exc:  # cannot ask: refuse (fail closed)
            raise Unauthenticated(f"cannot review the token of node {node!r}: {type(exc).__name__}: {exc}") from None
        why = judge(answer, node, self.policy)
        if why:
            raise Unauthenticated(f"node {node!r}: {why}")
        if len(self._cache) > 10_000:
            self._cache = {k: v for k, v in self._cache.items() if v > now}
        self._cache[key] = now + self.policy.cache_ttl
        return node


class Authenticator:
    """Token files for the nodes that have one, TokenReview for the others."""

    def __init__(self, tokens: NodeTokens, reviewer: TokenReviewer | None) -> None:
        self.tokens = tokens
        self.reviewer = reviewer

    def authenticate(self, metadata) -> str | Awaitable[str]:
        node, token = credentials_of(metadata)
        if self.reviewer is None or self.tokens.knows(node):
            return self.tokens.check(node, token)
        return self.reviewer.check(node, token)


async def resolve(result: str | Awaitable[str]) -> str:
    """The node from a sync or async authenticator's answer."""
    return await result if inspect.isawaitable(result) else result
