"""``python -m kme`` is the ``kmstn`` command."""

import sys

from kme.cli import main

sys.exit(main())
