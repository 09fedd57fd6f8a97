"""One exception family: every error the package raises on bad input derives from ReshapeError.

Each message names the value, key or file at fault and says what the user can do.
"""

from __future__ import annotations


class ReshapeError(Exception):
    """Base class of every error lightning-reshape raises on bad input."""


class TopologyError(ReshapeError, ValueError):
    """A parallel layout that cannot be built (sizes, order, world size)."""


class CheckpointError(ReshapeError):
    """A checkpoint that cannot be read or written as asked."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds a pickled type outside the allow-list."""


class LayoutError(ReshapeError, ValueError):
    """Sizes, degrees or options from which no DeepSpeed layout (ZeRO partitions, pipeline
    stages) can be computed."""


class DistributedError(ReshapeError, RuntimeError):
    """torch.distributed is not in the state the parallel groups need (not initialised, a
    world size or rank that does not match the layout, groups used after destroy)."""
