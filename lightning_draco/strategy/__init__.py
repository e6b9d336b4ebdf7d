"""The Lightning strategy and the pieces it wires together (configuration, coded step, checkpoint, skip)."""

from lightning_draco.strategy.checkpoint import IncompatibleCheckpointError
from lightning_draco.strategy.config import DracoConfig
from lightning_draco.strategy.strategy import DracoStrategy

__all__ = ["DracoConfig", "DracoStrategy", "IncompatibleCheckpointError"]
