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
from kme.flows.ports import Devices, Hop, Job, JobStore, Outgoing, Routes, Vault
from kme.flows.receive import Plan, Receiver, merge_acks
from kme.flows.retries import TRANSIENT, Jobs, Retrier

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
                 workers: int = 16) -> None:
        self.log = log or logging.getLogger("kmstn.flows")
        self._pool = _ContextPool(workers, thread_name_prefix="flows")
        self.jobs = Jobs(jobs, self.log, run=self._pool.submit,
                         ttl_s=float(config.keyvault.key_ttl_s))
        self.ctx = Context(config, routes, vault, hop, devices, self.jobs, self._pool, self.log)
        self.delivery = Delivery(self.ctx)
        self.northbound = Northbound(self.ctx, self.delivery)
        self.receiver = Receiver(self.ctx, self.delivery)

    def close(self) -> None:
        self.jobs.close()
        self._pool.shutdown(wait=True, cancel_futures=False)
