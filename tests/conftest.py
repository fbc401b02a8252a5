"""Test set-up shared by every test file: one thread pair, fixed seeds, no hub access.

pytest puts this folder on sys.path (rootdir-relative imports of `make_files`, `toy_models`); the repo root
needs no special handling: `adapters/` and `tokenizers/` have no `__init__.py`, so they never shadow the
installed packages of those names (tests/test_layers.py checks it).
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
