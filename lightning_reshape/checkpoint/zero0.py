"""ZeRO 0 (data parallel without ZeRO): the write side of its optimizer state.

Why: without ZeRO every data-parallel rank holds the whole optimizer, and DeepSpeed saves it
once, as the plain torch ``optimizer.state_dict()`` inside ``mp_rank_XX_model_states.pt``
(``optimizer`` key; no optimizer files, ``param_shapes`` and ``shared_params`` None). Its state
is keyed by the running parameter index over the param groups, each state tensor has the
parameter's own shape, and ``param_groups[g]["params"]`` lists the indices. Changing dp is then
only rewriting ``dp_world_size``; moving to or from ZeRO 1/2/3 is cutting these whole tensors
into (or joining them from) flat partitions. The read side (optimizer indices matched to module
parameters) lives in :mod:`reader`; this module knows the target's layout only.

Limits: DeepSpeed wraps the optimizer of a bf16/fp16 model at ZeRO 0 in its own fp16 optimizer
(flat fp32 copies, another layout), so a ZeRO 0 target needs an fp32 model. The optimizer is
assumed to hold the trainable parameters only (what ZeRO 1/2/3 keep); one built over frozen
parameters too lists more parameters per group, and torch's ``load_state_dict`` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_reshape.checkpoint.manifest import KeyPath, Manifest
from lightning_reshape.errors import LayoutError

__all__ = ["check_target", "optimizer_items"]

OPTIMIZER: KeyPath = ("optimizer",)


def check_target(manifest: Manifest, config: Mapping[str, Any]) -> None:
    """Refuse a ZeRO 0 target DeepSpeed would not save as a plain torch optimizer state."""
    half = [
        k
        for k in ("fp16", "bf16", "bfloat16")
        if isinstance(config.get(k), Mapping) and config[k].get("enabled")
    ]
    if manifest.model_dtype != "float32" or half:
        raise LayoutError(
            f"target zero_stage=0 with a {manifest.model_dtype} model ({', '.join(half) or 'no'} "
            "in ds_config): DeepSpeed wraps that optimizer in its fp16/bf16 optimizer, whose "
            "layout is not supported as a target yet; convert to ZeRO 1, 2 or 3"
        )


def optimizer_items(
    groups: Sequence[Sequence[str]],
    state_items: Callable[[str, int], list[Any]],
    param_groups: Callable[[KeyPath, Sequence[Sequence[int]]], list[Any]],
) -> list[Any]:
    """Plan items writing the ``optimizer`` entry of a ZeRO 0 model-states file.

    ``groups``: trainable parameter names per optimizer param group, in optimizer order.
    ``state_items(name, index)``: the items filling ``optimizer.state[index]`` for one parameter
    (empty when it has no state). ``param_groups(key, indices)``: the items writing the source's
    param groups at ``key`` with ``params`` set to ``indices`` per group.
    """
    items: list[Any] = []
    from lightning_reshape.checkpoint.plan import SetValue  # plan imports this module

    items.append(SetValue(OPTIMIZER, {}, "raw"))
    items.append(SetValue((*OPTIMIZER, "state"), {}, "raw"))
    index = 0
    indices: list[list[int]] = []
    for names in groups:
        listed = []
        for name in names:
            items.extend(state_items(name, index))
            listed.append(index)
            index += 1
        indices.append(listed)
    items.extend(param_groups((*OPTIMIZER, "param_groups"), indices))
    return items
