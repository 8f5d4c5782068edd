"""``python -m lab`` is the ``kmstn`` command."""

import sys

from lab.cli import main

sys.exit(main())
