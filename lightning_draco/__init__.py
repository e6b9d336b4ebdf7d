"""Byzantine-resilient distributed training for PyTorch Lightning, built on DRACO.

Importing the package registers the strategy name ``"draco"`` with Lightning, so
``Trainer(strategy="draco")`` works.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_draco import _compat  # noqa: F401  (fails loudly if Lightning renamed what DRACO overrides)
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
from lightning_draco.exchange import CollectiveFailedError, ExchangeState, ps_hook
from lightning_draco.strategy import DracoStrategy, IncompatibleCheckpointError

DracoStrategy.register_strategies(StrategyRegistry)

__version__ = "0.1.0"

__all__ = [
    "Adversary",
    "Code",
    "CollectiveFailedError",
    "CyclicRepetitionCode",
    "DecodeResult",
    "DracoDecodeError",
    "DracoStrategy",
    "ExchangeState",
    "FractionalRepetitionCode",
    "IncompatibleCheckpointError",
    "NonFiniteGradientError",
    "Uncoded",
    "ps_hook",
]
