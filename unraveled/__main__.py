"""``python -m unraveled`` is the ``unraveled`` command."""

import sys

from unraveled.cli import main

sys.exit(main())
