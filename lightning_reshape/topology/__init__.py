"""Rank arithmetic: parallel layouts, rank grids and reshape maps. Imports nothing from torch."""

from lightning_reshape.topology.config import (
    DEFAULT_ORDER,
    GROUP_KINDS,
    ParallelConfig,
    ParallelLayout,
)
from lightning_reshape.topology.grid import Topology
from lightning_reshape.topology.reshape_map import (
    Degrees,
    Segment,
    model_parallel_map,
    overlaps,
    shard_map,
)

__all__ = [
    "DEFAULT_ORDER",
    "GROUP_KINDS",
    "Degrees",
    "ParallelConfig",
    "ParallelLayout",
    "Segment",
    "Topology",
    "model_parallel_map",
    "overlaps",
    "shard_map",
]
