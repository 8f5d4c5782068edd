"""The routing service: shortest paths over the federation graph (paper IV-D).

``routing.graph`` is the pure logic (a weighted graph with run-time link
state, Dijkstra from one source at a time with ``scipy.sparse.csgraph``);
``routing.service`` exposes it as the ``kme.rpc.v1.Routing`` gRPC service;
``routing.client`` is the typed client the other services use.
"""
