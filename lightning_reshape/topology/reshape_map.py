"""Reshape maps: which old shards overlap each new shard when tp, pp or dp changes.

Everything reduces to one primitive: two partitions of the same 1-D extent (a split
tensor dim, a list of layers, a flat ZeRO buffer) and the segments where they overlap.
Growing, shrinking and ratios that do not divide (dp 3 -> 2, pp 3 -> 2) are all the
same computation, unlike DeepSpeed's ``reshape_meg_2d_parallel`` which only shrinks by
exact divisors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

from lightning_reshape.errors import TopologyError


@dataclass(frozen=True)
class Segment:
    """``length`` elements at ``old_offset`` in old piece ``old_index`` land at ``new_offset``."""

    old_index: int
    old_offset: int
    new_offset: int
    length: int


@dataclass(frozen=True)
class Degrees:
    """The three axes a checkpoint's files are laid out by."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            if getattr(self, name) < 1:
                raise TopologyError(f"{name}={getattr(self, name)} is below 1.")

    def __str__(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp}"


def even_boundaries(extent: int, parts: int, what: str = "extent") -> list[int]:
    """Boundaries of ``parts`` equal pieces of ``extent``; refuses a remainder."""
    if parts < 1:
        raise TopologyError(f"cannot split {what} into {parts} parts; use at least 1.")
    if extent % parts:
        raise TopologyError(
            f"{what} of size {extent} does not split into {parts} equal parts; choose a degree "
            f"that divides {extent}."
        )
    step = extent // parts
    return [i * step for i in range(parts + 1)]


def uniform_boundaries(count: int, parts: int) -> list[int]:
    """Split ``count`` items into ``parts`` runs, the first ``count % parts`` one longer.

    This is how DeepSpeed's pipeline engine assigns layers to stages with
    ``partition_method="uniform"``; with fewer items than parts, trailing parts are empty.
    """
    if parts < 1:
        raise TopologyError(f"cannot split {count} items into {parts} parts; use at least 1.")
    if count <= parts:
        return [min(p, count) for p in range(parts + 1)]
    size, extra = divmod(count, parts)
    return [p * size + min(p, extra) for p in range(parts + 1)]


def padded_boundaries(extent: int, parts: int) -> list[int]:
    """ZeRO-style split: pieces of ``ceil(extent / parts)``, the last ones short (padding)."""
    if parts < 1:
        raise TopologyError(f"cannot split {extent} elements into {parts} parts.")
    step = -(-extent // parts)
    return [min(i * step, extent) for i in range(parts + 1)]


def overlaps(old: Sequence[int], new: Sequence[int]) -> list[list[Segment]]:
    """For each new piece, the segments of old pieces that fill it, in order.

    ``old`` and ``new`` are boundary lists (``[0, b1, ..., extent]``) of the same extent.
    Runs in O(old pieces + new pieces).
    """
    if not old or not new or old[0] != 0 or new[0] != 0 or old[-1] != new[-1]:
        raise TopologyError(
            f"partitions {list(old)} and {list(new)} do not cover the same extent from 0."
        )
    result: list[list[Segment]] = []
    i = 0
    for j in range(len(new) - 1):
        lo, hi = new[j], new[j + 1]
        pieces: list[Segment] = []
        while i < len(old) - 1 and old[i + 1] <= lo and old[i + 1] < hi:
            i += 1
        k = i
        while k < len(old) - 1 and old[k] < hi:
            start, end = max(lo, old[k]), min(hi, old[k + 1])
            if end > start:
                pieces.append(Segment(k, start - old[k], start - lo, end - start))
            k += 1
        result.append(pieces)
    return result


def sources(old: Sequence[int], new: Sequence[int]) -> list[list[int]]:
    """For each new piece, the indices of the old pieces it overlaps."""
    return [[s.old_index for s in segs] for segs in overlaps(old, new)]


def tp_map(old_tp: int, new_tp: int) -> list[list[int]]:
    """Old tensor-parallel ranks whose slice of an evenly split dim overlaps each new rank's."""
    extent = math.lcm(old_tp, new_tp)
    return sources(even_boundaries(extent, old_tp), even_boundaries(extent, new_tp))


def dp_map(old_dp: int, new_dp: int) -> list[list[int]]:
    """Old data-parallel ranks whose share of an evenly split flat buffer overlaps each new one."""
    return tp_map(old_dp, new_dp)


def pp_map(old_pp: int, new_pp: int, num_layers: int) -> list[list[int]]:
    """Old pipeline stages holding layers that each new stage needs (uniform assignment)."""
    if num_layers < 1:
        raise TopologyError(f"num_layers={num_layers}; a pipeline needs at least one layer.")
    return sources(uniform_boundaries(num_layers, old_pp), uniform_boundaries(num_layers, new_pp))


def model_parallel_map(
    old: Degrees, new: Degrees, num_layers: int
) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """For each new (pp, tp) position, the old (pp, tp) positions it reads, pp-major.

    Where DeepSpeed's ``reshape_meg_2d_parallel`` works (shrinking by divisors, layers
    spread evenly) this is the same map, with old positions as ``pp * old.tp + tp``.
    """
    pp_sources = pp_map(old.pp, new.pp, num_layers)
    tp_sources = tp_map(old.tp, new.tp)
    return {
        (p, t): [(op, ot) for op in pp_sources[p] for ot in tp_sources[t]]
        for p, t in product(range(new.pp), range(new.tp))
    }


def shard_map(
    old: Degrees, new: Degrees, num_layers: int
) -> dict[tuple[int, int, int], list[tuple[int, int, int]]]:
    """For each new (tp, pp, dp) shard, the old (tp, pp, dp) shards that overlap it."""
    mp = model_parallel_map(old, new, num_layers)
    dp_sources = dp_map(old.dp, new.dp)
    return {
        (t, p, d): [(ot, op, od) for op, ot in mp[(p, t)] for od in dp_sources[d]]
        for t, p, d in product(range(new.tp), range(new.pp), range(new.dp))
    }
