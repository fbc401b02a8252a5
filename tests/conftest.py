"""Test set-up shared by every test file: the tests folder on sys.path, one thread pair, fixed seeds."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import pytest
import torch

# `python -m pytest` from the repo root puts the root on sys.path, where the `tokenizers/` folder
# (installed as `pathway.tokenizers`) would shadow Hugging Face's `tokenizers` package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
