"""Adapters: one modality's files -> datasets, tokenizer, head and metric (imported as ``pathway.adapters``).

File libraries (PIL, decord, PyAV, librosa, soundfile, open3d) and timm's transforms are imported inside the
functions that read files, so ``import pathway.adapters`` stays light.
"""

from .base import Adapter as Adapter
from .base import LayoutError as LayoutError
from .base import OptionError as OptionError
from .base import UnreadableFileError as UnreadableFileError
from .registry import available as available
from .registry import get as get
from .registry import register as register

# Importing the built-in modules registers their adapters.
from . import audio as audio  # noqa: E402
from . import image as image  # noqa: E402
from . import point as point  # noqa: E402
from . import timeseries as timeseries  # noqa: E402
from . import video as video  # noqa: E402
