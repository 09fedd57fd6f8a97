"""ZeRO 3 partitions: ``zero_pp_rank_D_mp_rank_XX_model_states.pt`` and
``[bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt``, one of each per dp rank.

Why: ZeRO 3 splits every parameter on its own into dp equal parts (the last padded) and packs a
rank's parts into flat sub-groups of at most ``sub_group_size`` elements, several per param
group when the group is larger; each rank's optimizer file holds its ``fp32_flat_groups`` (one
per sub-group) and a nested torch ``optimizer_state_dict`` whose state per sub-group is flat,
and its model file holds placeholders plus its slice of each frozen parameter. The layout
arithmetic is :func:`zero_layout.zero3_layout`; this module writes DeepSpeed's files around it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning_reshape.checkpoint.formats import model_states
from lightning_reshape.checkpoint.formats.zero12 import (
    OSD,
    Item,
    check_steps,
    flat_state_keys,
    optim_refs,
    optimizer_top,
    record_scalars,
)
from lightning_reshape.checkpoint.manifest import (
    ROLE_FP32,
    ROLE_OPTIM,
    ROLE_PARAM,
    KeyPath,
    Piece,
    SourceTopology,
)
from lightning_reshape.checkpoint.plan import Copy, SetValue, TargetFile, TensorFill
from lightning_reshape.checkpoint.reader import _dtype_name, _prod, _shape
from lightning_reshape.checkpoint.torchfile import is_tensor
from lightning_reshape.checkpoint.zero_layout import (
    Fragment,
    ParamList,
    _check_degree,
    _check_params,
)
from lightning_reshape.errors import CheckpointError, LayoutError
from lightning_reshape.topology.reshape_map import padded_boundaries

if TYPE_CHECKING:
    from lightning_reshape.checkpoint.plan import PlanContext, RankPlan, _Selection
    from lightning_reshape.checkpoint.reader import _Builder, _Files

INNER: KeyPath = ("optimizer_state_dict", "optimizer_state_dict")


# --------------------------------------------------------------------------------------------
# write side: target layout -> model and optimizer files of every dp rank


def plan_files(ctx: PlanContext, rank: RankPlan, sel: _Selection) -> list[TargetFile]:
    """The files of one target tp rank at ZeRO 3 (no pipeline): two per dp rank."""
    lay3, sub_lists, sub_names = layout(ctx)
    mp = rank.mp
    files = []
    for r in sel.dp_ranks(rank.out_mp, ctx.target.dp):
        name = f"{ctx.prefix}zero_pp_rank_{r}_mp_rank_{mp:02d}_optim_states.pt"
        if sel.wants(name):
            files.append(TargetFile(name, tuple(optim_items(ctx, rank, lay3, sub_lists, r))))
        name = f"zero_pp_rank_{r}_mp_rank_{mp:02d}_model_states.pt"
        if sel.wants(name):
            files.append(model_states.model_file(ctx, rank, name, sub_names, r))
    return files


def layout(ctx: PlanContext) -> tuple[Zero3Layout, list[list[int]], list[tuple[str, ...]]]:
    """(DeepSpeed's layout at the target dp, the sub-groups each param group lists, the names
    of each sub-group), computed once per plan."""

    def make() -> Any:
        sub_group_size = ctx.zcfg.get("sub_group_size", DEFAULT_SUB_GROUP_SIZE)
        lay3 = zero3_layout(
            [[(n, ctx.local_numel(n)) for n in names] for names in ctx.groups],
            ctx.target.dp,
            sub_group_size=sub_group_size,
        )
        # each param group lists its sub-groups' fp32 partitions, in order
        sub_lists = [
            [s for s, g in enumerate(lay3.sub_group_to_group) if g == group]
            for group in range(len(ctx.groups))
        ]
        sub_names = [
            tuple(p.name for p in lay3.sub_group_params(s))
            for s in range(len(lay3.sub_group_numels))
        ]
        return lay3, sub_lists, sub_names

    return ctx._memo("zero3_layout", make)


def optim_items(
    ctx: PlanContext, rank: RankPlan, lay3: Zero3Layout, sub_lists: list[list[int]], r: int
) -> list[Item]:
    """Everything in dp rank ``r``'s ZeRO 3 optimizer file, in DeepSpeed's key order."""
    items: list[Item] = [
        SetValue(OSD, {}, "raw"),
        SetValue((*OSD, "zero_stage"), 3, "zero_stage"),
        *optimizer_top(ctx, rank.src_mp, "zero3"),
        SetValue((*OSD, "partition_count"), ctx.target.dp),
        SetValue(INNER, {}, "raw"),
        SetValue((*INNER, "state"), {}, "raw"),
        *ctx.param_groups(rank, (*INNER, "param_groups"), sub_lists),
        SetValue((*OSD, "fp32_flat_groups"), len(lay3.sub_group_numels), "list"),
    ]
    for s in range(len(lay3.sub_group_numels)):
        items += _sub_group_items(ctx, rank, lay3, s, r)
    return items + [
        SetValue(("ds_config",), ctx.tgt_config),
        SetValue(("ds_version",), ctx.manifest.ds_version),
    ]


def _sub_group_items(
    ctx: PlanContext, rank: RankPlan, lay3: Zero3Layout, s: int, r: int
) -> list[Item]:
    """Sub-group ``s`` of dp rank ``r``: its scalar states, fp32 partition and flat states."""
    params = lay3.sub_group_params(s)
    numel = lay3.sub_group_numels[s]
    first = params[0].name
    items: list[Item] = [SetValue((*INNER, "state", s), {}, "raw")]
    items += ctx.scalar_carries(ctx.src_group_of.get(first, s), INNER, rank.src_mp, s, first)
    for k in [None, *ctx.optim_keys.get(first, [])]:
        role = ROLE_FP32 if k is None else ROLE_OPTIM
        copies: list[Copy] = []
        for p in params:
            lo, hi = p.rank_bounds(r)
            if hi > lo:
                copies += ctx.res.copies(ctx.entry(p.name, role, k), rank.mp, lo, hi, p.offset)
        dkey = (*OSD, "fp32_flat_groups", s) if k is None else (*INNER, "state", s, k)
        dtype = ctx.entry(first, role, k).dtype
        items.append(TensorFill(dkey, dtype, (numel,), tuple(copies)))
    return items


# --------------------------------------------------------------------------------------------
# read side: per-dp-rank files of one mp rank -> fp32, state and frozen pieces


def read_optimizer(
    b: _Builder,
    f: _Files,
    mp: int,
    topo: SourceTopology,
    tp_rank: int,
    pp_stage: int,
    param_shapes: Sequence[Mapping[str, Any]] | None,
) -> None:
    """Every dp rank's ``fp32_flat_groups`` (and flat states), cut back into parameters: each
    parameter's dp parts follow one another over the rank's sub-groups, in ``param_shapes``
    order."""
    if not param_shapes:
        raise CheckpointError(f"{b.tag_dir}: ZeRO-3 model files lack param_shapes")
    ordered = [(n, _shape(s)) for group in param_shapes for n, s in group.items()]
    steps_seen: dict[str, Any] = {}
    for dp in range(topo.dp):
        file = f.optim[(dp, mp)]
        osd = b.load(file)["optimizer_state_dict"]
        groups = osd["fp32_flat_groups"]
        bounds = [0]
        for t in groups:
            bounds.append(bounds[-1] + t.numel())
        flat_keys = _flat_keys(b, file, osd, mp, steps_seen)
        cursor = 0
        for name, shape in ordered:
            at = (tp_rank, pp_stage, dp, topo.dp)
            cursor = _read_part(b, file, osd, name, shape, at, cursor, bounds, flat_keys)
        if cursor > bounds[-1]:
            raise CheckpointError(
                f"{b.path(file)}: parameters need {cursor} elements but the flat groups hold "
                f"{bounds[-1]}; files from different saves?"
            )
        optim_refs(b, file, osd, OSD)
    check_steps(b, steps_seen)


def _flat_keys(
    b: _Builder, file: str, osd: Mapping[str, Any], mp: int, steps_seen: dict[str, Any]
) -> dict[int, list[str]]:
    """Flat state keys of each sub-group; records its scalar states."""
    inner = osd["optimizer_state_dict"]["state"]
    flat_keys: dict[int, list[str]] = {}
    for g, t in enumerate(osd["fp32_flat_groups"]):
        fk, sk = flat_state_keys(inner, g, t.numel())
        flat_keys[g] = fk
        record_scalars(b, inner[g], sk, mp, g, file, (*INNER, "state", g), steps_seen)
    return flat_keys


def _read_part(
    b: _Builder,
    file: str,
    osd: Mapping[str, Any],
    name: str,
    shape: tuple[int, ...],
    at: tuple[int, int, int, int],
    cursor: int,
    bounds: Sequence[int],
    flat_keys: Mapping[int, list[str]],
) -> int:
    """Dp rank ``dp``'s part of one parameter (``at`` = tp rank, pp stage, dp rank, dp size),
    at ``cursor`` of the rank's flat buffer (concatenated over sub-groups), split at sub-group
    boundaries; the cursor after it."""
    tp_rank, pp_stage, dp, dp_size = at
    groups, inner = osd["fp32_flat_groups"], osd["optimizer_state_dict"]["state"]
    n = _prod(shape)
    part = math.ceil(n / dp_size)
    take = max(0, min(part, n - dp * part))
    pos, done = cursor, 0
    while done < take:
        g = next(i for i in range(len(groups)) if bounds[i] <= pos < bounds[i + 1])
        chunk = min(take - done, bounds[g + 1] - pos)
        common = {
            "tp_rank": tp_rank,
            "numel": chunk,
            "src_offset": pos - bounds[g],
            "dst_offset": dp * part + done,
            "local_shape": shape,
            "pp_stage": pp_stage,
            "dp_rank": dp,
            "flat_group": g,
        }
        fp32_key = (*OSD, "fp32_flat_groups", g)
        b.add(name, ROLE_FP32, None, Piece(file=file, key=fp32_key, **common), groups[g].dtype)
        for k in flat_keys[g]:
            piece = Piece(file=file, key=(*INNER, "state", g, k), **common)
            b.add(name, ROLE_OPTIM, k, piece, inner[g][k].dtype)
        pos += chunk
        done += chunk
    return cursor + part


def read_frozen(
    b: _Builder,
    f: _Files,
    mp: int,
    topo: SourceTopology,
    tp_rank: int,
    pp_stage: int,
    frozen_shapes: Mapping[str, Any],
) -> None:
    """Frozen parameters: each dp rank's model file holds its part in
    ``frozen_param_fragments`` (dp equal parts, the last padded)."""
    for name, shape in frozen_shapes.items():
        shape_t = _shape(shape)
        numel = _prod(shape_t)
        part = math.ceil(numel / topo.dp)
        for dp in range(topo.dp):
            file = f.z3_model[(dp, mp)]
            frag = b.load(file).get("frozen_param_fragments", {}).get(name)
            if frag is None:
                raise CheckpointError(f"{b.path(file)}: frozen parameter {name} fragment missing")
            take = max(0, min(part, numel - dp * part))
            if take:
                b.add(
                    name,
                    ROLE_PARAM,
                    None,
                    Piece(
                        file=file,
                        key=("frozen_param_fragments", name),
                        tp_rank=tp_rank,
                        numel=take,
                        src_offset=0,
                        dst_offset=dp * part,
                        local_shape=shape_t,
                        pp_stage=pp_stage,
                        dp_rank=dp,
                    ),
                    frag.dtype,
                )


def model_dtype(b: _Builder, f: _Files, mp: int) -> str:
    """The model dtype, from the placeholders of the dp-0 model file (ZeRO 3 saves no weights
    there: their dtype is all that is left)."""
    sd = b.load(f.z3_model[(0, mp)])
    buffers = set(sd.get("buffer_names") or [])
    for name, t in (sd.get("module") or {}).items():
        if name not in buffers and is_tensor(t) and t.is_floating_point():
            return _dtype_name(t.dtype)
    return "unknown"


# --------------------------------------------------------------------------------------------
# layout: every parameter split on its own, partitions concatenated per sub-group
# --------------------------------------------------------------------------------------------


#: DeepSpeed's config default for ``zero_optimization.sub_group_size`` (ZeRO 3).
DEFAULT_SUB_GROUP_SIZE = 1_000_000_000


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
