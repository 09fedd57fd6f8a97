"""Reshape straight into a live DeepSpeed engine: a data-parallel-only change under ZeRO 1/2.

Why: writing a reshaped copy and loading it costs a full write and a full read of the optimizer
state (issue 5, Benchmark). When only dp changes (same tp, pp = 1, same ZeRO stage 1 or 2, the
plain ``"zero"`` wrapper), every rank can instead read the slices it owns from the source shards
(memory-mapped) and put them where DeepSpeed keeps them, with the same result bit for bit as
``convert`` followed by ``engine.load_checkpoint(load_optimizer_states=True)``.

How: the module weights and client state come from DeepSpeed's own
``engine.load_checkpoint(src, load_optimizer_states=False)``, which ends in
``_restore_from_bit16_weights``; :func:`fill_zero12_optimizer` then does what DeepSpeed's rigid
load (``_load_legacy_checkpoint``) does with a file at the new dp: ``_load_global_state``, the
base optimizer's ``load_state_dict`` with flat partition-length states, the fp32 partitions
(zero outside real data), and ``_link_all_hp_params``. The target geometry is
:func:`~lightning_reshape.checkpoint.zero_layout.zero_group_layout`, as in ``plan.py``.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from lightning_reshape.checkpoint.manifest import ROLE_FP32, ROLE_OPTIM, Manifest, TensorEntry
from lightning_reshape.checkpoint.reader import ShardReader, read_manifest, refuse_elastic
from lightning_reshape.checkpoint.safe_load import safe_load
from lightning_reshape.checkpoint.zero_layout import Fragment, zero_group_layout
from lightning_reshape.errors import CheckpointError

__all__ = ["direct_unsupported_reason", "fill_zero12_optimizer", "load_direct"]


def direct_unsupported_reason(engine: Any) -> str | None:
    """Why this engine cannot take the direct path (None: it can). Cheap, no IO."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = getattr(engine, "optimizer", None)
    if type(opt) is not DeepSpeedZeroOptimizer:
        return f"optimizer wrapper is {type(opt).__name__}, not DeepSpeedZeroOptimizer"
    if getattr(opt, "cpu_offload", False):
        return "optimizer offload"
    if getattr(opt, "round_robin_gradients", False):
        return "round_robin_gradients"
    if getattr(opt, "elastic_checkpoint", False):
        return "elastic_checkpoint"
    if getattr(engine, "has_moe_layers", False):
        return "MoE layers"
    if getattr(engine, "zero_nvme_offload_optimizer", lambda: False)():
        return "NVMe offload"
    return None


def _fill(
    out: torch.Tensor, fr: Fragment, entry: TensorEntry, tp_rank: int, reader: ShardReader
) -> None:
    """Copy elements ``[fr.param_start, +fr.numel)`` of ``entry`` (tp-local) to
    ``out[fr.partition_start:]``, reading only the overlapping stored pieces."""
    lo, hi = fr.param_start, fr.param_start + fr.numel
    covered = 0
    for p in entry.pieces:
        if p.tp_rank != tp_rank:
            continue
        a, b = max(lo, p.dst_offset), min(hi, p.dst_offset + p.numel)
        if a >= b:
            continue
        src = reader.read(p).narrow(0, a - p.dst_offset, b - a)
        out.narrow(0, fr.partition_start + a - lo, b - a).copy_(src)
        covered += b - a
    if covered != fr.numel:
        raise CheckpointError(
            f"{reader.root}: {entry.name} ({entry.role} {entry.state_key or ''}) has {covered} of "
            f"the {fr.numel} elements needed on tp rank {tp_rank}; the checkpoint is incomplete"
        )


def fill_zero12_optimizer(engine: Any, manifest: Manifest, *, tp_rank: int = 0) -> None:
    """Fill this rank's ZeRO 1/2 optimizer side (fp32 partitions, base optimizer state, loss
    scaler) from ``manifest``, a source that differs from the engine in dp only."""
    import torch.distributed as dist

    reason = direct_unsupported_reason(engine)
    if reason is not None:
        raise CheckpointError(f"direct load: {reason} is not supported")
    if manifest.optimizer_wrapper != "zero" or manifest.topology.pp != 1:
        raise CheckpointError(
            f"{manifest.root}: direct load needs a ZeRO 1/2 checkpoint at pp=1, found "
            f"wrapper {manifest.optimizer_wrapper!r} at pp={manifest.topology.pp}"
        )
    refuse_elastic(manifest)
    opt = engine.optimizer
    by_key = {e.key: e for e in manifest.tensors}
    zcfg = (getattr(engine, "config", None) or {}).get("zero_optimization") or {}
    align = bool(zcfg.get("parameter_alignment")) if isinstance(zcfg, dict) else False
    src_file = f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_optim_states.pt"
    if not os.path.isfile(os.path.join(manifest.root, src_file)):
        raise CheckpointError(f"{manifest.root}: {src_file} missing")

    with ShardReader(manifest.root, trust_checkpoint=manifest.trusted, check_crc=True) as reader:
        # the real objects (loss scaler, step tensors) go into the engine: torch's loader
        src_osd = safe_load(
            os.path.join(manifest.root, src_file), trust_checkpoint=manifest.trusted
        )["optimizer_state_dict"]
        base = src_osd["base_optimizer_state"]
        n_groups = len(opt.single_partition_of_fp32_groups)
        if len(base["param_groups"]) != n_groups:
            raise CheckpointError(
                f"{manifest.root}: {len(base['param_groups'])} optimizer param groups saved, "
                f"the engine has {n_groups}"
            )
        state: dict[int, dict[str, Any]] = {}
        fp32_parts: list[torch.Tensor] = []
        for g in range(n_groups):
            group = opt.real_dp_process_group[g]
            dp, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
            params = opt.bit16_groups[g]
            names = [(engine.param_names[p], p.numel()) for p in params]
            layout = zero_group_layout(
                names,
                dp,
                parameter_alignment=align,
                element_size=params[0].element_size(),
            )
            part = opt.single_partition_of_fp32_groups[g]
            if layout.partition_size != part.numel():
                raise CheckpointError(
                    f"group {g}: computed partition of {layout.partition_size} elements, the "
                    f"engine holds {part.numel()}"
                )
            frags = layout.rank_fragments(rank)
            for name, _ in names:
                e = by_key.get((name, ROLE_FP32, None))
                if e is None or (e.pieces and e.pieces[0].flat_group != g):
                    raise CheckpointError(
                        f"{manifest.root}: {name} is not in flat group {g} of the source"
                    )
            fp32 = torch.zeros(part.numel(), dtype=part.dtype)
            for fr in frags:
                _fill(fp32, fr, by_key[(fr.name, ROLE_FP32, None)], tp_rank, reader)
            fp32_parts.append(fp32)
            first = names[0][0]
            st: dict[str, Any] = {}
            for k, v in base["state"].get(g, {}).items():
                e = by_key.get((first, ROLE_OPTIM, k))
                if e is None:  # scalar (step) or non-flat state: carried as saved
                    st[k] = v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
                    continue
                flat = torch.zeros(layout.partition_size, dtype=getattr(torch, e.dtype))
                for fr in frags:
                    _fill(flat, fr, by_key[(fr.name, ROLE_OPTIM, k)], tp_rank, reader)
                st[k] = flat
            state[g] = st
        param_groups = copy.deepcopy(base["param_groups"])
        opt._load_global_state(src_osd)
    # as DeepSpeed's rigid load: base optimizer state, fp32 masters, then link the fragments
    opt.optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    for part, fp32 in zip(opt.single_partition_of_fp32_groups, fp32_parts, strict=True):
        part.data.copy_(fp32)
    opt._link_all_hp_params()


def load_direct(
    engine: Any,
    source: str,
    *,
    load_optimizer_states: bool = True,
    load_module_strict: bool = True,
    trust_checkpoint: bool = False,
    tp_rank: int = 0,
    manifest: Manifest | None = None,
) -> dict[str, Any]:
    """Load ``source`` (a DeepSpeed save dir or tag dir) into ``engine`` at another dp.

    Returns DeepSpeed's client state, as ``engine.load_checkpoint`` on a converted copy would.
    ``manifest`` (of ``source``) may be passed when already read.
    """
    if manifest is None:
        manifest = read_manifest(source, trust_checkpoint=trust_checkpoint)
    save_dir, tag = os.path.dirname(manifest.root), manifest.tag
    _, client_state = engine.load_checkpoint(
        save_dir,
        tag=tag,
        load_optimizer_states=False,
        load_lr_scheduler_states=False,
        load_module_strict=load_module_strict,
    )
    if client_state is None:
        raise CheckpointError(f"{source}: DeepSpeed could not load the module states")
    if load_optimizer_states:
        fill_zero12_optimizer(engine, manifest, tp_rank=tp_rank)
        client_state.pop("optimizer", None)
    engine.loaded_checkpoint_dp_world_size = engine.seq_dp_world_size
    return client_state
