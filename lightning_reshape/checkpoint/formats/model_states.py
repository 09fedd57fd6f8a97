"""DeepSpeed's model-states files: ``mp_rank_XX_model_states.pt`` (ZeRO 0/1/2, one per
model-parallel rank) and ``zero_pp_rank_D_mp_rank_XX_model_states.pt`` (ZeRO 3, one per dp rank).

Why: this file holds the module state dict (placeholders under ZeRO 3, None under the pipeline
engine), ``buffer_names``, ``param_shapes`` (names per flat group, in flat-buffer order),
``shared_params`` (tied aliases), frozen parameters (``frozen_param_shapes`` and
``frozen_param_fragments``, ZeRO 2/3), the degrees (``dp_world_size``, ``mp_world_size``,
``checkpoint_parallel_dimensions``), ``ds_config`` and then the client state, carried verbatim.
The target's file keeps the source's top-level key order; only the computed keys are rewritten.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_reshape.checkpoint import torchfile
from lightning_reshape.checkpoint.manifest import (
    ROLE_BUFFER,
    ROLE_FP32,
    ROLE_PARAM,
    KeyPath,
    SourceMeta,
    StateRef,
    TensorEntry,
)
from lightning_reshape.checkpoint.plan import (
    Carry,
    SetValue,
    TargetFile,
    TensorFill,
    _trainable,
)
from lightning_reshape.checkpoint.reader import (
    DS_CARRIED_KEYS,
    DS_MODEL_KEYS,
    _dtype_name,
    _summary,
    _whole,
)
from lightning_reshape.checkpoint.torchfile import TensorRef, is_tensor
from lightning_reshape.errors import CheckpointError

if TYPE_CHECKING:
    from lightning_reshape.checkpoint.plan import PlanContext, RankPlan
    from lightning_reshape.checkpoint.reader import _Builder
    from lightning_reshape.checkpoint.sidecar import Sidecar

Item = Carry | SetValue | TensorFill

# --------------------------------------------------------------------------------------------
# write side: target layout -> model-states file

# keys of the model-states file a reshape computes; every other key is carried verbatim
_MODEL_COMPUTED = frozenset(
    {
        "module",
        "optimizer",
        "param_shapes",
        "frozen_param_shapes",
        "shared_params",
        "frozen_param_fragments",
        "dp_world_size",
        "mp_world_size",
        "checkpoint_parallel_dimensions",
        "ds_config",
    }
)


def model_file(
    ctx: PlanContext,
    rank: RankPlan,
    name: str,
    flat_names: Sequence[Sequence[str]],
    z3_rank: int | None,
    pipeline_buffers: Sequence[str] | None = None,
    optimizer_items: Sequence[Item] | None = None,
) -> TargetFile:
    """A model-states file: ``mp_rank_XX`` (ZeRO 1/2) or ``zero_pp_rank_R_mp_rank_XX`` (ZeRO 3).

    ``pipeline_buffers`` (pipeline engine only): the stage's buffer names; the module itself
    lives in the layer files then, so ``module`` is None. ``optimizer_items`` (ZeRO 0 only): the
    whole optimizer state, which ZeRO 0 keeps in this file; ZeRO 0 records no ``param_shapes``
    or ``shared_params``."""
    meta, target = ctx.meta, ctx.target
    src_file = meta.model_files[rank.src_mp]
    shared = _shared(ctx, rank)
    items: list[Item] = []
    for key in meta.model_keys[rank.src_mp]:
        if pipeline_buffers is not None and key in ("module", "buffer_names"):
            value = None if key == "module" else list(pipeline_buffers)
            items.append(SetValue((key,), value))
        elif key not in _MODEL_COMPUTED:
            items.append(Carry(src_file, (key,), (key,)))
        elif key == "module":
            items += _module_items(ctx, rank, flat_names, shared, z3_rank)
        elif key == "optimizer":
            items += (
                [SetValue(("optimizer",), None)] if optimizer_items is None else optimizer_items
            )
        elif key in ("param_shapes", "shared_params") and target.zero_stage == 0:
            items.append(SetValue((key,), None))
        elif key == "param_shapes":
            shapes = [
                {n: ctx.local_shape(ctx.entry(n, ROLE_FP32)) for n in names} for names in flat_names
            ]
            items.append(SetValue(("param_shapes",), shapes, "shapes"))
        elif key in ("frozen_param_shapes", "frozen_param_fragments"):
            items += _frozen_items(ctx, rank, key, z3_rank)
        elif key == "shared_params":
            items.append(SetValue(("shared_params",), shared))
        else:
            items.append(SetValue((key,), _degree_value(ctx, key)))
    return TargetFile(name, tuple(items))


def _degree_value(ctx: PlanContext, key: str) -> object:
    """``dp_world_size``, ``mp_world_size``, ``checkpoint_parallel_dimensions``, ``ds_config``
    of the target."""
    t = ctx.target
    return {
        "dp_world_size": t.dp,
        "mp_world_size": t.tp * t.pp,
        "checkpoint_parallel_dimensions": {"pp_degree": t.pp, "tp_degree": t.tp},
        "ds_config": dict(ctx.tgt_config),
    }[key]


def _shared(ctx: PlanContext, rank: RankPlan) -> dict[str, str]:
    """The source's ``shared_params`` plus every alias the reader found (tied weights)."""
    shared = dict(ctx.meta.shared_params.get(rank.src_mp) or {})
    for alias, source in ctx.manifest.aliases:
        shared.setdefault(alias, source)
    return shared


def _module_items(
    ctx: PlanContext,
    rank: RankPlan,
    flat_names: Sequence[Sequence[str]],
    shared: dict[str, str],
    z3_rank: int | None,
) -> list[Item]:
    """The ``module`` state dict in the source's key order: buffers, ZeRO 3 placeholders, tied
    aliases (one tensor object), weights."""
    manifest, mp = ctx.manifest, rank.mp
    trainable = _trainable(flat_names)
    frozen_names = {e.name for e in ctx.frozen}
    known = ctx.by_key
    module_keys = set(ctx.meta.module_keys[rank.src_mp])
    items: list[Item] = [SetValue(("module",), None, "odict")]
    for mkey in ctx.meta.module_keys[rank.src_mp]:
        dkey = ("module", mkey)
        if mkey in ctx.buffers:
            items.append(ctx.whole(ctx.buffers[mkey], dkey, mp))
        elif z3_rank is not None:
            items.append(TensorFill(dkey, manifest.model_dtype, (0,)))
        elif (
            mkey in shared
            and mkey not in trainable
            and mkey not in frozen_names
            and shared[mkey] in module_keys  # not when excluded from the save
        ):
            items.append(TensorFill(dkey, manifest.model_dtype, (), tie=("module", shared[mkey])))
        elif (
            manifest.extra.get("excluded_frozen")
            and (mkey, ROLE_PARAM, None) not in known
            and (mkey, ROLE_FP32, None) not in known
        ):
            # a frozen weight tied to another, saved at ZeRO 3 with
            # exclude_frozen_parameters=True: its placeholder is all the checkpoint holds, so
            # it stays out, and the model keeps its own value on load (strict=False), as it
            # does when resuming the source
            continue
        else:
            role = ROLE_PARAM if (mkey, ROLE_PARAM, None) in known else ROLE_FP32
            e = ctx.entry(mkey, role)
            fill = ctx.whole(e, dkey, mp)
            items.append(TensorFill(dkey, manifest.model_dtype, fill.shape, fill.copies))
    return items


def _frozen_items(ctx: PlanContext, rank: RankPlan, key: str, z3_rank: int | None) -> list[Item]:
    """``frozen_param_shapes`` or ``frozen_param_fragments`` (ZeRO 3: this dp rank's slice)."""
    frozen = ctx.frozen
    if not saves_frozen(ctx, frozen):
        return [SetValue((key,), None)]
    if key == "frozen_param_shapes":
        shapes = {e.name: ctx.local_shape(e) for e in frozen}
        return [SetValue((key,), shapes, "frozen_shapes")]
    items: list[Item] = [SetValue((key,), None, "odict")]
    for e in frozen:
        dkey = (key, e.name)
        if z3_rank is None:
            items.append(ctx.whole(e, dkey, rank.mp))
            continue
        n = math.prod(ctx.local_shape(e))
        part = -(-n // ctx.target.dp)
        lo, hi = min(n, z3_rank * part), min(n, (z3_rank + 1) * part)
        copies = ctx.res.copies(e, rank.mp, lo, hi, 0) if hi > lo else []
        items.append(TensorFill(dkey, e.dtype, (part,), tuple(copies)))
    return items


def saves_frozen(ctx: PlanContext, frozen: Sequence[TensorEntry]) -> bool:
    """Whether the target's model files hold ``frozen_param_shapes``/``_fragments`` (else None).

    DeepSpeed writes them at ZeRO 2 and 3 unless saved with ``exclude_frozen_parameters=True``;
    a None is what tells its loader not to look for frozen weights. A source that excluded them
    keeps excluding them; with no frozen parameter at all, None loads the same as an empty dict
    and is the only safe choice when a ZeRO 0/1 source cannot tell whether it excluded any."""
    extra = ctx.manifest.extra
    if ctx.target.zero_stage < 2 or extra.get("excluded_frozen"):
        return False
    return bool(frozen) or bool(extra.get("frozen_recorded"))


# --------------------------------------------------------------------------------------------
# read side: model-states files -> module weights, buffers, aliases, frozen names, state refs;
# and (with the dp-0 optimizer files) the source metadata a plan needs


def read_source_meta(b: _Builder, mp_count: int, sidecar: Sidecar | None) -> SourceMeta:
    """The non-tensor facts a plan needs, per source mp rank: the main model-states file, its
    key orders, group lists and config, and where the torch optimizer's param groups are."""
    names = b.files.names
    meta: dict[str, Any] = {
        k: {}
        for k in (
            "model_files",
            "model_keys",
            "module_keys",
            "param_shapes",
            "shared_params",
            "optim_files",
            "param_groups_ref",
            "param_group_sizes",
        )
    }
    meta.update(ds_config={}, optim_inner=(), optim_top_keys=())
    for mp in range(mp_count):
        plain = f"mp_rank_{mp:02d}_model_states.pt"
        file = plain if plain in names else f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"
        sd = b.load(file)
        meta["model_files"][mp] = file
        meta["model_keys"][mp] = tuple(sd)
        module = sd.get("module")
        meta["module_keys"][mp] = tuple(module) if isinstance(module, Mapping) else ()
        meta["param_shapes"][mp] = tuple(tuple(g) for g in sd.get("param_shapes") or [])
        meta["shared_params"][mp] = dict(sd.get("shared_params") or {})
        meta["ds_config"] = sd.get("ds_config") or meta["ds_config"]
        for prefix in ("", "bf16_"):
            oname = f"{prefix}zero_pp_rank_0_mp_rank_{mp:02d}_optim_states.pt"
            if oname in names:
                _optimizer_meta(meta, mp, oname, b.load(oname))
        opt = sd.get("optimizer")
        if mp not in meta["param_groups_ref"] and isinstance(opt, Mapping):
            # ZeRO 0: the optimizer lives in the model file
            key = (
                ("optimizer", "optimizer_state_dict")
                if "optimizer_state_dict" in opt
                else ("optimizer",)
            )
            _param_groups_meta(meta, mp, file, sd, (*key, "param_groups"))
    meta["ds_config"] = dict(meta["ds_config"])
    meta["tp_splits"] = dict(sidecar.tp_splits) if sidecar is not None else {}
    return SourceMeta(**meta)


def _optimizer_meta(meta: dict[str, Any], mp: int, file: str, osd: Mapping[str, Any]) -> None:
    """A dp-0 optimizer file's part: its name, its inner torch state dict's key path and (mp 0)
    top-level keys, and its param groups."""
    meta["optim_files"][mp] = file
    inner = osd["optimizer_state_dict"]
    key: KeyPath = (
        ("optimizer_state_dict", "base_optimizer_state")
        if "base_optimizer_state" in inner
        else ("optimizer_state_dict", "optimizer_state_dict")
    )
    if mp == 0:
        meta["optim_top_keys"] = tuple(inner)
        meta["optim_inner"] = key
    _param_groups_meta(meta, mp, file, osd, (*key, "param_groups"))


def _param_groups_meta(
    meta: dict[str, Any], mp: int, file: str, sd: Mapping[str, Any], key: KeyPath
) -> None:
    """Where the torch optimizer's param groups are and how many tensors each lists; none for
    an ``elastic_checkpoint`` save, whose per-group states are a list (it is not reshaped)."""
    holder: Any = sd
    for k in key[:-1]:
        holder = holder[k]
    if not isinstance(holder, Mapping):
        return
    meta["param_groups_ref"][mp] = (file, key)
    meta["param_group_sizes"][mp] = tuple(len(g["params"]) for g in holder[key[-1]])


def module_params(
    b: _Builder,
    sd: Mapping[str, Any],
    file: str,
    tp_rank: int,
    pp_stage: int,
    buffer_names: list[str],
) -> dict[str, tuple[str, KeyPath, TensorRef, int | None]]:
    """name -> (file, key path, tensor, layer) for every parameter of the ``module`` state
    dict; records buffers, and aliases of a tied weight saved twice (ZeRO 0 lists none)."""
    out: dict[str, tuple[str, KeyPath, TensorRef, int | None]] = {}
    buffers = set(buffer_names)
    module = sd.get("module")
    if not isinstance(module, Mapping):
        raise CheckpointError(f"{b.path(file)}: 'module' is missing")
    seen: dict[Any, str] = {}
    for name, tensor in module.items():
        if not is_tensor(tensor):
            continue
        if name in buffers:
            _whole(b, name, ROLE_BUFFER, None, file, ("module", name), tensor, tp_rank, pp_stage)
            continue
        if tensor.numel() > 0:
            skey = torchfile.storage_key(tensor)
            if skey in seen and name not in b.aliases:
                b.aliases[name] = seen[skey]  # tied weight saved twice (ZeRO 0 has no list)
            seen.setdefault(skey, name)
        out[name] = (file, ("module", name), tensor, None)
    return out


def drop_excluded_aliases(b: _Builder, sd: Mapping[str, Any]) -> None:
    """Saved with exclude_frozen_parameters=True: the frozen parameter's first name was dropped
    from the module, its tied second name kept the data; it is no alias then."""
    module_keys = set(sd.get("module") or ())
    for alias, source in list(b.aliases.items()):
        if alias in module_keys and source not in module_keys:
            del b.aliases[alias]
            b.excluded_frozen = True


def record_weights(
    b: _Builder,
    params: Mapping[str, tuple[str, KeyPath, TensorRef, int | None]],
    tp_rank: int,
    pp_stage: int,
    model_dtype: str | None,
) -> str | None:
    """Every module weight (aliases aside) as a whole tensor; the model dtype (that of the
    last floating-point weight)."""
    for name, (file, key, tensor, layer) in params.items():
        if name in b.aliases:
            continue
        _whole(b, name, ROLE_PARAM, None, file, key, tensor, tp_rank, pp_stage, layer)
        if model_dtype is None or tensor.is_floating_point():
            model_dtype = _dtype_name(tensor.dtype)
    return model_dtype


def record_frozen(
    b: _Builder,
    param_shapes: Sequence[Mapping[str, Any]] | None,
    params: Mapping[str, Any],
) -> None:
    """Module parameters missing from ``param_shapes`` (what the optimizer flattens) are
    frozen."""
    if not param_shapes:
        return
    trainable = {name for group in param_shapes for name in group}
    for name in params:
        if name not in trainable and name not in b.aliases:
            b.frozen.add(name)


def record_state_refs(b: _Builder, sd: Mapping[str, Any], file: str) -> None:
    """Non-tensor state DeepSpeed keeps (scheduler, sampler, steps, config) and the client
    state, to carry over verbatim."""
    for key in DS_CARRIED_KEYS:
        if key in sd:
            b.refs.append(StateRef(name=key, file=file, key=(key,), summary=_summary(sd[key])))
    for key in sd:
        if key not in DS_MODEL_KEYS:
            summary = _summary(sd[key])
            b.refs.append(StateRef(name=f"client:{key}", file=file, key=(key,), summary=summary))
