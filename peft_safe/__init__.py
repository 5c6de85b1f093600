"""peft_safe: SAFE (Selective Adapter FrEezing) as a peft tuner.

Importing this package registers the ``"SAFE"`` peft type (and the bottleneck and BitFit tuners) with peft,
so ``get_peft_model``, ``PeftModel.from_pretrained`` and ``AutoPeftModel*`` work with them.
"""

from ._registry import register as _register
from .config import SAFEConfig
from .core.state import FreezeState
from .integrations.measure_callback import MeasureCallback
from .integrations.trainer import SAFECallback
from .measure import TrainingMeter
from .tuners.bitfit import BitFitConfig, BitFitModel
from .tuners.bottleneck import BottleneckConfig, BottleneckModel, HoulsbyConfig, PfeifferConfig
from .tuners.safe import SAFEModel

_register()

__version__ = "0.1.0"

__all__ = [
    "BitFitConfig",
    "BitFitModel",
    "BottleneckConfig",
    "BottleneckModel",
    "HoulsbyConfig",
    "MeasureCallback",
    "PfeifferConfig",
    "FreezeState",
    "SAFECallback",
    "SAFEConfig",
    "SAFEModel",
    "TrainingMeter",
    "__version__",
]
