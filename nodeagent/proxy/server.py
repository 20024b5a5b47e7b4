"""Both capture listeners of the node proxy behind one start / drain / close."""

from __future__ import annotations

import asyncio

from nodeagent.proxy.inbound import InboundProxy
from nodeagent.proxy.listener import INBOUND_PORT, OUTBOUND_PORT, ProxyInputs
from nodeagent.proxy.outbound import OutboundProxy


class NodeProxy:
    """The outbound (15001) and inbound (15006) listeners sharing one ``ProxyInputs``."""

    def __init__(self, inputs: ProxyInputs, *, host: str = "0.0.0.0",
                 outbound_port: int = OUTBOUND_PORT, inbound_port: int = INBOUND_PORT) -> None:
        self.inputs = inputs
        self.outbound = OutboundProxy(inputs, host, outbound_port)
        self.inbound = InboundProxy(inputs, host, inbound_port)

    async def start(self) -> list[asyncio.AbstractServer]:
        """Start both listeners; if the second cannot start, the first is closed again."""
        servers = [await self.outbound.start()]
        try:
            servers.append(await self.inbound.start())
        except BaseException:
            await self.outbound.drain(0)
            raise
        return servers

    @property
    def active_connections(self) -> int:
        return self.outbound.active_connections + self.inbound.active_connections

    async def drain(self, grace: float) -> int:
        """Stop accepting on both, wait up to ``grace`` s, abort the rest; returns aborted count."""
        out, inb = await asyncio.gather(self.outbound.drain(grace), self.inbound.drain(grace))
        return out + inb

    def close(self) -> None:
        self.outbound.close()
        self.inbound.close()
