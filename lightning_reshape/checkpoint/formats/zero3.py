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
from lightning_reshape.checkpoint.zero_layout import DEFAULT_SUB_GROUP_SIZE, zero3_layout
from lightning_reshape.errors import CheckpointError

if TYPE_CHECKING:
    from lightning_reshape.checkpoint.plan import PlanContext, RankPlan, _Selection
    from lightning_reshape.checkpoint.reader import _Builder, _Files
    from lightning_reshape.checkpoint.zero_layout import Zero3Layout

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
