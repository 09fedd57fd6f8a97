"""The shapes a plan gives one target rank, checked against the model built at that rank.

Why: the tensor-parallel split of each parameter (dim, stride) comes from our sidecar, a rule or
``universal_checkpoint_info``; a wrong dim on shards of equal shape cannot be seen in the source
files (a (6, 8) shard is half of (12, 8) or of (6, 16)), but the model built at the new layout
knows its own shard shapes. Checked before anything is loaded or written, a wrong split is one
error naming the parameter, the split and both shapes, instead of torch's size mismatch inside
DeepSpeed's load (or a reshaped copy written first and refused afterwards).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from lightning_reshape.checkpoint.plan import Plan, SetValue, TensorFill
from lightning_reshape.checkpoint.sidecar import SIDECAR_NAME
from lightning_reshape.errors import CheckpointError

__all__ = ["planned_shapes", "check_target_shapes"]


def planned_shapes(plan: Plan, mp: int) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape the plan gives target model-parallel rank ``mp``: its
    model-states file's ``param_shapes`` (ZeRO 1/2/3, pipeline too) and ``module`` weights
    (ZeRO 0); empty when the plan holds no model-states file of that rank."""
    own = re.compile(rf"(?:^|_)mp_rank_{mp:02d}_model_states\.pt$")
    out: dict[str, tuple[int, ...]] = {}
    for file in plan.files:
        if not own.search(file.name):
            continue
        for item in file.items:
            if isinstance(item, SetValue) and item.key == ("param_shapes",) and item.value:
                for group in item.value:
                    out.update({n: tuple(s) for n, s in group.items()})
            elif (
                isinstance(item, TensorFill)
                and len(item.key) == 2
                and item.key[0] == "module"
                and item.tie is None
                and item.copies
            ):
                out.setdefault(str(item.key[1]), tuple(item.shape))
    return out


def check_target_shapes(plan: Plan, mp: int, model_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse the plan when a parameter's planned shape at target mp rank ``mp`` is not the
    model's (``model_shapes``: name -> this rank's shard shape, ZeRO 3's ``ds_shape``)."""
    for name, shape in planned_shapes(plan, mp).items():
        model = model_shapes.get(name)
        if model is None or tuple(model) == shape:
            continue
        split = plan.sidecar.tp_splits.get(name) if plan.sidecar is not None else None
        declared = "replicated" if split is None else f"dim={split.dim} stride={split.stride}"
        sidecar = os.path.join(plan.source_root, SIDECAR_NAME)
        where = f"as {sidecar} records it" if os.path.isfile(sidecar) else "from the rules given"
        raise CheckpointError(
            f"{name}: the checkpoint's tensor-parallel split ({declared}, {where}) gives this "
            f"rank a shard of shape {shape} at {plan.target}, but the model here has "
            f"{tuple(model)}: the recorded split does not match the model. Correct tp_splits"
            f"[{name!r}] in {sidecar} (or delete that file to fall back to DeepSpeed's own "
            f"metadata), or pass TPRule({name!r}, TPSplit(dim=...))"
        )
