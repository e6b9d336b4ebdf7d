"""Byzantine-resilient distributed training for PyTorch Lightning, built on DRACO.

Importing the package registers the strategy name ``"draco"`` with Lightning, so
``Trainer(strategy="draco")`` works.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_draco.adversary import Adversary
from lightning_draco.codes import (
    Code,
    CyclicRepetitionCode,
    DecodeResult,
    DracoDecodeError,
    FractionalRepetitionCode,
    NonFiniteGradientError,
    Uncoded,
)
from lightning_draco.hook import DracoHookState, draco_hook
from lightning_draco.strategy import DracoStrategy, IncompatibleCheckpointError

DracoStrategy.register_strategies(StrategyRegistry)

__version__ = "0.1.0"

__all__ = [
    "Adversary",
    "Code",
    "CyclicRepetitionCode",
    "DecodeResult",
    "DracoDecodeError",
    "DracoHookState",
    "DracoStrategy",
    "FractionalRepetitionCode",
    "IncompatibleCheckpointError",
    "NonFiniteGradientError",
    "Uncoded",
    "draco_hook",
]
