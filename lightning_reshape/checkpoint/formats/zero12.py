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

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

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
from lightning_reshape.checkpoint.zero_layout import (
    Fragment,
    ParamList,
    SliceAddress,
    _check_degree,
    _check_params,
    bounds_from_sizes,
)
from lightning_reshape.errors import CheckpointError, LayoutError

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
    ds_config: Mapping[str, Any] | None = None,
) -> None:
    """ZeRO 1/2 (and BF16_Optimizer) partitions of every dp rank, cut back into parameters by
    ``param_shapes`` (flat order) and the alignment paddings. ``ds_config`` (the model file's)
    tells whether each file's ``param_slice_mappings`` can be checked against its dp rank:
    not with ``round_robin_gradients``, whose mappings DeepSpeed records in another order."""
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
    zcfg = (ds_config or {}).get("zero_optimization") if isinstance(ds_config, Mapping) else None
    check = not (isinstance(zcfg, Mapping) and zcfg.get("round_robin_gradients"))
    steps_seen: dict[str, Any] = {}
    for g, group in enumerate(param_shapes):
        psize = _partition_size(b, f.optim[(0, mp)], sds, g, n_groups)
        offsets = _group_offsets(b, f.optim[(0, mp)], group, g, osd0, psize * topo.dp)
        for dp, sd in sds.items():
            at = (mp, tp_rank, pp_stage, dp, g)
            _read_partition(b, f.optim[(dp, mp)], sd, at, dp * psize, offsets, steps_seen)
            if check:
                _check_slice_mappings(b, f.optim[(dp, mp)], sd, g, dp * psize, offsets)
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


def _check_slice_mappings(
    b: _Builder,
    file: str,
    sd: Mapping[str, Any],
    g: int,
    lo: int,
    offsets: Mapping[str, tuple[int, int, tuple[int, ...]]],
) -> None:
    """The file's own ``param_slice_mappings`` (which parameter fragments DeepSpeed put in this
    partition) must be those of the slice of flat group ``g`` from element ``lo``: a file saved
    by another dp rank (renamed, swapped) holds a partition of the right size but the wrong
    elements. Skipped when the file has no mappings or names its parameters otherwise."""
    osd = sd["optimizer_state_dict"]
    hi = lo + osd["single_partition_of_fp32_groups"][g].numel()
    mappings = osd.get("param_slice_mappings")
    if not isinstance(mappings, Sequence) or len(mappings) <= g:
        return
    saved = mappings[g]
    if not isinstance(saved, Mapping) or not saved or any(n not in offsets for n in saved):
        return
    want = {}
    for name, (poff, n, _) in offsets.items():
        s, e = max(poff, lo), min(poff + n, hi)
        if s < e:
            want[name] = (s - lo, e - s)
    try:
        got = {name: (int(a.start), int(a.numel)) for name, a in saved.items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        return
    if got != want:
        first = next(iter(saved))
        raise CheckpointError(
            f"{b.path(file)}: its param_slice_mappings (group {g}, first {first!r} at "
            f"{got[first][0]}) are not those of the partition its name gives it (elements "
            f"{lo}-{hi} of the flat group): the file was saved by another dp rank or another "
            "model (renamed or swapped); restore the tag's files from the original save"
        )


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


# --------------------------------------------------------------------------------------------
# layout: one flat buffer per param group, cut into dp equal partitions (ZeRO 1/2 and
# the bf16 optimizer), computed as DeepSpeed 0.19.x computes it (no torch, no IO)
# --------------------------------------------------------------------------------------------


#: ZeRO 1/2 and the bf16 optimizer pad each group's flat buffer to a multiple of this factor
#: times the dp world size, whatever the dtype ("4-byte alignment / sizeof(fp16)" in DeepSpeed).
NCCL_START_ALIGNMENT_FACTOR = 2


@dataclass(frozen=True)
class FlatParam:
    """One parameter's place in a group's flat buffer (the real place of its data)."""

    name: str
    numel: int
    flat_offset: int
    #: zeros DeepSpeed inserts after it (``parameter_alignment``); written as
    #: ``param_alignment_paddings``.
    alignment_padding: int


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
    param_align = 16 // math.gcd(16, element_size) if parameter_alignment else 1
    placed = _place([params[i] for i in order], param_align)
    padded_numel = placed[-1].flat_offset + placed[-1].numel + placed[-1].alignment_padding

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


def _place(flat_params: ParamList, param_align: int) -> list[FlatParam]:
    """Parameters in flat order, with the per-parameter alignment: zeros after every
    parameter but the last."""
    placed: list[FlatParam] = []
    cursor = 0
    for k, (name, numel) in enumerate(flat_params):
        offset = cursor
        cursor += numel
        pad = 0 if k == len(flat_params) - 1 else (-cursor) % param_align
        cursor += pad
        placed.append(FlatParam(name, numel, offset, pad))
    return placed


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
