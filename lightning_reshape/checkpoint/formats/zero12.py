"""ZeRO 1/2 flat partitions: ``[bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt``.

Why: ZeRO 1/2 flatten each optimizer param group's trainable parameters into one buffer, pad it
and cut it into dp equal partitions; each rank's file holds its partition of the fp32 masters
(``single_partition_of_fp32_groups``, tail padding stripped) and of every optimizer state
(``base_optimizer_state``, a torch state dict whose state per group is a flat tensor), plus
``group_paddings``, ``param_alignment_paddings``, ``partition_count`` and
``param_slice_mappings``. The layout arithmetic is :func:`zero_layout.zero_group_layout`; this
module writes DeepSpeed's file around it. DeepSpeed's BF16_Optimizer (:mod:`bf16_optimizer`)
writes the same file with a few keys fewer and its padding kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_reshape.checkpoint.formats import model_states, pipeline
from lightning_reshape.checkpoint.manifest import (
    ROLE_FP32,
    ROLE_OPTIM,
    KeyPath,
    Piece,
    ScalarState,
    SourceTopology,
    StateRef,
)
from lightning_reshape.checkpoint.plan import (
    _ELEMENT_SIZE,
    Carry,
    Copy,
    SetValue,
    TargetFile,
    TensorFill,
)
from lightning_reshape.checkpoint.reader import _prod, _scalar, _shape, _summary
from lightning_reshape.checkpoint.torchfile import is_tensor
from lightning_reshape.checkpoint.zero_layout import ZeroGroupLayout, zero_group_layout
from lightning_reshape.errors import CheckpointError

if TYPE_CHECKING:
    from lightning_reshape.checkpoint.plan import PlanContext, RankPlan, _Selection
    from lightning_reshape.checkpoint.reader import _Builder, _Files

Item = Carry | SetValue | TensorFill
OSD: KeyPath = ("optimizer_state_dict",)
BASE: KeyPath = ("optimizer_state_dict", "base_optimizer_state")

# Non-tensor optimizer state a reshape must carry over verbatim.
OPTIM_CARRIED_KEYS = (
    "loss_scaler",
    "dynamic_loss_scale",
    "overflow",
    "clip_grad",
    "cur_scale",
    "cur_iter",
    "last_overflow_iter",
    "scale_factor",
    "scale_window",
)

# DeepSpeed's default ``gradient_clipping`` (runtime/constants.py): what ZeRO 1/2 save as clip_grad
GRADIENT_CLIPPING_DEFAULT = 1.0


# --------------------------------------------------------------------------------------------
# write side: target layout -> optimizer files (and the model file of each mp rank)


def plan_files(ctx: PlanContext, rank: RankPlan, sel: _Selection) -> list[TargetFile]:
    """The files of one target mp rank at ZeRO 1/2 (pipeline: ZeRO 1 with its layer files)."""
    layouts = stage_layouts(ctx, rank)
    files = []
    for r in sel.dp_ranks(rank.out_mp, ctx.target.dp):
        name = f"{ctx.prefix}zero_pp_rank_{r}_mp_rank_{rank.out_mp:02d}_optim_states.pt"
        if sel.wants(name):
            files.append(TargetFile(name, tuple(optim_items(ctx, rank, layouts, r))))
    buffers = None
    if rank.layers is not None:
        files += pipeline.layer_files(ctx, rank, sel)
        buffers = pipeline.stage_buffers(ctx, rank.layers)
    name = f"mp_rank_{rank.out_mp:02d}_model_states.pt"
    if sel.wants(name):
        flat_names = [tuple(p.name for p in lay.params) for lay in layouts]
        files.append(model_states.model_file(ctx, rank, name, flat_names, None, buffers))
    return files


def stage_layouts(ctx: PlanContext, rank: RankPlan) -> list[ZeroGroupLayout]:
    """DeepSpeed's flat layout of each param group of the rank's stage at the target dp (one
    per stage: every tp rank and dp rank of the stage shares it)."""

    def make() -> list[ZeroGroupLayout]:
        bf16 = ctx.bf16_optimizer
        zcfg = ctx.zcfg
        return [
            zero_group_layout(
                [(n, ctx.local_numel(n)) for n in names],
                ctx.target.dp,
                optimizer="bf16" if bf16 else "zero",
                round_robin_gradients=bool(zcfg.get("round_robin_gradients")) and not bf16,
                parameter_alignment=bool(zcfg.get("parameter_alignment")) and not bf16,
                element_size=_ELEMENT_SIZE[ctx.manifest.model_dtype],
            )
            for names in rank.groups
        ]

    return ctx._memo(("zero12_layouts", rank.stage), make)


def optim_items(
    ctx: PlanContext, rank: RankPlan, layouts: list[ZeroGroupLayout], r: int
) -> list[Item]:
    """Everything in dp rank ``r``'s optimizer file, in DeepSpeed's key order."""
    kind = "bf16" if ctx.bf16_optimizer else "zero"
    items: list[Item] = [
        SetValue(OSD, {}, "raw"),
        *optimizer_top(ctx, rank.src_mp, kind),
        SetValue(BASE, {}, "raw"),
        SetValue((*BASE, "state"), {}, "raw"),
        *ctx.param_groups(rank, (*BASE, "param_groups"), [[g] for g in range(len(layouts))]),
        SetValue((*OSD, "single_partition_of_fp32_groups"), len(layouts), "list"),
    ]
    for g, lay in enumerate(layouts):
        items += _group_items(ctx, rank, lay, g, r)
    return items + _tail_items(ctx, layouts, r)


def _group_items(
    ctx: PlanContext, rank: RankPlan, lay: ZeroGroupLayout, g: int, r: int
) -> list[Item]:
    """Flat group ``g`` of dp rank ``r``: its scalar states, fp32 partition and flat states."""
    first = lay.params[0].name
    sg = ctx.src_group_of.get(first, g)
    items: list[Item] = [SetValue((*BASE, "state", g), {}, "raw")]
    items += ctx.scalar_carries(sg, BASE, rank.src_mp, g, first)
    frags = lay.rank_fragments(r)

    def copies(role: str, k: str | None) -> tuple[Copy, ...]:
        out: list[Copy] = []
        for fr in frags:
            e = ctx.entry(fr.name, role, k)
            hi = fr.param_start + fr.numel
            out += ctx.res.copies(e, rank.mp, fr.param_start, hi, fr.partition_start)
        return tuple(out)

    fp32_dtype = ctx.entry(first, ROLE_FP32).dtype
    fp32_key = (*OSD, "single_partition_of_fp32_groups", g)
    items.append(
        TensorFill(fp32_key, fp32_dtype, (lay.saved_partition_numel(r),), copies(ROLE_FP32, None))
    )
    for k in ctx.optim_keys.get(first, []):
        dtype = ctx.entry(first, ROLE_OPTIM, k).dtype
        fill_key = (*BASE, "state", g, k)
        items.append(TensorFill(fill_key, dtype, (lay.partition_size,), copies(ROLE_OPTIM, k)))
    return items


def _tail_items(ctx: PlanContext, layouts: list[ZeroGroupLayout], r: int) -> list[Item]:
    """The partition metadata after the tensors (BF16_Optimizer records neither ``zero_stage``
    nor ``param_alignment_paddings``)."""
    version = ctx.manifest.ds_version
    items: list[Item] = []
    if not ctx.bf16_optimizer:
        items.append(SetValue((*OSD, "zero_stage"), ctx.target.zero_stage, "zero_stage"))
    items.append(SetValue((*OSD, "group_paddings"), [lay.group_paddings[r] for lay in layouts]))
    if not ctx.bf16_optimizer:
        paddings = [list(lay.param_alignment_paddings) for lay in layouts]
        items.append(SetValue((*OSD, "param_alignment_paddings"), paddings))
    mappings = [
        {n: (a.numel, a.start) for n, a in lay.slice_mappings[r].items()} for lay in layouts
    ]
    return items + [
        SetValue((*OSD, "partition_count"), [ctx.target.dp] * len(layouts)),
        SetValue((*OSD, "ds_version"), version),
        SetValue((*OSD, "param_slice_mappings"), mappings, "slice_mappings"),
        SetValue(("ds_config",), ctx.tgt_config),
        SetValue(("ds_version",), version),
    ]


def optimizer_top(ctx: PlanContext, src_mp: int, kind: str) -> list[Carry | SetValue]:
    """The top-level entries of a target optimizer file before its tensors: carried from the
    source where it has them, else what DeepSpeed writes for a bf16/fp32 run (static loss scale
    1, no overflow, the configured clipping). ``kind``: zero (ZeRO 1/2), zero3 or bf16."""
    meta = ctx.meta
    keys = {
        "zero": ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad"),
        "zero3": ("loss_scaler", "dynamic_loss_scale", "overflow"),
        "bf16": ("clip_grad",),
    }[kind]
    has = set(meta.optim_top_keys) if src_mp in meta.optim_files else set()
    out: list[Carry | SetValue] = []
    for k in keys:
        dst = (*OSD, k)
        if k in has:
            out.append(Carry(meta.optim_files[src_mp], dst, dst))
        elif k == "loss_scaler":
            out.append(SetValue(dst, {"cur_scale": 1.0, "dynamic": False}, "loss_scaler"))
        elif k == "clip_grad":
            clip = meta.ds_config.get("gradient_clipping", GRADIENT_CLIPPING_DEFAULT)
            out.append(SetValue(dst, float(clip)))
        else:
            out.append(SetValue(dst, False))
    return out


# --------------------------------------------------------------------------------------------
# read side: optimizer files of one mp rank -> fp32 and state pieces of every parameter


def read_optimizer(
    b: _Builder,
    f: _Files,
    mp: int,
    topo: SourceTopology,
    tp_rank: int,
    pp_stage: int,
    param_shapes: Sequence[Mapping[str, Any]] | None,
) -> None:
    """ZeRO 1/2 (and BF16_Optimizer) partitions of every dp rank, cut back into parameters by
    ``param_shapes`` (flat order) and the alignment paddings."""
    if not param_shapes:
        raise CheckpointError(
            f"{b.path(f'mp_rank_{mp:02d}_model_states.pt')}: ZeRO optimizer files present but no "
            "param_shapes in the model file; files from different saves?"
        )
    sds = {dp: b.load(f.optim[(dp, mp)]) for dp in range(topo.dp)}
    osd0 = sds[0]["optimizer_state_dict"]
    n_groups = len(osd0["single_partition_of_fp32_groups"])
    if n_groups != len(param_shapes):
        raise CheckpointError(
            f"{b.path(f.optim[(0, mp)])}: {n_groups} flat groups but the model file lists "
            f"{len(param_shapes)}; files from different saves?"
        )
    steps_seen: dict[str, Any] = {}
    for g, group in enumerate(param_shapes):
        psize = _partition_size(b, f.optim[(0, mp)], sds, g, n_groups)
        offsets = _group_offsets(b, f.optim[(0, mp)], group, g, osd0, psize * topo.dp)
        for dp, sd in sds.items():
            at = (mp, tp_rank, pp_stage, dp, g)
            _read_partition(b, f.optim[(dp, mp)], sd, at, dp * psize, offsets, steps_seen)
    check_steps(b, steps_seen)
    for dp, sd in sds.items():
        optim_refs(b, f.optim[(dp, mp)], sd["optimizer_state_dict"], OSD)


def _partition_size(b: _Builder, file0: str, sds: Mapping[int, Any], g: int, n_groups: int) -> int:
    """Group ``g``'s partition length: every rank's is the same before padding is stripped."""
    osd0 = sds[0]["optimizer_state_dict"]
    parts = {}
    for dp, sd in sds.items():
        osd = sd["optimizer_state_dict"]
        t = osd["single_partition_of_fp32_groups"][g]
        pad = (osd.get("group_paddings") or [0] * n_groups)[g]
        parts[dp] = (t, pad)
    # ZeRO 1/2 strip the tail padding from the saved partition; BF16_Optimizer keeps it
    keeps_padding = "zero_stage" not in osd0
    psize = parts[0][0].numel() + (0 if keeps_padding else parts[0][1])
    if any(t.numel() + (0 if keeps_padding else pad) != psize for t, pad in parts.values()):
        raise CheckpointError(
            f"{b.path(file0)}: ZeRO partitions of group {g} have different sizes "
            "across dp ranks; files from different saves?"
        )
    return psize


def _group_offsets(
    b: _Builder,
    file0: str,
    group: Mapping[str, Any],
    g: int,
    osd0: Mapping[str, Any],
    total: int,
) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """name -> (offset in the flat group, numel, shape), alignment paddings included."""
    align_pads = osd0.get("param_alignment_paddings")
    offsets: dict[str, tuple[int, int, tuple[int, ...]]] = {}
    off = 0
    for i, (name, shape) in enumerate(group.items()):
        shape_t = _shape(shape)
        n = _prod(shape_t)
        offsets[name] = (off, n, shape_t)
        off += n
        if align_pads is not None:
            off += align_pads[g][i]
    if off > total:
        raise CheckpointError(
            f"{b.path(file0)}: group {g} needs {off} elements but the partitions "
            f"hold {total}; files from different saves?"
        )
    return offsets


def _read_partition(
    b: _Builder,
    file: str,
    sd: Mapping[str, Any],
    at: tuple[int, int, int, int, int],
    lo: int,
    offsets: Mapping[str, tuple[int, int, tuple[int, ...]]],
    steps_seen: dict[str, Any],
) -> None:
    """One dp rank's partition of flat group ``g`` (``at`` = mp, tp rank, pp stage, dp rank,
    g), starting at element ``lo`` of the group: a piece per parameter it overlaps."""
    mp, tp_rank, pp_stage, dp, g = at
    osd = sd["optimizer_state_dict"]
    flat = osd["single_partition_of_fp32_groups"][g]
    base = osd["base_optimizer_state"]
    if isinstance(base, Mapping):
        base_state = base["state"]
        state_prefix: KeyPath = (*BASE, "state")
    else:
        # zero_optimization.elastic_checkpoint: a list of per-group states (padding
        # stripped, no param_groups) instead of the torch optimizer's state_dict
        b.elastic = True
        base_state = dict(enumerate(base))
        state_prefix = BASE
    flat_keys, scalar_keys = flat_state_keys(base_state, g, flat.numel())
    record_scalars(b, base_state[g], scalar_keys, mp, g, file, (*state_prefix, g), steps_seen)
    hi = lo + flat.numel()
    for name, (poff, n, shape_t) in offsets.items():
        s, e = max(poff, lo), min(poff + n, hi)
        if s >= e:
            continue
        common = {
            "tp_rank": tp_rank,
            "numel": e - s,
            "src_offset": s - lo,
            "dst_offset": s - poff,
            "local_shape": shape_t,
            "pp_stage": pp_stage,
            "dp_rank": dp,
            "flat_group": g,
        }
        fp32_key = (*OSD, "single_partition_of_fp32_groups", g)
        b.add(name, ROLE_FP32, None, Piece(file=file, key=fp32_key, **common), flat.dtype)
        for k in flat_keys:
            piece = Piece(file=file, key=(*state_prefix, g, k), **common)
            b.add(name, ROLE_OPTIM, k, piece, base_state[g][k].dtype)


def flat_state_keys(state: Mapping[Any, Any], g: int, numel: int) -> tuple[list[str], list[str]]:
    """(flat tensor keys, scalar keys) of a flat group's optimizer state.

    The last rank's fp32 partition has its padding stripped but its optimizer states do not,
    so a flat state may be longer than ``numel``.
    """
    st = state.get(g, {})
    flat, scalar = [], []
    for k, v in st.items():
        if is_tensor(v) and v.dim() >= 1 and v.numel() >= numel:
            flat.append(k)
        else:
            scalar.append(k)
    return flat, scalar


def record_scalars(
    b: _Builder,
    state: Mapping[str, Any],
    keys: list[str],
    mp: int,
    g: int,
    file: str,
    key_prefix: tuple[Any, ...],
    steps_seen: dict[str, Any],
) -> None:
    """Record a flat group's scalar optimizer states; remember each ``step`` to compare ranks."""
    for k in keys:
        val = _scalar(state[k])
        b.scalars.append(
            ScalarState(
                owner=f"mp{mp}.group{g}", state_key=k, value=val, file=file, key=(*key_prefix, k)
            )
        )
        if k == "step":
            steps_seen.setdefault(f"group{g}", set()).add((val, file))


def check_steps(b: _Builder, steps_seen: Mapping[str, set[tuple[Any, str]]]) -> None:
    for group, seen in steps_seen.items():
        values = {v for v, _ in seen}
        if len(values) > 1:
            detail = ", ".join(f"{b.path(fl)}: step={v}" for v, fl in sorted(seen, key=str))
            raise CheckpointError(
                f"optimizer files disagree on the step count of {group} ({detail}); files from "
                "different saves are mixed in one tag"
            )


def optim_refs(b: _Builder, file: str, osd: Mapping[str, Any], prefix: KeyPath) -> None:
    for k in OPTIM_CARRIED_KEYS:
        if k in osd:
            b.refs.append(
                StateRef(
                    name=f"optimizer:{k}", file=file, key=(*prefix, k), summary=_summary(osd[k])
                )
            )
    for inner in ("base_optimizer_state", "optimizer_state_dict"):
        if isinstance(osd.get(inner), Mapping) and "param_groups" in osd[inner]:
            b.refs.append(
                StateRef(
                    name="optimizer:param_groups",
                    file=file,
                    key=(*prefix, inner, "param_groups"),
                    summary=_summary(osd[inner]["param_groups"]),
                )
            )
