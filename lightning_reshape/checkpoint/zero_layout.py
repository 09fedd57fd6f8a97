"""Where DeepSpeed puts every element: ZeRO 1/2, bf16-optimizer and ZeRO 3 flat layouts, and
pipeline stage boundaries, computed as pure functions of names, sizes and degrees.

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

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from lightning_reshape.errors import LayoutError
from lightning_reshape.topology.reshape_map import (
    Segment,
    overlaps,
    padded_boundaries,
    uniform_boundaries,
)

__all__ = [
    "NCCL_START_ALIGNMENT_FACTOR",
    "DEFAULT_SUB_GROUP_SIZE",
    "FlatParam",
    "Fragment",
    "PipelineStages",
    "Segment",
    "SliceAddress",
    "Zero3Layout",
    "Zero3Param",
    "ZeroGroupLayout",
    "bounds_from_sizes",
    "overlaps",
    "partition_balanced",
    "partition_uniform",
    "pipeline_stages",
    "round_robin_order",
    "undo_round_robin",
    "zero3_layout",
    "zero_group_layout",
]

#: ZeRO 1/2 and the bf16 optimizer pad each group's flat buffer to a multiple of this factor
#: times the dp world size, whatever the dtype ("4-byte alignment / sizeof(fp16)" in DeepSpeed).
NCCL_START_ALIGNMENT_FACTOR = 2

#: DeepSpeed's config default for ``zero_optimization.sub_group_size`` (ZeRO 3).
DEFAULT_SUB_GROUP_SIZE = 1_000_000_000

ParamList = Sequence[tuple[str, int]]


# --------------------------------------------------------------------------------------------
# Bounds. The overlap of two partitions of one extent is the topology layer's ``overlaps``
# (re-exported here): reshaping any layout below is ``overlaps(old.param_bounds(name),
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
# ZeRO 1/2 and the bf16 optimizer: one flat buffer per group, cut into dp equal partitions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceAddress:
    """DeepSpeed's ``fragment_address``: ``numel`` elements at ``start`` inside a partition."""

    numel: int
    start: int


@dataclass(frozen=True)
class FlatParam:
    """One parameter's place in a group's flat buffer (the real place of its data)."""

    name: str
    numel: int
    flat_offset: int
    #: zeros DeepSpeed inserts after it (``parameter_alignment``); written as
    #: ``param_alignment_paddings``.
    alignment_padding: int


@dataclass(frozen=True)
class Fragment:
    """The part ``[param_start, param_start + numel)`` of a flattened parameter that dp rank
    ``rank`` holds at ``partition_start`` in its partition."""

    name: str
    rank: int
    param_start: int
    partition_start: int
    numel: int


def round_robin_order(num_params: int, dp: int) -> tuple[int, ...]:
    """The order ``round_robin_gradients`` flattens a group in: original indices taken by
    ``index % dp`` classes (0, dp, 2dp, ..., then 1, dp + 1, ...), so that consecutive gradients
    belong to different ranks. Depends on dp, so it changes when dp changes."""
    return tuple(i for j in range(dp) for i in range(j, num_params, dp))


def undo_round_robin(names: Sequence[str], dp: int) -> tuple[str, ...]:
    """The original (optimizer group) order of parameters saved in round-robin order at ``dp``,
    e.g. a source checkpoint's ``param_shapes`` written with ``round_robin_gradients``."""
    order = round_robin_order(len(names), dp)
    original: list[str] = [""] * len(names)
    for position, index in enumerate(order):
        original[index] = names[position]
    return tuple(original)


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


@dataclass(frozen=True)
class ZeroGroupLayout:
    """One param group's flat layout under ZeRO 1/2 (``optimizer="zero"``) or the bf16 optimizer
    (``optimizer="bf16"``) at a given dp: what DeepSpeed holds and what it writes per rank."""

    optimizer: Literal["zero", "bf16"]
    dp: int
    #: parameters in flat-buffer order, which is the ``param_shapes`` order of model states
    params: tuple[FlatParam, ...]
    #: flat buffer size including per-parameter and tail padding (a multiple of 2 * dp)
    flat_numel: int
    #: every rank's partition has this many elements (padding included)
    partition_size: int
    #: ``group_paddings`` entry each rank writes for this group
    group_paddings: tuple[int, ...]
    #: per rank, ``param_slice_mappings`` as DeepSpeed writes it (names in optimizer order;
    #: computed per rank when first read)
    slice_mappings: Sequence[Mapping[str, SliceAddress]]

    @property
    def numel(self) -> int:
        """Elements of real parameter data in the group."""
        return sum(p.numel for p in self.params)

    @property
    def param_alignment_paddings(self) -> tuple[int, ...]:
        """What ZeRO 1/2 writes as ``param_alignment_paddings`` for this group."""
        return tuple(p.alignment_padding for p in self.params)

    def saved_partition_numel(self, rank: int) -> int:
        """Length of ``single_partition_of_fp32_groups`` (and of each flat optimizer state) that
        ``rank`` writes: ZeRO 1/2 strip its tail padding, the bf16 optimizer does not."""
        if self.optimizer == "bf16":
            return self.partition_size
        return self.partition_size - self.group_paddings[rank]

    def param(self, name: str) -> FlatParam:
        """The flat placement of one parameter."""
        for p in self.params:
            if p.name == name:
                return p
        raise LayoutError(f"parameter {name!r} is not in this group; known: {self._names()}.")

    def param_bounds(self, name: str) -> tuple[int, ...]:
        """Bounds over the flattened parameter of the piece each rank holds (empty if none)."""
        p = self.param(name)
        return tuple(
            min(max(r * self.partition_size - p.flat_offset, 0), p.numel)
            for r in range(self.dp + 1)
        )

    def fragments(self, name: str) -> tuple[Fragment, ...]:
        """Every rank's non-empty piece of one parameter, in rank order."""
        p = self.param(name)
        bounds = self.param_bounds(name)
        out = []
        for r in range(self.dp):
            if bounds[r + 1] > bounds[r]:
                start = p.flat_offset + bounds[r] - r * self.partition_size
                out.append(Fragment(name, r, bounds[r], start, bounds[r + 1] - bounds[r]))
        return tuple(out)

    def rank_fragments(self, rank: int) -> tuple[Fragment, ...]:
        """The pieces of parameters in ``rank``'s partition, in flat (partition offset) order."""
        lo, hi = rank * self.partition_size, (rank + 1) * self.partition_size
        out = []
        for p in self.params:
            start, end = max(lo, p.flat_offset), min(hi, p.flat_offset + p.numel)
            if end > start:
                out.append(Fragment(p.name, rank, start - p.flat_offset, start - lo, end - start))
        return tuple(out)

    def _names(self) -> str:
        names = [p.name for p in self.params]
        return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def zero_group_layout(
    params: ParamList,
    dp: int,
    *,
    optimizer: Literal["zero", "bf16"] = "zero",
    round_robin_gradients: bool = False,
    parameter_alignment: bool = False,
    element_size: int = 2,
) -> ZeroGroupLayout:
    """The flat layout DeepSpeed builds for one param group at data-parallel size ``dp``.

    ``params`` lists ``(name, numel)`` of the group's trainable parameters in optimizer order
    (the order the model gave the optimizer; for a checkpoint saved with
    ``round_robin_gradients``, undo that with :func:`undo_round_robin` first). ``dp`` is the
    group's data-parallel size (the expert-data-parallel size for an MoE group).
    ``round_robin_gradients`` and ``parameter_alignment`` are the ``zero_optimization`` flags
    (ZeRO 1/2 only); ``element_size`` is the bytes per element of the model's parameters, which
    decides the per-parameter alignment (``16 // gcd(16, element_size)`` elements).
    """
    _check_params(params)
    _check_degree("dp", dp)
    if optimizer not in ("zero", "bf16"):
        raise LayoutError(f"optimizer={optimizer!r} must be 'zero' (ZeRO 1/2) or 'bf16'.")
    if optimizer == "bf16" and (round_robin_gradients or parameter_alignment):
        raise LayoutError(
            "the bf16 optimizer has no round_robin_gradients or parameter_alignment; "
            "pass them only with optimizer='zero'."
        )
    if parameter_alignment and element_size < 1:
        raise LayoutError(f"element_size={element_size} must be the bytes per element (>= 1).")

    order = round_robin_order(len(params), dp) if round_robin_gradients else range(len(params))
    flat_params = [params[i] for i in order]
    param_align = 16 // math.gcd(16, element_size) if parameter_alignment else 1

    # Per-parameter alignment: zeros after every parameter but the last.
    placed: list[FlatParam] = []
    cursor = 0
    for k, (name, numel) in enumerate(flat_params):
        offset = cursor
        cursor += numel
        pad = 0 if k == len(flat_params) - 1 else (-cursor) % param_align
        cursor += pad
        placed.append(FlatParam(name, numel, offset, pad))
    padded_numel = cursor

    # Tail padding so that every rank's partition is equal and starts 4-byte aligned.
    alignment = NCCL_START_ALIGNMENT_FACTOR * dp
    flat_numel = -(-padded_numel // alignment) * alignment
    partition_size = flat_numel // dp

    if optimizer == "bf16":
        # The bf16 optimizer books all tail padding on the last rank, even when it spills into
        # earlier partitions.
        group_paddings = tuple(0 if r < dp - 1 else flat_numel - padded_numel for r in range(dp))
    else:
        group_paddings = tuple(
            min(partition_size, max(0, (r + 1) * partition_size - padded_numel)) for r in range(dp)
        )

    slice_mappings = _slice_mappings(params, placed, dp, partition_size)
    return ZeroGroupLayout(
        optimizer=optimizer,
        dp=dp,
        params=tuple(placed),
        flat_numel=flat_numel,
        partition_size=partition_size,
        group_paddings=group_paddings,
        slice_mappings=slice_mappings,
    )


class _SliceMappings(Sequence[Mapping[str, SliceAddress]]):
    """``param_slice_mappings`` of every rank, each computed when first asked for: a rank
    planning its own files must not pay for the other ranks' (O(dp x parameters))."""

    def __init__(
        self, params: ParamList, offsets: Sequence[int], dp: int, partition_size: int
    ) -> None:
        self._params = tuple(params)
        self._param_offsets = tuple(offsets)
        self._dp = dp
        self._size = partition_size
        # the parameters' extents in flat order: each rank's are a run of them
        self._by_offset = sorted(range(len(offsets)), key=lambda i: offsets[i])
        self._offsets = [offsets[i] for i in self._by_offset]
        self._ends = [offsets[i] + params[i][1] for i in self._by_offset]
        self._cache: dict[int, Mapping[str, SliceAddress]] = {}

    def __len__(self) -> int:
        return self._dp

    def __getitem__(self, rank: int) -> Mapping[str, SliceAddress]:  # type: ignore[override]
        if not isinstance(rank, int):
            return tuple(self)[rank]
        if rank < 0:
            rank += self._dp
        if not 0 <= rank < self._dp:
            raise IndexError(rank)
        if rank not in self._cache:
            self._cache[rank] = self._rank(rank)
        return self._cache[rank]

    def _rank(self, rank: int) -> Mapping[str, SliceAddress]:
        lo, hi = rank * self._size, (rank + 1) * self._size
        found = []
        k = bisect.bisect_right(self._ends, lo)  # the first extent ending after lo
        while k < len(self._offsets) and self._offsets[k] < hi:
            found.append(self._by_offset[k])
            k += 1
        mapping: dict[str, SliceAddress] = {}
        for i in sorted(found):  # names in optimizer order
            (name, numel), offset = self._params[i], self._param_offsets[i]
            start, end = max(lo, offset), min(hi, offset + numel)
            if end > start:
                mapping[name] = SliceAddress(numel=end - start, start=start - lo)
        return MappingProxyType(mapping)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]


def _slice_mappings(
    params: ParamList, placed: Sequence[FlatParam], dp: int, partition_size: int
) -> Sequence[Mapping[str, SliceAddress]]:
    """``param_slice_mappings`` the way DeepSpeed derives them (``link_hp_params``).

    Names come in optimizer order. With per-parameter padding DeepSpeed passes the real flat
    offsets; without it, it recomputes offsets by summing numels in optimizer order, which
    ignores a round-robin reordering: with ``round_robin_gradients`` and no
    ``parameter_alignment`` the written mappings do not say where the data is whenever the
    reordering moves parameters of different sizes (seen in files DeepSpeed 0.19.8 wrote; the
    data itself follows :meth:`ZeroGroupLayout.rank_fragments`).
    """
    if any(p.alignment_padding for p in placed):
        by_name = {p.name: p.flat_offset for p in placed}
        offsets = [by_name[name] for name, _ in params]
    else:
        offsets = list(bounds_from_sizes([numel for _, numel in params])[:-1])
    return _SliceMappings(params, offsets, dp, partition_size)


# --------------------------------------------------------------------------------------------
# ZeRO 3: every parameter split on its own, partitions concatenated per sub-group
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Zero3Param:
    """One parameter under ZeRO 3: padded to a multiple of dp and cut into dp equal pieces; each
    rank's piece sits at ``offset`` in fp32 flat group ``sub_group`` (same offset on every rank)."""

    name: str
    numel: int
    padded_numel: int
    partition_numel: int
    group: int
    sub_group: int
    offset: int

    def param_bounds(self) -> tuple[int, ...]:
        """Bounds over the flattened (unpadded) parameter of the piece each rank holds: pieces of
        ``partition_numel``, the last one(s) short or empty where the padding is."""
        return tuple(padded_boundaries(self.numel, self.padded_numel // self.partition_numel))

    def rank_bounds(self, rank: int) -> tuple[int, int]:
        """``param_bounds()[rank : rank + 2]``, without computing the other ranks'."""
        step = -(-self.numel // (self.padded_numel // self.partition_numel))
        return min(rank * step, self.numel), min((rank + 1) * step, self.numel)


@dataclass(frozen=True)
class Zero3Layout:
    """All trainable parameters' ZeRO 3 placement at a given dp and ``sub_group_size``."""

    dp: int
    sub_group_size: int | None
    #: parameters in ``param_shapes`` order (sub-group by sub-group)
    params: tuple[Zero3Param, ...]
    #: per fp32 flat group (= sub-group, across all param groups): its length on every rank
    sub_group_numels: tuple[int, ...]
    #: per sub-group, the param group it came from
    sub_group_to_group: tuple[int, ...]

    def param(self, name: str) -> Zero3Param:
        """The placement of one parameter."""
        for p in self.params:
            if p.name == name:
                return p
        raise LayoutError(f"parameter {name!r} is not in this ZeRO 3 layout.")

    def param_bounds(self, name: str) -> tuple[int, ...]:
        """Bounds over the flattened parameter of the piece each rank holds (as for ZeRO 1/2)."""
        return self.param(name).param_bounds()

    def sub_group_params(self, sub_group: int) -> tuple[Zero3Param, ...]:
        """The parameters of one fp32 flat group, in order (one ``param_shapes`` dict)."""
        return tuple(p for p in self.params if p.sub_group == sub_group)

    def fragments(self, name: str) -> tuple[Fragment, ...]:
        """Every rank's non-empty piece of one parameter; ``partition_start`` is the offset in
        that rank's fp32 flat group ``sub_group``. Ranks holding only padding are left out."""
        p = self.param(name)
        bounds = p.param_bounds()
        return tuple(
            Fragment(name, r, bounds[r], p.offset, bounds[r + 1] - bounds[r])
            for r in range(self.dp)
            if bounds[r + 1] > bounds[r]
        )


def zero3_layout(
    groups: Sequence[ParamList],
    dp: int,
    *,
    sub_group_size: int | None = DEFAULT_SUB_GROUP_SIZE,
) -> Zero3Layout:
    """The ZeRO 3 layout DeepSpeed builds for the given param groups at ``dp``.

    ``groups`` lists, per optimizer param group, ``(name, numel)`` of its trainable parameters
    in optimizer order. A group is split into sub-groups (one fp32 flat tensor each, written as
    ``fp32_flat_groups``) by summing partition sizes and closing a sub-group as soon as the sum
    reaches ``sub_group_size``; a group whose total is at most ``sub_group_size`` (or with
    ``sub_group_size=None``) stays whole. Parameter groups that DeepSpeed splits further by
    process group (MoE experts, hpZ) are not modelled: pass each such split as its own group.
    """
    _check_degree("dp", dp)
    if sub_group_size is not None and sub_group_size < 0:
        raise LayoutError(f"sub_group_size={sub_group_size} must be >= 0 (DeepSpeed default 1e9).")
    params_out: list[Zero3Param] = []
    sub_numels: list[int] = []
    sub_to_group: list[int] = []
    for g, group in enumerate(groups):
        _check_params(group)
        parts = [-(-numel // dp) for _, numel in group]
        total = sum(parts)
        single = sub_group_size is None or sub_group_size >= total
        offset = 0
        for k, ((name, numel), part) in enumerate(zip(group, parts, strict=True)):
            if offset == 0:
                sub_to_group.append(g)
                sub_numels.append(0)
            params_out.append(
                Zero3Param(name, numel, part * dp, part, g, len(sub_numels) - 1, offset)
            )
            offset += part
            sub_numels[-1] = offset
            last = k == len(group) - 1
            if last or (not single and offset >= sub_group_size):  # type: ignore[operator]
                offset = 0
    names = [p.name for p in params_out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise LayoutError(f"parameter {dup!r} appears in more than one group.")
    return Zero3Layout(
        dp=dp,
        sub_group_size=sub_group_size,
        params=tuple(params_out),
        sub_group_numels=tuple(sub_numels),
        sub_group_to_group=tuple(sub_to_group),
    )


# --------------------------------------------------------------------------------------------
# Pipeline stages
# --------------------------------------------------------------------------------------------


def partition_uniform(num_items: int, num_parts: int) -> tuple[int, ...]:
    """Bounds cutting ``num_items`` into ``num_parts`` runs as DeepSpeed's ``partition_uniform``:
    sizes differ by at most one, the larger ones first; with fewer items than parts, one item per
    part and empty parts at the end."""
    _check_degree("num_parts", num_parts)
    if num_items < 0:
        raise LayoutError(f"num_items={num_items} must be >= 0.")
    return tuple(uniform_boundaries(num_items, num_parts))


def partition_balanced(weights: Sequence[int], num_parts: int) -> tuple[int, ...]:
    """Bounds cutting ``weights`` into ``num_parts`` non-empty runs as DeepSpeed's
    ``partition_balanced``: minimise (heaviest run - lightest run); among equally good cuts the
    one found last wins (the last run as short as possible, then the one before, ...). Falls back
    to :func:`partition_uniform` when there are no more items than parts. O(n^2 * parts)."""
    _check_degree("num_parts", num_parts)
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    prefix = bounds_from_sizes([int(w) for w in weights]) if all(w >= 0 for w in weights) else None
    if prefix is None:
        raise LayoutError("layer weights must be >= 0 (trainable parameter counts).")
    # best[j][i] = (cost, heaviest, lightest, cut) for the first i items in j runs, or None.
    best: list[list[tuple[int, int, int | None, int] | None]] = [
        [None] * (n + 1) for _ in range(m + 1)
    ]
    best[0][0] = (0, 0, None, 0)
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            chosen = None
            for k in range(i):
                prev = best[j - 1][k]
                if prev is None:
                    continue
                run = prefix[i] - prefix[k]
                heaviest = max(prev[1], run)
                lightest = run if prev[2] is None else min(prev[2], run)
                cost = heaviest - lightest
                if chosen is None or chosen[0] >= cost:
                    chosen = (cost, heaviest, lightest, k)
            best[j][i] = chosen
    parts = [n]
    for j in range(m, 0, -1):
        entry = best[j][parts[-1]]
        assert entry is not None  # n > m makes every state on the way back reachable
        parts.append(entry[3])
    return tuple(reversed(parts))


@dataclass(frozen=True)
class PipelineStages:
    """Which layers each pipeline stage owns: stage ``s`` has layers ``parts[s]:parts[s + 1]``
    (DeepSpeed's ``PipelineModule.parts``)."""

    parts: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.parts) - 1

    @property
    def num_layers(self) -> int:
        return self.parts[-1]

    def layers(self, stage: int) -> range:
        """Global indices of the layers of ``stage``."""
        if not 0 <= stage < self.num_stages:
            raise LayoutError(f"stage={stage} is outside 0..{self.num_stages - 1}.")
        return range(self.parts[stage], self.parts[stage + 1])

    def stage_of(self, layer: int) -> int:
        """The stage owning global layer index ``layer``."""
        if not 0 <= layer < self.num_layers:
            raise LayoutError(f"layer={layer} is outside 0..{self.num_layers - 1}.")
        for s in range(self.num_stages):
            if layer < self.parts[s + 1]:
                return s
        raise AssertionError("unreachable")


def pipeline_stages(
    num_layers: int,
    pp: int,
    method: Literal["uniform", "parameters", "explicit"] = "parameters",
    *,
    layer_params: Sequence[int] | None = None,
    boundaries: Sequence[int] | None = None,
) -> PipelineStages:
    """The stage boundaries of a ``PipelineModule`` with ``num_layers`` layer specs at ``pp``.

    ``method`` is DeepSpeed's ``partition_method``: ``"uniform"`` (equal layer counts) or
    ``"parameters"`` (balanced by ``layer_params``, the trainable parameter count of each layer,
    DeepSpeed's default); ``"explicit"`` takes ``boundaries`` (``pp + 1`` sorted offsets from 0 to
    ``num_layers``) as given. DeepSpeed's ``"type:REGEX"`` is :func:`partition_balanced` over 0/1
    weights marking the matching layers.
    """
    _check_degree("pp", pp)
    if num_layers < 0:
        raise LayoutError(f"num_layers={num_layers} must be >= 0.")
    method_l = method.lower()
    if method_l == "uniform":
        parts = partition_uniform(num_layers, pp)
    elif method_l == "parameters":
        if layer_params is None or len(layer_params) != num_layers:
            got = None if layer_params is None else len(layer_params)
            raise LayoutError(
                f"method='parameters' needs layer_params with one count per layer "
                f"({num_layers}), got {got}."
            )
        parts = partition_balanced(layer_params, pp)
    elif method_l == "explicit":
        if boundaries is None:
            raise LayoutError("method='explicit' needs boundaries=(0, ..., num_layers).")
        parts = tuple(int(b) for b in boundaries)
        if len(parts) != pp + 1 or parts[0] != 0 or parts[-1] != num_layers:
            raise LayoutError(
                f"boundaries={parts!r} must hold pp + 1 = {pp + 1} offsets from 0 to "
                f"num_layers={num_layers}."
            )
        _check_bounds("boundaries", parts)
    else:
        raise LayoutError(
            f"method={method!r} is not one of 'uniform', 'parameters', 'explicit'; for "
            "DeepSpeed's 'type:REGEX' pass 0/1 weights to partition_balanced."
        )
    return PipelineStages(parts)
