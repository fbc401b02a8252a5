"""multimodal-pathway: improve a transformer with the weights of one trained on another modality.

``connect(target, aux)`` pairs every weight layer of the target with its counterpart in the aux
model (by name or by graph position) and trains ``W + lambda * W_aux``; ``fold(model)`` merges it
back into the plain model. See the README for the whole API.
"""

from torch.nn.utils.parametrize import cached as cached

from .errors import (
    CompetingPairsError as CompetingPairsError,
    CoverageError as CoverageError,
    DepthMismatchError as DepthMismatchError,
    DeviceMismatchError as DeviceMismatchError,
    GroupSizeError as GroupSizeError,
    LayoutError as LayoutError,
    NonFiniteError as NonFiniteError,
    NoPairsError as NoPairsError,
    NotConnectedError as NotConnectedError,
    OptionError as OptionError,
    PathwayError as PathwayError,
    SelfConnectionError as SelfConnectionError,
    ShapeMismatchError as ShapeMismatchError,
    TraceError as TraceError,
)
from .fold import fold as fold
from .inject import connect as connect, is_connected as is_connected, lambdas as lambdas
from .io import load as load, save as save
from .layer import PathwayWeight as PathwayWeight, PicklingError as PicklingError
from .optim import param_groups as param_groups
from .plan import Options as Options, plan as plan
from .report import Pair as Pair, Report as Report
from .shapes import NarrowAuxError as NarrowAuxError
from .source import AuxSource as AuxSource, SourceError as SourceError, open_aux as open_aux
from .version import __version__ as __version__
