"""``python -m longtrain ...``: the ``longtrain`` command without its console script (a source checkout
on ``PYTHONPATH``, as on a machine where nothing is installed)."""

import sys

from longtrain.cli import main

sys.exit(main())
