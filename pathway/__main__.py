"""``python -m pathway ...`` is the ``pathway`` command (works under ``torchrun -m pathway``)."""

import sys

from pathway.cli import main

sys.exit(main())
