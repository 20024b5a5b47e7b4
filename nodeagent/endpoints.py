"""Which control-plane replica to dial: the agent's endpoint list and its failover order.

No I/O: the control-plane client and the certificate signer share one `EndpointRotation`
and tell it what happened; it says which endpoint to use next and whether a whole round
has failed (only then does the caller back off, so losing one replica costs no wait).
"""

from __future__ import annotations

from collections.abc import Sequence


class EndpointRotation:
    def __init__(self, endpoints: str | Sequence[str]) -> None:
        items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
        self.endpoints = tuple(e.strip() for e in items if e.strip())
        if not self.endpoints:
            raise ValueError("no control-plane endpoint")
        self._index = 0
        self._failed_in_round = 0
        self.failovers = 0

    @property
    def current(self) -> str:
        return self.endpoints[self._index]

    def failed(self, endpoint: str | None = None) -> bool:
        """`endpoint` (default: the current one) could not be used; move on. Returns True when
        every endpoint has failed since the last success (time to back off)."""
        if endpoint is not None and endpoint != self.current:
            return False    # another user of the rotation already moved on
        self._failed_in_round += 1
        if len(self.endpoints) > 1:
            self._index = (self._index + 1) % len(self.endpoints)
            self.failovers += 1
        if self._failed_in_round >= len(self.endpoints):
            self._failed_in_round = 0
            return True
        return False

    def succeeded(self) -> None:
        self._failed_in_round = 0

    def __str__(self) -> str:
        return ",".join(self.endpoints)
