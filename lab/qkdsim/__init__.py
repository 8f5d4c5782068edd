"""Emulated QKD devices: one Alice/Bob pair per QKD link, speaking ETSI GS QKD 014.

No lab, CI run or demo of kmstn has QKD hardware, so this package emulates
the vendor devices closely enough to measure against::

    python -m lab.qkdsim --config sim.toml        # or: kmstn-qkdsim --config sim.toml

Shape
-----
One process per QKD link serves the link's two device KMEs: Alice beside
``link.a`` and Bob beside ``link.b``. Each end has its own HTTPS listener
(host and port from ``[qkd_link.alice]`` / ``[qkd_link.bob]``), its own
certificate (CN = its ``kme_id``) and its own KME ID, and serves ETSI 014 to
one SAE only: the KMSTN beside it (``sae_id`` of that end), recognised by
the subject CN of its verified client certificate (mutual TLS, TLS 1.2 or
1.3). At Alice, ``alice.sae_id`` is the master for status and enc_keys with
slave ``bob.sae_id`` in the path, and the slave for dec_keys with master
``bob.sae_id`` in the path; Bob is symmetric; any other caller gets 401.

One process holds the key stream for both ends on purpose: it stands for the
quantum channel and the vendor's own key-synchronisation channel, which a
real pair runs between its two boxes and which the KMSTNs never see. A key
taken by enc_keys at one end leaves the shared store at once and is
retrievable exactly once, by key ID, through dec_keys at the other end; no
key is ever handed out twice at the same end.

Rate model
----------
Per link, from the topology: ``secret_key_rate`` (bits/s), ``block_size``
(bits), ``max_key_count`` and ``key_size``, and ``[qkd_link.sim]``:

- Key material arrives in blocks of ``block_size`` bits, at random
  intervals: the gap between blocks is gamma-distributed with mean
  ``block_size / (secret_key_rate * rate_multiplier)`` and shape
  ``arrival_shape`` (default 1: exponential gaps, Poisson arrivals, the
  bursty behaviour of paper section I; larger values make blocks more
  regular). ``seed`` makes the arrival times reproducible; key bytes always
  come from the operating system's CSPRNG.
- The store is finite: ``max_key_count`` keys of ``key_size`` bits. A block
  that does not fit is cut to the free space and the rest is dropped, as a
  device with a full buffer discards new key. Status ``stored_key_count`` is
  the true number of whole ``key_size`` keys in the store.
- ``initial_keys`` keys are in the store at start (default 0).
- Fault injection: during each ``[[qkd_link.sim.outage]]`` window (seconds
  from process start) no key is generated and both ends answer every 014
  request with 503 and an Error body whose ``details`` carry
  ``link_outage``; ``rate_multiplier`` scales the rate (0 stops generation).
- Keys issued at one end and never taken at the other are forgotten after
  ``issued_ttl_s``.

The store module (``lab.qkdsim.store``) has the details and the argument
for drawing key bytes at issue time.

Why asyncio, and why no framework
---------------------------------
A target of more than 1,000 enc_keys requests per second on a shared 2-core
machine, with keep-alive mutual-TLS clients, rules out a per-request TLS
handshake and favours a thin server. Both listeners run on one asyncio event
loop with a minimal HTTP/1.1 implementation (``lab.qkdsim.httpserver``):
keep-alive, Content-Length and chunked bodies, timeouts on every read and
write, bounded headers, bodies and connections. The request handler is
synchronous and touches only memory, so the one loop thread owns the store:
no lock exists, none can be held across I/O, and the emulator cannot
deadlock by construction. (The public Python emulators measured on this
kind of machine stalled within seconds under sustained load, with locks
held across HTTP calls and no timeouts.)

Health signal
-------------
``GET /healthz`` on each end's listener answers 200 ``{"status": "ok", ...}``
to any client certificate of the CA (no SAE check), with the store's
counters (stored, generated, dropped and delivered bits, pending keys) but
never key data. It stays 200 during an outage window (the process is
healthy; the emulated link is not) and reports ``"outage": true``.
:func:`lab.qkdsim.config.sim_healthy` polls both ends the way the federation
launcher does. Exit codes: 0 after SIGTERM/SIGINT, 78 on a bad
configuration (the message names the file and field), 1 if a listener
cannot bind.
"""
