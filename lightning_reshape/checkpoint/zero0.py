"""ZeRO 0 (data parallel without ZeRO): the write side of its optimizer state.

Why: without ZeRO every data-parallel rank holds the whole optimizer, and DeepSpeed saves it
once, as the plain torch ``optimizer.state_dict()`` inside ``mp_rank_XX_model_states.pt``
(``optimizer`` key; no optimizer files, ``param_shapes`` and ``shared_params`` None). Its state
is keyed by the running parameter index over the param groups, each state tensor has the
parameter's own shape, and ``param_groups[g]["params"]`` lists the indices. Changing dp is then
only rewriting ``dp_world_size``; moving to or from ZeRO 1/2/3 is cutting these whole tensors
into (or joining them from) flat partitions. The read side (optimizer indices matched to module
parameters) lives in :mod:`reader`; this module knows the target's layout only.

With a bf16 model DeepSpeed wraps that optimizer in its unfused fp16 optimizer (bf16 mode): the
torch state dict moves to ``optimizer.optimizer_state_dict``, beside the loss-scale entries and
``fp32_groups`` (a whole fp32 copy per parameter). An fp16 model's dynamic loss scaling and the
fused (flat) variant are not supported. The optimizer is assumed to hold the trainable
parameters only (what ZeRO 1/2/3 keep); one built over frozen parameters too lists more
parameters per group, and torch's ``load_state_dict`` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_reshape.checkpoint.manifest import KeyPath, Manifest
from lightning_reshape.errors import LayoutError

__all__ = ["optimizer_items", "target_wrapper"]

OPTIMIZER: KeyPath = ("optimizer",)


def target_wrapper(manifest: Manifest, config: Mapping[str, Any]) -> str:
    """How DeepSpeed saves a ZeRO 0 optimizer for this config: ``none`` (fp32 model: the plain
    torch state dict) or ``bf16`` (bf16 model: its unfused fp16 optimizer in bf16 mode, which
    keeps a whole fp32 copy of every parameter in ``fp32_groups``). Refuses the rest."""

    def enabled(key: str) -> bool:
        return isinstance(config.get(key), Mapping) and bool(config[key].get("enabled"))

    bf16 = enabled("bf16") or enabled("bfloat16")
    if manifest.model_dtype == "float32" and not bf16 and not enabled("fp16"):
        return "none"
    if manifest.model_dtype == "bfloat16" and bf16:
        return "bf16"
    raise LayoutError(
        f"target zero_stage=0 with a {manifest.model_dtype} model: DeepSpeed's fp16 optimizer "
        "without ZeRO (dynamic loss scaling) is not supported as a target; convert to ZeRO 1, "
        "2 or 3"
    )


def optimizer_items(
    groups: Sequence[Sequence[str]],
    wrapper: str,
    state_items: Callable[[str, int, KeyPath], list[Any]],
    param_groups: Callable[[KeyPath, Sequence[Sequence[int]]], list[Any]],
    master: Callable[[str, KeyPath], Any],
    top: Sequence[Any] = (),
) -> list[Any]:
    """Plan items writing the ``optimizer`` entry of a ZeRO 0 model-states file.

    ``groups``: trainable parameter names per optimizer param group, in optimizer order.
    ``state_items(name, index, inner)``: the items filling ``inner + ("state", index)`` for one
    parameter (empty when it has no state). ``param_groups(key, indices)``: the items writing the
    source's param groups at ``key`` with ``params`` set to ``indices`` per group.
    ``master(name, key)``: the fill of a parameter's fp32 copy at ``key`` (``bf16`` only), and
    ``top`` the wrapper's loss-scale entries written before its torch state dict.
    """
    from lightning_reshape.checkpoint.plan import SetValue  # plan imports this module

    items: list[Any] = [SetValue(OPTIMIZER, {}, "raw")]
    inner = OPTIMIZER
    if wrapper == "bf16":
        inner = (*OPTIMIZER, "optimizer_state_dict")
        items += [*top, SetValue(inner, {}, "raw")]
    items.append(SetValue((*inner, "state"), {}, "raw"))
    index = 0
    indices: list[list[int]] = []
    for names in groups:
        listed = []
        for name in names:
            items.extend(state_items(name, index, inner))
            listed.append(index)
            index += 1
        indices.append(listed)
    items.extend(param_groups((*inner, "param_groups"), indices))
    if wrapper == "bf16":
        items.append(SetValue((*OPTIMIZER, "fp32_groups"), len(groups), "list"))
        for g, names in enumerate(groups):
            items.append(SetValue((*OPTIMIZER, "fp32_groups", g), len(names), "list"))
            items.extend(
                master(name, (*OPTIMIZER, "fp32_groups", g, i)) for i, name in enumerate(names)
            )
    return items
