"""The relay service: how an ETSI 020 message crosses one hop (paper III-B.2-3, IV-B, IV-C).

``relay.envelope`` is the sealed JSON envelope (pure), ``relay.kem`` the
one-time ML-KEM-768 keys on both sides of a hop, ``relay.hopkey`` the hop's
message key (QKD key XOR KEM secret, or the KEM secret alone),
``relay.service`` the in-process :class:`~relay.service.Sealer` and
:class:`~relay.service.Opener` plus the gRPC servicers, ``relay.client`` the
typed clients, and ``relay.bench`` the benchmark.
"""
