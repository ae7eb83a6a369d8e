"""``python -m amortized_cartoonx.cli``: the ``cartoonx`` command where its entry point is not installed
(e.g. with only ``src`` on ``PYTHONPATH``)."""

import sys

from . import main

sys.exit(main())
