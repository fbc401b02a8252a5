"""Adapters: one modality's files -> datasets, tokenizer, head and metric (imported as ``pathway.adapters``).

File libraries (PIL, decord, PyAV, librosa, soundfile, open3d) and timm's transforms are imported inside the
functions that read files, so ``import pathway.adapters`` stays light.
"""

# The modules live in the repository's top-level `adapters/` folder. It has no __init__.py, so it never shadows
# AdapterHub's adapters for code started in the repo root: a plain folder yields to an installed package of the same
# name (PEP 420). A wheel installs the modules beside this file; in a source checkout (editable install,
# or the repo root on sys.path) this package reads them from that folder.
from pathlib import Path as _Path

_here = _Path(__file__).resolve().parent
if not (_here / "base.py").exists():
    __path__.append(str(_here.parents[1] / "adapters"))
del _Path, _here

from .base import (
    Adapter as Adapter,
    LayoutError as LayoutError,
    OptionError as OptionError,
    UnreadableFileError as UnreadableFileError,
)
from .registry import available as available, get as get, register as register
