"""Lightning glue: the reshaping DeepSpeed strategy and the AutoReshape callback.

Importing this module registers the ``deepspeed_reshape*`` names in Lightning's
``StrategyRegistry`` (``import lightning_reshape`` arranges that lazily).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_reshape.lightning.callback import AutoReshape, ReshapePolicy
from lightning_reshape.lightning.pipeline import (
    PipelineLayers,
    PipelineLightningModule,
    pipeline_step,
)
from lightning_reshape.lightning.strategy import (
    ReshapeDeepSpeedStrategy,
    ResumeReport,
    SavedTopology,
    read_saved_topology,
)

ReshapeDeepSpeedStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "AutoReshape",
    "PipelineLayers",
    "PipelineLightningModule",
    "ReshapeDeepSpeedStrategy",
    "ReshapePolicy",
    "ResumeReport",
    "SavedTopology",
    "pipeline_step",
    "read_saved_topology",
]
