"""The routing service: shortest paths over the federation graph (paper IV-D).

``routing.graph`` is the pure logic (a weighted graph with run-time link
state, Dijkstra from one source at a time with ``scipy.sparse.csgraph``);
``routing.service`` exposes it as the ``kme.rpc.v1.Routing`` gRPC service;
only the routing process imports those two. The other services of a node use
the scipy-free modules: ``routing.table`` (Route and the forwarding table),
``routing.follower`` (the table kept current by ``Routing.WatchTable``) and
``routing.client`` (the typed RPC client).
"""
