"""kmstn lab tooling: everything that runs a federation on one machine, not a node.

``lab.cli`` is the ``kmstn`` command (the node-operator commands of
``kme.cli`` plus the lab ones); ``lab.federation`` starts and stops every
service of a topology, ``lab.demo`` is ``make demo``, ``lab.bench`` is
``kmstn bench``, ``lab.saeclient`` a lean ETSI 014 SAE client, ``lab.rotate``
``kmstn sae rotate`` (fresh keys for a consumer), ``lab.pki`` a
throwaway CA, ``lab.qkdsim`` the emulated QKD devices, ``lab.dashboard`` a
live picture of a lab federation, ``lab.plots`` the paper's figures from a
bench run and ``lab.logs`` one key's path through a lab's logs. A node in
production needs none of it: ``kme`` and the service packages never import
``lab`` (tests/unit/test_layout.py checks it).
"""
