"""torch.distributed groups for a parallel layout, and the ``mpu`` DeepSpeed expects.

Each rank creates only its own groups (``new_group(use_local_synchronization=True)``);
size-1 groups cost no communicator. The caller owns the :class:`ParallelState`.
"""

from lightning_reshape.distributed.self_group import (
    SELF_BACKEND,
    SelfProcessGroup,
    new_self_group,
    register_self_backend,
)
from lightning_reshape.distributed.state import MESH_DIMS, GroupPlan, ParallelState, plan_groups

__all__ = [
    "MESH_DIMS",
    "SELF_BACKEND",
    "GroupPlan",
    "ParallelState",
    "SelfProcessGroup",
    "new_self_group",
    "plan_groups",
    "register_self_backend",
]
