"""kmstn node core: domain types, errors, configuration, logging, process shape.

The key-negotiation flows, the southbound ETSI 014 client and the QKD device
emulator live here too (``kme.flows``, ``kme.qkd``, ``kme.qkdsim``); every
long-running process lives in its own top-level package (keyvault, routing,
relay, gateway) and calls the others through the gRPC stubs in
``kme.rpc.v1``.
"""

__version__ = "0.1.0"
