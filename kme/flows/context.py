"""What every part of the flows shares: the node, its topology, and the ports."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kme.config import NodeConfig, QkdLink
from kme.errors import ErrorCode, KmstnError
from kme.flows.ports import Devices, Hop, Routes, Vault
from kme.flows.retries import Jobs
from kme.types import NodeId

__all__ = ["MAX_HOPS", "Context"]

# A message that has made this many hops is refused, so a routing loop
# (nodes with different link state) cannot circulate keys forever.
MAX_HOPS = 32

T = TypeVar("T")


@dataclass
class Context:
    config: NodeConfig
    routes: Routes
    vault: Vault
    hop: Hop
    devices: Devices
    jobs: Jobs
    pool: ThreadPoolExecutor
    log: logging.Logger
    qkd_links: dict[NodeId, QkdLink] = field(init=False)

    def __post_init__(self) -> None:
        node = self.config.node_id
        self.qkd_links = {link.other(node): link for link in self.config.topology.qkd_links
                          if node in (link.a, link.b)}

    @property
    def node(self) -> NodeId:
        return self.config.node_id

    @property
    def relay_timeout(self) -> float:
        return self.config.gateway.relay_timeout_ms / 1000

    def node_of(self, sae: str) -> NodeId:
        # The routes' map: SAEs of other nodes are learned from their
        # link-state records, so a node file need not name them.
        return self.routes.node_of_sae(sae)

    def origin_of(self, sae: str, default: NodeId) -> NodeId:
        """The node serving ``sae``, or ``default`` when no node is known to."""
        try:
            return self.node_of(sae)
        except KmstnError as exc:
            if exc.code is not ErrorCode.UNKNOWN_SAE:
                raise
            return default

    def in_background(self, fn: Callable[[], Any]) -> Future[Any]:
        def guarded() -> Any:
            try:
                return fn()
            except Exception:
                self.log.exception("background task crashed")
                return None

        return self.pool.submit(guarded)
