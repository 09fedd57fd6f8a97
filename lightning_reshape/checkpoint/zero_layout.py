"""Where DeepSpeed puts every element: the bounds and fragments shared by the ZeRO 1/2,
bf16-optimizer and ZeRO 3 flat layouts and the pipeline stage boundaries, which are computed as
pure functions of names, sizes and degrees in their formats' modules
(:mod:`lightning_reshape.checkpoint.formats.zero12`, ``.zero3``, ``.pipeline``) and can still be
imported from here.

Why: to write a checkpoint that stock DeepSpeed loads at a new (dp, pp, ZeRO stage) we must
produce byte for byte the flat partitions, paddings and ``param_slice_mappings`` DeepSpeed itself
would have produced at that topology. These functions restate DeepSpeed's rules (0.19.x,
``runtime/zero/stage_1_and_2.py``, ``stage3.py``, ``partition_parameters.py``,
``runtime/bf16_optimizer.py``, ``runtime/pipe/module.py``, ``runtime/utils.py``) as arithmetic,
with no torch, no IO and no process group, so a plan can be built and tested anywhere.

Vocabulary: a *group* is one optimizer param group; its trainable parameters are flattened into
one buffer (ZeRO 1/2, bf16) or each parameter is split on its own (ZeRO 3); a *partition* is one
data-parallel rank's share; *bounds* are cumulative offsets ``(0, b1, ..., total)`` cutting a 1-D
extent into consecutive pieces, piece ``i`` being ``[bounds[i], bounds[i + 1])``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_reshape.errors import LayoutError
from lightning_reshape.topology.reshape_map import Segment, overlaps

__all__ = [
    "Fragment",
    "ParamList",
    "Segment",
    "SliceAddress",
    "bounds_from_sizes",
    "overlaps",
]

ParamList = Sequence[tuple[str, int]]


# --------------------------------------------------------------------------------------------
# Bounds. The overlap of two partitions of one extent is the topology layer's ``overlaps``
# (re-exported here): reshaping any flat layout is ``overlaps(old.param_bounds(name),
# new.param_bounds(name))`` plus the fragments' partition offsets.
# --------------------------------------------------------------------------------------------


def bounds_from_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    """Cumulative bounds ``(0, s0, s0 + s1, ...)`` of consecutive pieces of the given sizes."""
    bounds = [0]
    for i, size in enumerate(sizes):
        if size < 0:
            raise LayoutError(f"piece {i} has negative size {size}; sizes must be >= 0.")
        bounds.append(bounds[-1] + size)
    return tuple(bounds)


def _check_bounds(name: str, bounds: Sequence[int]) -> None:
    if len(bounds) < 1 or bounds[0] != 0:
        raise LayoutError(f"{name}={tuple(bounds)!r} must start at 0 (cumulative offsets).")
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b < a:
            raise LayoutError(
                f"{name}={tuple(bounds)!r} decreases ({a} -> {b}); bounds must be sorted."
            )


# --------------------------------------------------------------------------------------------
# Pieces of flat partitions (ZeRO 1/2, bf16 optimizer, ZeRO 3) and the checks the layouts share
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceAddress:
    """DeepSpeed's ``fragment_address``: ``numel`` elements at ``start`` inside a partition."""

    numel: int
    start: int


@dataclass(frozen=True)
class Fragment:
    """The part ``[param_start, param_start + numel)`` of a flattened parameter that dp rank
    ``rank`` holds at ``partition_start`` in its partition."""

    name: str
    rank: int
    param_start: int
    partition_start: int
    numel: int


def _check_params(params: ParamList) -> None:
    if not params:
        raise LayoutError("a param group with no trainable parameters has no flat layout.")
    seen: set[str] = set()
    for name, numel in params:
        if name in seen:
            raise LayoutError(
                f"parameter {name!r} appears twice in one group; names must be unique."
            )
        seen.add(name)
        if numel < 1:
            raise LayoutError(
                f"parameter {name!r} has numel={numel}; DeepSpeed keeps zero-element parameters "
                "out of the optimizer groups (with the frozen ones), so leave it out here too."
            )


def _check_degree(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LayoutError(f"{name}={value!r} must be an integer >= 1.")


# The layouts live with their formats; importable from here as before (resolved when first
# used: the formats' modules build on this one).
_MOVED = {
    **dict.fromkeys(
        (
            "NCCL_START_ALIGNMENT_FACTOR",
            "FlatParam",
            "ZeroGroupLayout",
            "round_robin_order",
            "undo_round_robin",
            "zero_group_layout",
        ),
        "zero12",
    ),
    **dict.fromkeys(
        ("DEFAULT_SUB_GROUP_SIZE", "Zero3Param", "Zero3Layout", "zero3_layout"), "zero3"
    ),
    **dict.fromkeys(
        ("PipelineStages", "partition_balanced", "partition_uniform", "pipeline_stages"),
        "pipeline",
    ),
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"lightning_reshape.checkpoint.formats.{module}"), name)
