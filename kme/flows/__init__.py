"""Key negotiation, in one place: the northbound ETSI 014 side of the master,
the delivery of each copy, the receiving side of ETSI 020, and durable retries.

It runs in the relay process (relay/__main__.py wires it to the real
services); the gateways stay edges that authenticate, parse and make one
call. The parts:

- :mod:`~kme.flows.northbound`: Get status, Get key (source device, limits,
  confirmed or concurrent delivery);
- :mod:`~kme.flows.delivery`: placing one destination's copy (own keyvault,
  device-keys notice to a QKD neighbour, ext_keys hop by hop) and voiding
  every copy after a failure;
- :mod:`~kme.flows.receive`: ext_keys, device_keys, void and ack from a
  neighbour, synchronous or asynchronous;
- :mod:`~kme.flows.retries`: work that must get through even across a
  restart (voids, concurrent deliveries, acks), recorded in the keyvault;
- :mod:`~kme.flows.supply` and :mod:`~kme.flows.stocks` (issue 11, only with
  the node file's ``[supply]``): quotas, the measured supply of each QKD link,
  bounded waits in fair order, and key stocks relayed ahead of demand;
- :mod:`~kme.flows.ports`: the small protocols the parts reach the services
  through, so unit tests run them over fakes.

Between kmstn nodes every ext_keys is synchronous (the answer carries the
acks, so no callback is needed); toward a foreign KMS the relay uses the
mode the peer supports. Messages carry a hop count and one absolute
deadline (:class:`kme.types.Deadline`).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from kme.config import NodeConfig
from kme.flows.context import MAX_HOPS, Context
from kme.flows.delivery import Delivery, Placement
from kme.flows.messages import AckMessage, DeviceKeysNotice
from kme.flows.northbound import Northbound, Source, dec_keys, limits_for, own_sae, source_of
from kme.flows.ports import Devices, Hop, Job, JobStore, Outgoing, Routes, StockVault, Vault
from kme.flows.receive import Plan, Receiver, merge_acks
from kme.flows.retries import TRANSIENT, Jobs, Retrier
from kme.flows.stocks import Stocks
from kme.flows.supply import Quotas, Supply

__all__ = [
    "MAX_HOPS",
    "TRANSIENT",
    "AckMessage",
    "DeviceKeysNotice",
    "Devices",
    "Flows",
    "Hop",
    "Job",
    "JobStore",
    "Jobs",
    "Outgoing",
    "Placement",
    "Plan",
    "Retrier",
    "Routes",
    "Source",
    "StockVault",
    "Stocks",
    "Supply",
    "Vault",
    "dec_keys",
    "limits_for",
    "merge_acks",
    "own_sae",
    "source_of",
]


_P = ParamSpec("_P")
_T = TypeVar("_T")


class _ContextPool(ThreadPoolExecutor):
    """A pool whose tasks run in the submitter's context (its request ID and log fields)."""

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
               ) -> Future[_T]:
        ctx = contextvars.copy_context()
        call: Callable[..., Any] = ctx.run
        return super().submit(call, fn, *args, **kwargs)


class Flows:
    """The parts, built together over one set of ports and one worker pool."""

    def __init__(self, config: NodeConfig, routes: Routes, vault: Vault, hop: Hop,
                 devices: Devices, jobs: JobStore, log: logging.Logger | None = None,
                 workers: int = 16, stock_vault: StockVault | None = None,
                 taken_bits: Callable[[str], int] | None = None) -> None:
        self.log = log or logging.getLogger("kmstn.flows")
        self._pool = _ContextPool(workers, thread_name_prefix="flows")
        self.jobs = Jobs(jobs, self.log, run=self._pool.submit,
                         ttl_s=float(config.keyvault.key_ttl_s))
        self.ctx = Context(config, routes, vault, hop, devices, self.jobs, self._pool, self.log)
        self.delivery = Delivery(self.ctx)
        # Issue 11: built only when the node file asks for it ([supply]).
        settings = config.supply
        self.supply: Supply | None = None
        self.stocks: Stocks | None = None
        quotas = Quotas(settings.quotas) if settings.quotas else None
        if settings.wait_ms or settings.stocks:
            links = [lid for lid in config.qkd_devices]
            self.supply = Supply(settings, {lid: devices.for_link(lid).status for lid in links},
                                 taken_bits or (lambda _link: 0), self.log)
            if settings.stocks:
                if stock_vault is None:
                    raise ValueError("stocks need the keyvault's stock calls")
                self.stocks = Stocks(self.ctx, self.delivery, self.supply, stock_vault)
        self.northbound = Northbound(self.ctx, self.delivery, self.supply, self.stocks, quotas)
        self.receiver = Receiver(self.ctx, self.delivery)

    def start(self) -> None:
        """Resume recorded work (retried while the keyvault cannot answer yet), then start
        the supply poller and the stock fills."""
        self.jobs.resume_at_start()
        if self.supply is not None:
            self.supply.start()
        if self.stocks is not None:
            self.stocks.start()

    def close(self) -> None:
        if self.stocks is not None:
            self.stocks.close()
        if self.supply is not None:
            self.supply.close()
        self.jobs.close()
        self._pool.shutdown(wait=True, cancel_futures=False)
