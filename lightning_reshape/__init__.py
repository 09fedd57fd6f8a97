"""lightning-reshape: resume Lightning + DeepSpeed training at a different parallel layout.

Importing the package registers the ``deepspeed_reshape*`` strategy names in Lightning's
``StrategyRegistry``, without importing Lightning itself (see ``lightning_reshape._register``).
"""

from lightning_reshape._register import install as _install_strategy_registration
from lightning_reshape.errors import ReshapeError

__all__ = ["ReshapeError"]
__version__ = "0.1.0"

_install_strategy_registration()
