"""Compare two checkpoints' logical content bit for bit, whatever their layouts.

Why: a reshape is only trustworthy if the state it moved is exactly the state it read. Two
checkpoints of the same training state at different (tp, pp, dp, ZeRO stage) must hold the same
logical tensors (fp32 masters, every optimizer state, buffers, frozen weights) bit for bit and the
same non-tensor state (optimizer step counters, loss scaler, lr scheduler, global steps, client
state). One logical tensor is in memory at a time. Like ``convert``, it reads torch's file
format itself and compares raw bytes: neither torch nor DeepSpeed is imported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from lightning_reshape.checkpoint import torchfile
from lightning_reshape.checkpoint.formats.zero3 import DEFAULT_SUB_GROUP_SIZE, zero3_layout
from lightning_reshape.checkpoint.manifest import (
    ROLE_BUFFER,
    ROLE_FP32,
    ROLE_OPTIM,
    ROLE_PARAM,
    Manifest,
)
from lightning_reshape.checkpoint.plan import read_source_meta, source_groups
from lightning_reshape.checkpoint.reader import ShardReader, entry_bytes, read_manifest
from lightning_reshape.checkpoint.sidecar import TPSplit, read_sidecar
from lightning_reshape.checkpoint.torchfile import Opaque, TensorRef, check_crcs, is_tensor
from lightning_reshape.errors import ReshapeError

__all__ = ["verify", "layout_problems"]

# Non-tensor state that must survive a reshape (layout keys such as dp_world_size may differ).
_CARRIED = ("lr_scheduler", "global_steps", "global_samples", "skipped_steps", "data_sampler")


def _ref_bytes(t: TensorRef) -> bytes:
    """A stored tensor's bytes in logical order, read from its file (torch only for the rare
    non-contiguous tensor)."""
    size = t.element_size()
    if t.is_contiguous() and t.file_offset is not None and t.storage.file is not None:
        fd = t.storage.file.open()
        try:
            return os.pread(fd, t.numel() * size, t.file_offset)
        finally:
            os.close(fd)
    import torch

    return t.to_torch().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(x: Any, y: Any) -> bool:
    """Equal values, tensors by dtype, shape and bits."""
    if is_tensor(x) or is_tensor(y):
        return (
            is_tensor(x)
            and is_tensor(y)
            and x.dtype == y.dtype
            and tuple(x.shape) == tuple(y.shape)
            and _ref_bytes(x) == _ref_bytes(y)
        )
    if isinstance(x, Opaque) or isinstance(y, Opaque):
        return type(x) is type(y) and _same(dict(vars(x)), dict(vars(y)))
    if isinstance(x, Mapping) and isinstance(y, Mapping):
        return list(x) == list(y) and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y, strict=True))
    return bool(x == y)


def _logical_keys(m: Manifest) -> dict[tuple[str, str, str | None], Any]:
    """Entries compared: masters, optimizer states, buffers, and weights with no master
    (frozen parameters; trainable weights are compared through their fp32 masters)."""
    masters = {e.name for e in m.entries(ROLE_FP32)}
    frozen = set(m.extra.get("frozen", ()))
    # ZeRO 0 with an fp32 model and a plain torch optimizer: the weights are the masters
    own_masters = m.topology.zero_stage == 0 and m.optimizer_wrapper == "none"
    out = {}
    for e in m.tensors:
        if e.role in (ROLE_FP32, ROLE_OPTIM, ROLE_BUFFER):
            out[e.key] = e
        elif e.role == ROLE_PARAM and e.name not in masters:
            trainable = own_masters and e.dtype == "float32" and e.name not in frozen
            out[(e.name, ROLE_FP32, None) if trainable else e.key] = e
    return out


def _steps(m: Manifest) -> list[tuple[str, Any]]:
    vals = {(s.state_key, repr(s.value)) for s in m.scalars}
    return sorted(vals)


def verify(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    trust: bool = False,
    limit: int | None = None,
) -> list[str]:
    """Differences between the logical content of checkpoints ``a`` and ``b`` (empty: equal):
    tensors, non-tensor state, each tensor's tensor-parallel split as far as ``a`` knows it,
    and every tensor record's CRC-32 in both (a corrupt record is an error, not a difference)."""
    ma = read_manifest(a, trust_checkpoint=trust)
    mb = read_manifest(b, trust_checkpoint=trust)
    for m in (ma, mb):  # bytes compared below must be the bytes that were saved
        for file in m.files:
            check_crcs(os.path.join(m.root, file))
    diffs: list[str] = []

    def add(msg: str) -> bool:
        diffs.append(msg)
        return limit is not None and len(diffs) >= limit

    for m in (ma, mb):
        for problem in layout_problems(m):
            if add(problem):
                return diffs
    ka, kb = _logical_keys(ma), _logical_keys(mb)
    for key in [k for k in ka if k not in kb] + [k for k in kb if k not in ka]:
        side = "a" if key in ka else "b"
        if add(f"{key[0]} ({key[1]} {key[2] or ''}): only in {side}".replace(" )", ")")):
            return diffs
    with (
        ShardReader(ma.root, trust_checkpoint=trust) as ra,
        ShardReader(mb.root, trust_checkpoint=trust) as rb,
    ):
        for key, ea in ka.items():
            if key not in kb:
                continue
            eb = kb[key]
            label = f"{key[0]} ({key[1]}{' ' + key[2] if key[2] else ''})"
            if ea.shape != eb.shape or ea.dtype != eb.dtype:
                if add(f"{label}: {ea.dtype}{list(ea.shape)} vs {eb.dtype}{list(eb.shape)}"):
                    return diffs
                continue
            ba, bb = entry_bytes(ea, ra), entry_bytes(eb, rb)
            if ba != bb:
                n = sum(1 for x, y in zip(ba, bb, strict=True) if x != y)
                if add(f"{label}: {n} bytes differ"):
                    return diffs
    sa, sb = _split_record(ma), _split_record(mb)
    for name in sa:
        if name not in sb:
            if add(f"{name}: tensor-parallel split {_split_text(sa[name])} recorded in a only"):
                return diffs
        elif sa[name] != sb[name]:
            what = f"{_split_text(sa[name])} vs {_split_text(sb[name])}"
            if add(f"{name}: tensor-parallel split {what}"):
                return diffs
    if _steps(ma) != _steps(mb):
        if add(f"optimizer scalar state: {_steps(ma)} vs {_steps(mb)}"):
            return diffs
    # non-tensor state of the first model file, and the optimizer's global state
    fa = torchfile.load(os.path.join(ma.root, _main_file(ma)), trust_checkpoint=trust)
    fb = torchfile.load(os.path.join(mb.root, _main_file(mb)), trust_checkpoint=trust)
    for k in (*_CARRIED, *sorted(set(ma.client_state_keys) | set(mb.client_state_keys))):
        if (k in fa) != (k in fb):
            if add(f"{k}: only in {'a' if k in fa else 'b'}"):
                return diffs
        elif k in fa and not _same(fa[k], fb[k]):
            if add(f"{k}: {_short(fa[k])} vs {_short(fb[k])}"):
                return diffs
    ra_refs = {r.name: r for r in ma.state_refs if r.name.startswith("optimizer:")}
    rb_refs = {r.name: r for r in mb.state_refs if r.name.startswith("optimizer:")}
    for name in sorted(set(ra_refs) & set(rb_refs)):
        if name == "optimizer:param_groups":
            continue
        va = _load_ref(ma, ra_refs[name].file, ra_refs[name].key, trust)
        vb = _load_ref(mb, rb_refs[name].file, rb_refs[name].key, trust)
        if not _same(va, vb):
            if add(f"{name}: {_short(va)} vs {_short(vb)}"):
                return diffs
    return diffs


def _split_record(m: Manifest) -> dict[str, TPSplit | None]:
    """How each tensor is split across tp ranks, as far as ``m`` knows it: from its tp shards
    (tp > 1), else from its sidecar. A later reshape needs this, so a reshape that drops it
    (verify(a, b): known in a, not in b) or changes it has lost information."""
    if m.topology.tp > 1:
        return {e.name: e.tp_split for e in m.tensors if e.role != ROLE_OPTIM}
    sidecar = read_sidecar(m.root)
    return dict(sidecar.tp_splits) if sidecar is not None else {}


def _split_text(split: TPSplit | None) -> str:
    return "replicated" if split is None else f"dim {split.dim} stride {split.stride}"


def layout_problems(m: Manifest) -> list[str]:
    """Where the files' ZeRO layout is not the one DeepSpeed builds for their own config and dp,
    which stock ``load_checkpoint`` refuses (or silently mis-assigns): each param group must list
    one flat partition (ZeRO 1/2) or exactly the ZeRO 3 sub-groups that ``sub_group_size`` cuts
    from it at this dp, holding the parameters ``param_shapes`` says."""
    stage = m.topology.zero_stage
    if stage not in (1, 2, 3):
        return []
    meta = read_source_meta(m)
    zcfg = meta.ds_config.get("zero_optimization") or {}
    sub_group_size = zcfg.get("sub_group_size", DEFAULT_SUB_GROUP_SIZE)
    local = {e.name: math.prod(e.pieces[0].local_shape) for e in m.entries(ROLE_FP32) if e.pieces}
    out = []
    for mp, sizes in sorted(meta.param_group_sizes.items()):
        file = os.path.join(m.root, meta.param_groups_ref[mp][0])
        if stage in (1, 2):
            if any(n != 1 for n in sizes):
                out.append(
                    f"{file}: optimizer param groups list {list(sizes)} flat partitions; ZeRO "
                    f"{stage} keeps one per group, so stock load_checkpoint refuses them"
                )
            continue
        try:
            groups = source_groups(m, meta, mp)
        except ReshapeError as exc:
            out.append(str(exc))
            continue
        lay = zero3_layout(
            [[(n, local[n]) for n in g] for g in groups],
            m.topology.dp,
            sub_group_size=sub_group_size,
        )
        want = tuple(
            tuple(p.name for p in lay.sub_group_params(s)) for s in range(len(lay.sub_group_numels))
        )
        want_sizes = tuple(lay.sub_group_to_group.count(g) for g in range(len(groups)))
        have = tuple(tuple(g) for g in meta.param_shapes[mp])
        if want != have or want_sizes != tuple(sizes):
            out.append(
                f"{file}: ZeRO 3 sub-groups {[len(g) for g in have]} (parameters per sub-group, "
                f"{list(sizes)} per param group) are not the {[len(g) for g in want]} "
                f"({list(want_sizes)} per param group) DeepSpeed builds at dp={m.topology.dp} "
                f"with zero_optimization.sub_group_size={sub_group_size}; stock load_checkpoint "
                "refuses this layout"
            )
    return out


def _main_file(m: Manifest) -> str:
    for f in m.files:
        if f.startswith("mp_rank_00_") or f.startswith("zero_pp_rank_0_mp_rank_00_model"):
            return f
    return m.files[0]


def _load_ref(m: Manifest, file: str, key: tuple[Any, ...], trust: bool) -> Any:
    obj = torchfile.load(os.path.join(m.root, file), trust_checkpoint=trust)
    for k in key:
        obj = obj[k]
    return obj


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) < 80 else text[:77] + "..."
