"""ZeRO 0 (data parallel without ZeRO): the write side of its optimizer state.

Why: without ZeRO every data-parallel rank holds the whole optimizer, and DeepSpeed saves it
once, as the plain torch ``optimizer.state_dict()`` inside ``mp_rank_XX_model_states.pt``
(``optimizer`` key; no optimizer files, ``param_shapes`` and ``shared_params`` None). Its state
is keyed by the running parameter index over the param groups, each state tensor has the
parameter's own shape, and ``param_groups[g]["params"]`` lists the indices. Changing dp is then
only rewriting ``dp_world_size``; moving to or from ZeRO 1/2/3 is cutting these whole tensors
into (or joining them from) flat partitions. Reading matches the optimizer's state indices
in order to the module's parameters by shape (those it skips are frozen).

With a bf16 model DeepSpeed wraps that optimizer in its unfused fp16 optimizer (bf16 mode): the
torch state dict moves to ``optimizer.optimizer_state_dict``, beside the loss-scale entries and
``fp32_groups`` (a whole fp32 copy per parameter). An fp16 model's dynamic loss scaling and the
fused (flat) variant are not supported. The optimizer is assumed to hold the trainable
parameters only (what ZeRO 1/2/3 keep); one built over frozen parameters too lists more
parameters per group, and torch's ``load_state_dict`` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_reshape.checkpoint.formats import model_states
from lightning_reshape.checkpoint.formats.zero12 import optim_refs
from lightning_reshape.checkpoint.manifest import (
    ROLE_FP32,
    ROLE_OPTIM,
    KeyPath,
    Manifest,
    ScalarState,
)
from lightning_reshape.checkpoint.plan import Carry, SetValue, TargetFile
from lightning_reshape.checkpoint.reader import _scalar, _shape, _whole
from lightning_reshape.checkpoint.torchfile import TensorRef, is_tensor
from lightning_reshape.errors import CheckpointError, LayoutError

if TYPE_CHECKING:
    from lightning_reshape.checkpoint.plan import PlanContext, RankPlan, _Selection
    from lightning_reshape.checkpoint.reader import _Builder

__all__ = ["optimizer_items", "plan_files", "read_optimizer", "target_wrapper"]

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


# --------------------------------------------------------------------------------------------
# write side: target layout -> model-states file holding the whole optimizer


def plan_files(ctx: PlanContext, rank: RankPlan, sel: _Selection) -> list[TargetFile]:
    """The one file of a target mp rank at ZeRO 0: its model states, optimizer inside."""
    name = f"mp_rank_{rank.out_mp:02d}_model_states.pt"
    if not sel.wants(name):
        return []

    def state(name: str, index: int, inner: KeyPath) -> list[Any]:
        return _param_state(ctx, rank, name, index, inner)

    def param_groups(dst: KeyPath, params: Sequence[Sequence[int]]) -> list[Any]:
        return ctx.param_groups(rank, dst, params)

    def master(name: str, key: KeyPath) -> Any:
        return ctx.whole(ctx.entry(name, ROLE_FP32), key, rank.mp)

    top = _loss_scale_top(ctx.manifest, ctx.meta.model_files[rank.src_mp])
    items = optimizer_items(ctx.groups, ctx.zero0_wrapper, state, param_groups, master, top)
    return [model_states.model_file(ctx, rank, name, ctx.groups, None, optimizer_items=items)]


def _param_state(
    ctx: PlanContext, rank: RankPlan, name: str, index: int, inner: KeyPath
) -> list[Any]:
    """Torch optimizer state of one parameter (ZeRO 0 target): its scalars, then its whole state
    tensors; nothing when it has no state (torch saves no entry)."""
    items: list[Any] = [SetValue((*inner, "state", index), {}, "raw")]
    if ctx.manifest.topology.zero_stage == 0:
        model_file = ctx.meta.model_files[rank.src_mp]
        items += [
            Carry(s.file, s.key, (*inner, "state", index, s.state_key))
            for s in ctx.manifest.scalars
            if s.owner == name and s.file == model_file
        ]
    else:
        items += ctx.scalar_carries(ctx.src_group_of[name], inner, rank.src_mp, index)
    for k in ctx.optim_keys.get(name, []):
        items.append(
            ctx.whole(ctx.entry(name, ROLE_OPTIM, k), (*inner, "state", index, k), rank.mp)
        )
    return items if len(items) > 1 else []


def _loss_scale_top(manifest: Manifest, model_file: str) -> list[Carry | SetValue]:
    """A bf16 ZeRO 0 optimizer's loss-scale entries: carried from a source saved the same way,
    else what DeepSpeed writes for bf16 (static scale 1, ``cur_iter`` counting the steps)."""
    refs = {r.name: r for r in manifest.state_refs if r.file == model_file}
    out: list[Carry | SetValue] = []
    defaults = {
        "dynamic_loss_scale": False,
        "cur_scale": 1.0,
        "cur_iter": manifest.global_steps or 0,
    }
    for k, value in defaults.items():
        ref = refs.get(f"optimizer:{k}")
        if manifest.optimizer_wrapper == "fp16_optimizer" and ref is not None:
            out.append(Carry(ref.file, ref.key, ("optimizer", k)))
        else:
            out.append(SetValue(("optimizer", k), value))
    return out


# --------------------------------------------------------------------------------------------
# read side: the optimizer inside a model-states file -> fp32 and state pieces per parameter


def read_optimizer(
    b: _Builder,
    sd: Mapping[str, Any],
    file: str,
    tp_rank: int,
    pp_stage: int,
    module_params: Mapping[str, tuple[str, KeyPath, TensorRef, int | None]],
) -> None:
    """ZeRO 0: a plain torch optimizer state dict (or FP16_Optimizer's wrapper of one), its
    state indices matched in order to the module's parameters by shape."""
    opt = sd.get("optimizer")
    if not isinstance(opt, Mapping):
        # no optimizer saved: the fp32 master is the module weight
        return
    inner_key, inner, fp32_list = _unwrap(b, file, opt)
    state = inner.get("state", {})
    indices = [i for g in inner.get("param_groups", []) for i in g["params"]]
    candidates = [
        (n, v) for n, v in module_params.items() if n not in b.aliases and v[2].numel() > 0
    ]
    # match optimizer indices (in order) to module parameters (in order) by shape
    ci = 0
    index_names: dict[Any, str] = {}
    for pos, idx in enumerate(indices):
        st = state.get(idx, {})
        fp32 = fp32_list[pos] if pos < len(fp32_list) else None
        name, ci = _match(b, file, candidates, ci, idx, _ref_shape(st, fp32))
        index_names[idx] = name
        if fp32 is not None:
            _whole(b, name, ROLE_FP32, None, file, fp32[0], fp32[1], tp_rank, pp_stage)
        _record_state(b, name, file, (*inner_key, "state", idx), st, tp_rank, pp_stage)
    for name, _ in candidates[ci:]:
        b.frozen.add(name)
    # the optimizer's param groups by name: what ZeRO 1/2/3 would flatten, group by group
    b.zero0_groups[file] = tuple(
        tuple(index_names[i] for i in g["params"]) for g in inner.get("param_groups", [])
    )
    optim_refs(b, file, opt, OPTIMIZER)


def _unwrap(
    b: _Builder, file: str, opt: Mapping[str, Any]
) -> tuple[KeyPath, Mapping[str, Any], list[tuple[KeyPath, TensorRef]]]:
    """(key path of the torch state dict, the state dict, the wrapper's fp32 copies in order)."""
    if "optimizer_state_dict" not in opt:
        return OPTIMIZER, opt, []
    # FP16_Optimizer / bf16 without ZeRO
    inner_key: KeyPath = (*OPTIMIZER, "optimizer_state_dict")
    fp32_groups = opt.get("fp32_groups") or opt.get("fp32_groups_flat")
    fp32_list: list[tuple[KeyPath, TensorRef]] = []
    for g, grp in enumerate(fp32_groups if fp32_groups is not None else ()):
        if is_tensor(grp):
            raise CheckpointError(f"{b.path(file)}: flat fp16 optimizer groups are not supported")
        for i, t in enumerate(grp):
            fp32_list.append(((*inner_key[:-1], "fp32_groups", g, i), t))
    return inner_key, opt["optimizer_state_dict"], fp32_list


def _ref_shape(
    st: Mapping[str, Any], fp32: tuple[KeyPath, TensorRef] | None
) -> tuple[int, ...] | None:
    """The shape of a parameter by its first state tensor, else its fp32 copy."""
    for v in st.values():
        if is_tensor(v) and v.dim() >= 1:
            return _shape(v.shape)
    return _shape(fp32[1].shape) if fp32 is not None else None


def _match(
    b: _Builder,
    file: str,
    candidates: Sequence[tuple[str, tuple[str, KeyPath, TensorRef, int | None]]],
    ci: int,
    idx: Any,
    ref_shape: tuple[int, ...] | None,
) -> tuple[str, int]:
    """The next module parameter of ``ref_shape`` from ``candidates[ci:]`` (those skipped are
    frozen: the optimizer does not hold them) and the index after it."""
    while ci < len(candidates):
        name, (_, _, tensor, _) = candidates[ci]
        ci += 1
        if ref_shape is None or _shape(tensor.shape) == ref_shape:
            return name, ci
        b.frozen.add(name)
    raise CheckpointError(
        f"{b.path(file)}: cannot match optimizer parameter {idx} (shape {ref_shape}) to a "
        "module parameter; add a lightning_reshape.json sidecar"
    )


def _record_state(
    b: _Builder,
    name: str,
    file: str,
    prefix: KeyPath,
    st: Mapping[str, Any],
    tp_rank: int,
    pp_stage: int,
) -> None:
    """One parameter's optimizer state: whole state tensors, and scalars (``step``)."""
    for k, v in st.items():
        if is_tensor(v) and v.dim() >= 1:
            _whole(b, name, ROLE_OPTIM, k, file, (*prefix, k), v, tp_rank, pp_stage)
        else:
            b.scalars.append(
                ScalarState(owner=name, state_key=k, value=_scalar(v), file=file, key=(*prefix, k))
            )
