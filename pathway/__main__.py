"""``python -m pathway ...`` is the ``pathway`` command (works under ``torchrun -m pathway``)."""

import sys

from pathway.train.cli import main

sys.exit(main())
