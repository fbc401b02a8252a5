"""multimodal-pathway: improve a transformer with the weights of one trained on another modality.

``connect(target, aux)`` pairs every weight layer of the target with its counterpart in the aux
model (by name or by graph position) and trains ``W + lambda * W_aux``; ``fold(model)`` merges it
back into the plain model. See the README for the whole API.
"""

from torch.nn.utils.parametrize import cached as cached

from .errors import (
    CompetingPairsError as CompetingPairsError,
)
from .errors import (
    CoverageError as CoverageError,
)
from .errors import (
    DepthMismatchError as DepthMismatchError,
)
from .errors import (
    DeviceMismatchError as DeviceMismatchError,
)
from .errors import (
    GroupSizeError as GroupSizeError,
)
from .errors import (
    LayoutError as LayoutError,
)
from .errors import (
    NonFiniteError as NonFiniteError,
)
from .errors import (
    NoPairsError as NoPairsError,
)
from .errors import (
    NotConnectedError as NotConnectedError,
)
from .errors import (
    OptionError as OptionError,
)
from .errors import (
    PathwayError as PathwayError,
)
from .errors import (
    SelfConnectionError as SelfConnectionError,
)
from .errors import (
    ShapeMismatchError as ShapeMismatchError,
)
from .errors import (
    TraceError as TraceError,
)
from .fold import fold as fold
from .inject import connect as connect
from .inject import is_connected as is_connected
from .inject import lambdas as lambdas
from .io import load as load
from .io import save as save
from .layer import PathwayWeight as PathwayWeight
from .layer import PicklingError as PicklingError
from .optim import param_groups as param_groups
from .plan import Options as Options
from .plan import plan as plan
from .report import Pair as Pair
from .report import Report as Report
from .shapes import NarrowAuxError as NarrowAuxError
from .source import AuxSource as AuxSource
from .source import SourceError as SourceError
from .source import open_aux as open_aux

__version__ = "0.1.0"
