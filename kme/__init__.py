"""kmstn node core: domain types, errors, configuration, logging, process shape.

The key-negotiation flows and the southbound ETSI 014 client live here too
(``kme.flows``, ``kme.qkd``); every long-running process lives in its own
top-level package (keyvault, routing, relay, gateway) and calls the others
through the gRPC stubs in ``kme.rpc.v1``. Lab tooling (the federation
launcher, the demo, benchmarks, the QKD device emulator) is in ``lab``,
which nothing here imports.
"""

__version__ = "0.1.0"
