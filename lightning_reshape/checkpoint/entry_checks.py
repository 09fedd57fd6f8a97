"""Argument checks at the planning entry points (``build_plan``, ``rank_files``,
``plan_rank_load``).

Why: these take plain Python values from callers' code, and a wrong kind of value slipped
through silently (a single file name as ``files`` is iterated as its characters: an empty
plan) or surfaced as a raw ``TypeError``/``ValueError`` deep in the planner. Checked once, at
the entry, with a message naming the argument, the value and the fix.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

from lightning_reshape.errors import LayoutError

__all__ = ["check_file_names", "check_coordinate", "check_rank"]

RANK_AXES = ("tp rank", "pp stage", "dp rank")


def check_file_names(files: Iterable[str] | None, where: str) -> Iterable[str] | None:
    """``files`` as a collection of target file names (None: all); a lone name is refused."""
    if files is None:
        return None
    if isinstance(files, (str, bytes)):
        raise TypeError(
            f"{where}: files={files!r} is one name, not a collection of names; "
            f"pass files=({files!r},)"
        )
    names = tuple(files)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(
            f"{where}: files must hold target file names (str), got {bad[0]!r} "
            f"({type(bad[0]).__name__})"
        )
    return names


def check_coordinate(value: Any, axis: str) -> int:
    """``value`` as a rank coordinate on ``axis``: a non-negative integer (not a bool)."""
    if isinstance(value, bool):
        raise TypeError(f"{axis} must be an integer, got {value!r}")
    try:
        index = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{axis} must be an integer, got {value!r} ({type(value).__name__})"
        ) from None
    if index < 0:
        raise LayoutError(f"{axis} {index} is negative; ranks count from 0")
    return index


def check_rank(rank: Any, where: str) -> tuple[int, int, int]:
    """``rank`` as (tp rank, pp stage, dp rank) non-negative integers; the upper bounds are
    checked against the target by ``rank_files`` once the target is known."""
    if isinstance(rank, (str, bytes)) or not isinstance(rank, (tuple, list)) or len(rank) != 3:
        raise TypeError(
            f"{where}: rank must be (tp rank, pp stage, dp rank), three integers; got {rank!r}"
        )
    tp, pp, dp = (
        check_coordinate(v, f"{where}: {a}") for v, a in zip(rank, RANK_AXES, strict=True)
    )
    return tp, pp, dp
