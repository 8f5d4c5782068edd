"""``python -m kme``: the node-operator commands of ``kmstn`` (config, route, link, topology)."""

import sys

from kme.cli import main

sys.exit(main())
