"""lightning-reshape: resume Lightning + DeepSpeed training at a different parallel layout."""

from lightning_reshape.errors import ReshapeError

__all__ = ["ReshapeError"]
__version__ = "0.1.0"
