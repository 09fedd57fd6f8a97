"""The reshape plan: for every target file, which slices of which source files fill it.

Why: reshaping is geometry once a checkpoint is described by a manifest. A plan is a pure value
(frozen dataclasses; file names relative to the tag folders; no tensors) that says, for every
file DeepSpeed expects at the target (tp, pp, dp, ZeRO stage), which tensors it holds and which
runs of source elements fill them, plus which non-tensor state is carried over verbatim and which
metadata is written fresh. It can be printed (``--dry-run``), tested without IO and split between
ranks (each executes a share of the files), like PyTorch DCP's planner.

Target layouts are DeepSpeed's own, computed by :mod:`zero_layout` for the target degrees: ZeRO 1/2
flat partitions (alignment, padding, ``param_slice_mappings``, ``group_paddings``), ZeRO 3
per-parameter partitions and sub-groups, model-states files per model-parallel rank with
``dp_world_size``/``mp_world_size``/``checkpoint_parallel_dimensions`` updated, tensor-parallel
shards cut by the split (dim, stride) recorded for each parameter, and for pipeline-engine
checkpoints the layer files (keyed by global layer index, so moving a layer is renaming it) with
the target stages balanced as ``PipelineModule``'s default ``partition_method="parameters"``
balances them, each stage's ZeRO 1 state re-partitioned. Values are moved bit for bit;
the only conversion is a ZeRO 3 source's fp32 master cast to the model dtype to fill a ZeRO 1/2
module weight, which is what DeepSpeed itself does after every step.
"""

from __future__ import annotations

import bisect
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_reshape.checkpoint import zero0
from lightning_reshape.checkpoint.manifest import (
    ROLE_BUFFER,
    ROLE_FP32,
    ROLE_OPTIM,
    ROLE_PARAM,
    KeyPath,
    Manifest,
    Piece,
    TensorEntry,
)
from lightning_reshape.checkpoint.reader import TIED_PREFIX, TPRule
from lightning_reshape.checkpoint.sidecar import Sidecar, TPSplit, read_sidecar
from lightning_reshape.checkpoint.zero_layout import (
    DEFAULT_SUB_GROUP_SIZE,
    pipeline_stages,
    undo_round_robin,
    zero3_layout,
    zero_group_layout,
)
from lightning_reshape.errors import CheckpointError, LayoutError

__all__ = [
    "Target",
    "Copy",
    "TensorFill",
    "Carry",
    "SetValue",
    "TargetFile",
    "Plan",
    "SourceMeta",
    "read_source_meta",
    "build_plan",
    "format_plan",
]

_ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class Target:
    """The layout to write: degrees and ZeRO stage."""

    tp: int
    pp: int
    dp: int
    zero_stage: int
    # DeepSpeed's PipelineModule partition_method of the target: "parameters" (its default),
    # "uniform", or the stage boundaries themselves ("0,3,6": pp + 1 layer offsets)
    pp_partition: str = "parameters"

    def __str__(self) -> str:
        text = f"tp={self.tp} pp={self.pp} dp={self.dp} zero_stage={self.zero_stage}"
        return (
            text
            if self.pp_partition == "parameters"
            else f"{text} pp_partition={self.pp_partition}"
        )


@dataclass(frozen=True)
class Copy:
    """``numel`` elements at element ``src_offset`` of the tensor at ``src_key`` in ``src_file``
    go to element ``dst_offset`` of the target tensor (cast when dtypes differ)."""

    src_file: str
    src_key: KeyPath
    src_offset: int
    dst_offset: int
    numel: int
    src_dtype: str


@dataclass(frozen=True)
class TensorFill:
    """One tensor of a target file: where it sits, its dtype/shape and the copies filling it.

    Elements no copy covers are zero (DeepSpeed's padding). ``tie`` names another fill of the
    same file whose tensor object this one is (tied weights share storage)."""

    key: KeyPath
    dtype: str
    shape: tuple[int, ...]
    copies: tuple[Copy, ...] = ()
    tie: KeyPath | None = None

    @property
    def numel(self) -> int:
        """Element count."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Carry:
    """Non-tensor state (or a container) copied verbatim from a source file."""

    src_file: str
    src_key: KeyPath
    dst_key: KeyPath


@dataclass(frozen=True)
class SetValue:
    """Metadata written fresh. ``kind``: ``raw`` (as is), ``list`` (a list of ``value`` Nones to
    fill by index), ``shapes`` (list of {name: shape} -> OrderedDict of torch.Size),
    ``frozen_shapes`` ({name: shape} -> OrderedDict), ``slice_mappings`` (list of
    {name: (numel, start)} -> DeepSpeed ``fragment_address``), ``zero_stage`` (DeepSpeed's enum),
    ``odict`` (an empty OrderedDict), ``loss_scaler`` (DeepSpeed's static ``LossScaler`` with
    ``value`` as its attributes)."""

    key: KeyPath
    value: Any
    kind: str = "raw"


@dataclass(frozen=True)
class TargetFile:
    """One file of the target tag folder and everything that goes into it, in order."""

    name: str
    items: tuple[Carry | SetValue | TensorFill, ...]

    @property
    def tensors(self) -> tuple[TensorFill, ...]:
        """The tensor fills of this file."""
        return tuple(i for i in self.items if isinstance(i, TensorFill))

    def copy_bytes(self) -> int:
        """Bytes of planned tensor data (what the executor moves)."""
        return sum(t.numel * _ELEMENT_SIZE.get(t.dtype, 4) for t in self.tensors if t.tie is None)

    def sources(self) -> dict[str, int]:
        """Source file -> bytes read from it."""
        out: dict[str, int] = {}
        for t in self.tensors:
            for c in t.copies:
                out[c.src_file] = out.get(c.src_file, 0) + c.numel * _ELEMENT_SIZE.get(
                    c.src_dtype, 4
                )
        for it in self.items:  # a file that only carries values is a source too
            if isinstance(it, Carry):
                out.setdefault(it.src_file, 0)
        return out


@dataclass(frozen=True)
class Plan:
    """Everything needed to write the target tag folder; a pure value."""

    source_root: str
    source_tag: str
    source: str  # e.g. "tp=1 pp=1 dp=2 zero_stage=1"
    target: Target
    files: tuple[TargetFile, ...]
    trusted: bool = False
    #: written next to the target files, so the output can itself be reshaped again (DeepSpeed
    #: does not record tensor-parallel splits); None when the splits are unknown (tp 1 -> 1)
    sidecar: Sidecar | None = None

    def file(self, name: str) -> TargetFile:
        """The target file called ``name``."""
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)

    def shard(self, index: int, count: int) -> tuple[str, ...]:
        """Names of the files rank ``index`` of ``count`` writes (balanced by bytes)."""
        if not 0 <= index < count:
            raise LayoutError(f"shard index {index} is outside 0..{count - 1}")
        loads = [0] * count
        owner: dict[str, int] = {}
        for f in sorted(self.files, key=lambda f: (-f.copy_bytes(), f.name)):
            k = loads.index(min(loads))
            owner[f.name] = k
            loads[k] += f.copy_bytes() + 1
        return tuple(f.name for f in self.files if owner[f.name] == index)


@dataclass(frozen=True)
class SourceMeta:
    """Metadata of the source the plan needs beyond the manifest (read once, no tensors)."""

    #: per source mp rank: the main model-states file and its top-level keys in order
    model_files: Mapping[int, str]
    model_keys: Mapping[int, tuple[str, ...]]
    #: per source mp rank: module state-dict keys in order (params, buffers, aliases)
    module_keys: Mapping[int, tuple[str, ...]]
    param_shapes: Mapping[int, tuple[tuple[str, ...], ...]]  # names per flat group, flat order
    shared_params: Mapping[int, Mapping[str, str]]
    ds_config: Mapping[str, Any]
    #: per source mp rank: dp-0 optimizer file and key path of its inner torch state dict
    optim_files: Mapping[int, str]
    optim_inner: KeyPath
    optim_top_keys: tuple[str, ...]
    tp_splits: Mapping[str, TPSplit | None] = field(default_factory=dict)
    #: per source mp rank: (file, key path) of the torch optimizer's ``param_groups`` list, and
    #: how many tensors each group lists (ZeRO 1/2: 1 flat; ZeRO 3: its sub-groups; ZeRO 0: its
    #: parameters)
    param_groups_ref: Mapping[int, tuple[str, KeyPath]] = field(default_factory=dict)
    param_group_sizes: Mapping[int, tuple[int, ...]] = field(default_factory=dict)


def read_source_meta(manifest: Manifest) -> SourceMeta:
    """Read the few non-tensor facts a plan needs (key orders, group lists, config)."""
    from lightning_reshape.checkpoint.torchfile import load

    topo = manifest.topology
    root = manifest.root
    names = set(os.listdir(root))
    model_files: dict[int, str] = {}
    model_keys: dict[int, tuple[str, ...]] = {}
    module_keys: dict[int, tuple[str, ...]] = {}
    param_shapes: dict[int, tuple[tuple[str, ...], ...]] = {}
    shared: dict[int, Mapping[str, str]] = {}
    optim_files: dict[int, str] = {}
    ds_config: Mapping[str, Any] = {}
    optim_inner: KeyPath = ()
    optim_top: tuple[str, ...] = ()
    pg_ref: dict[int, tuple[str, KeyPath]] = {}
    pg_sizes: dict[int, tuple[int, ...]] = {}
    for mp in range(topo.mp):
        plain = f"mp_rank_{mp:02d}_model_states.pt"
        z3 = f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"
        file = plain if plain in names else z3
        sd = load(os.path.join(root, file), trust_checkpoint=manifest.trusted)
        model_files[mp] = file
        model_keys[mp] = tuple(sd)
        module = sd.get("module")
        module_keys[mp] = tuple(module) if isinstance(module, Mapping) else ()
        param_shapes[mp] = tuple(tuple(g) for g in sd.get("param_shapes") or [])
        shared[mp] = dict(sd.get("shared_params") or {})
        ds_config = sd.get("ds_config") or ds_config
        for prefix in ("", "bf16_"):
            oname = f"{prefix}zero_pp_rank_0_mp_rank_{mp:02d}_optim_states.pt"
            if oname in names:
                optim_files[mp] = oname
                osd = load(os.path.join(root, oname), trust_checkpoint=manifest.trusted)
                inner = osd["optimizer_state_dict"]
                key: KeyPath = (
                    ("optimizer_state_dict", "base_optimizer_state")
                    if "base_optimizer_state" in inner
                    else ("optimizer_state_dict", "optimizer_state_dict")
                )
                if mp == 0:
                    optim_top = tuple(inner)
                    optim_inner = key
                pg_ref[mp] = (oname, (*key, "param_groups"))
                pg_sizes[mp] = tuple(len(g["params"]) for g in _get_path(osd, pg_ref[mp][1]))
        opt = sd.get("optimizer")
        if mp not in pg_ref and isinstance(opt, Mapping):  # ZeRO 0: in the model file
            key = (
                ("optimizer", "optimizer_state_dict")
                if "optimizer_state_dict" in opt
                else ("optimizer",)
            )
            pg_ref[mp] = (file, (*key, "param_groups"))
            pg_sizes[mp] = tuple(len(g["params"]) for g in _get_path(sd, pg_ref[mp][1]))
    sidecar = read_sidecar(root)
    return SourceMeta(
        model_files=model_files,
        model_keys=model_keys,
        module_keys=module_keys,
        param_shapes=param_shapes,
        shared_params=shared,
        ds_config=dict(ds_config),
        optim_files=optim_files,
        optim_inner=optim_inner,
        optim_top_keys=optim_top,
        tp_splits=dict(sidecar.tp_splits) if sidecar is not None else {},
        param_groups_ref=pg_ref,
        param_group_sizes=pg_sizes,
    )


def _get_path(obj: Any, key: KeyPath) -> Any:
    for k in key:
        obj = obj[k]
    return obj


# --------------------------------------------------------------------------------------------
# geometry: target tp-local flat ranges -> source pieces


def _local_shape(shape: tuple[int, ...], split: TPSplit | None, tp: int) -> tuple[int, ...]:
    if split is None or tp == 1:
        return shape
    out = list(shape)
    out[split.dim] //= tp
    return tuple(out)


def _check_split(name: str, shape: tuple[int, ...], split: TPSplit, tps: Sequence[int]) -> None:
    if split.dim >= len(shape):
        raise LayoutError(
            f"{name}: tensor-parallel split dim {split.dim} is out of range for shape {shape}; "
            "fix its tensor-parallel rule"
        )
    for tp in tps:
        if shape[split.dim] % (split.stride * tp):
            raise LayoutError(
                f"{name}: dim {split.dim} of shape {shape} (stride {split.stride}) does not split "
                f"into {tp} tensor-parallel shards; choose a tp that divides "
                f"{shape[split.dim] // split.stride}"
            )


def _tp_runs(
    shape: tuple[int, ...],
    split: TPSplit | None,
    src_tp: int,
    tgt_tp: int,
    tgt_rank: int,
) -> Iterator[tuple[int, int, int, int]]:
    """(src tp rank, src local flat offset, dst local flat offset, numel) covering target
    rank ``tgt_rank``'s whole shard, in dst order."""
    if split is None or src_tp == tgt_tp:
        src_rank = tgt_rank if (split is not None and src_tp == tgt_tp) else 0
        if split is None and src_tp == tgt_tp:
            src_rank = tgt_rank
        yield (src_rank, 0, 0, math.prod(_local_shape(shape, split, tgt_tp)))
        return
    d, s = split.dim, split.stride
    big = shape[d]
    outer = math.prod(shape[:d])
    inner = math.prod(shape[d + 1 :])
    w_t, w_s = big // (s * tgt_tp), big // (s * src_tp)
    d_t, d_s = big // tgt_tp, big // src_tp
    for o in range(outer):
        for c in range(s):
            a = tgt_rank * w_t  # rows within the stride chunk
            end = a + w_t
            dst = (o * d_t + c * w_t) * inner
            while a < end:
                q, jq = divmod(a, w_s)
                b = min(end, (q + 1) * w_s)
                n = (b - a) * inner
                yield (q, (o * d_s + c * w_s + jq) * inner, dst, n)
                dst += n
                a = b


class _Resolver:
    """Turns (entry, target tp rank, local range) into Copy runs through the entry's pieces."""

    def __init__(self, manifest: Manifest, splits: Mapping[str, TPSplit | None], tgt_tp: int):
        self.m = manifest
        self.splits = splits
        self.tgt_tp = tgt_tp
        self._pieces: dict[tuple[Any, int], tuple[list[int], list[Piece]]] = {}
        self._runs: dict[tuple[Any, ...], tuple[list[int], list[tuple[int, ...]]]] = {}

    def pieces(self, entry: TensorEntry, rank: int) -> tuple[list[int], list[Piece]]:
        key = (entry.key, rank)
        if key not in self._pieces:
            ps = sorted((p for p in entry.pieces if p.tp_rank == rank), key=lambda p: p.dst_offset)
            if not ps:
                ranks = sorted({p.tp_rank for p in entry.pieces})
                ps = sorted(
                    (p for p in entry.pieces if p.tp_rank == ranks[0]), key=lambda p: p.dst_offset
                )
            self._pieces[key] = ([p.dst_offset for p in ps], ps)
        return self._pieces[key]

    def runs(self, entry: TensorEntry, rank: int) -> tuple[list[int], list[tuple[int, ...]]]:
        """(dst starts, runs) of ``_tp_runs``, adjacent runs merged; shared by every entry of
        the same shape and split (a parameter, its master and each optimizer state)."""
        split = self.splits.get(entry.name)
        key = (entry.shape, split, rank)
        if key not in self._runs:
            runs: list[tuple[int, ...]] = []
            for r in _tp_runs(entry.shape, split, self.m.topology.tp, self.tgt_tp, rank):
                if runs and runs[-1][0] == r[0] and runs[-1][1] + runs[-1][3] == r[1]:
                    last = runs[-1]
                    runs[-1] = (last[0], last[1], last[2], last[3] + r[3])
                else:
                    runs.append(r)
            self._runs[key] = ([r[2] for r in runs], runs)
        return self._runs[key]

    def copies(self, entry: TensorEntry, rank: int, lo: int, hi: int, dst_base: int) -> list[Copy]:
        """Copies placing target-local elements [lo, hi) of ``entry`` at ``dst_base``."""
        out: list[Copy] = []
        starts, runs = self.runs(entry, rank)
        pieces: dict[int, tuple[list[int], list[Piece]]] = {}
        i = max(0, bisect.bisect_right(starts, lo) - 1)
        while i < len(runs) and runs[i][2] < hi:
            src_rank, s_off, d_off, n = runs[i]
            a, b = max(lo, d_off), min(hi, d_off + n)
            if a < b:
                if src_rank not in pieces:
                    pieces[src_rank] = self.pieces(entry, src_rank)
                self._piece_copies(
                    entry, pieces[src_rank], s_off + a - d_off, b - a, dst_base + a - lo, out
                )
            i += 1
        return out

    def _piece_copies(
        self,
        entry: TensorEntry,
        pieces: tuple[list[int], list[Piece]],
        src_lo: int,
        n: int,
        dst: int,
        out: list[Copy],
    ) -> None:
        offs, ps = pieces
        pos, end = src_lo, src_lo + n
        i = max(0, bisect.bisect_right(offs, pos) - 1)
        while pos < end:
            if i >= len(ps) or ps[i].dst_offset > pos:
                raise CheckpointError(
                    f"{self.m.root}: {entry.name} ({entry.role} {entry.state_key or ''}) has no "
                    f"stored element {pos} on tp rank {ps[0].tp_rank if ps else '?'}; the "
                    "checkpoint is incomplete"
                )
            p = ps[i]
            take = min(end, p.dst_offset + p.numel) - pos
            if take <= 0:
                i += 1
                continue
            prev = out[-1] if out else None
            src_off = p.src_offset + pos - p.dst_offset
            if (
                prev is not None
                and prev.src_file == p.file
                and prev.src_key == p.key
                and prev.src_offset + prev.numel == src_off
                and prev.dst_offset + prev.numel == dst
            ):
                out[-1] = Copy(
                    p.file, p.key, prev.src_offset, prev.dst_offset, prev.numel + take, entry.dtype
                )
            else:
                out.append(Copy(p.file, p.key, src_off, dst, take, entry.dtype))
            pos += take
            dst += take
            i += 1


# --------------------------------------------------------------------------------------------
# the plan


def _splits(
    manifest: Manifest, meta: SourceMeta, target: Target, rules: Sequence[TPRule]
) -> tuple[dict[str, TPSplit | None], set[str]]:
    """(split of every tensor name, names whose split is known rather than assumed: proven or
    recorded at source tp > 1, a rule, or the source's sidecar); refuse a tp change where a
    split is unknown."""
    out: dict[str, TPSplit | None] = {}
    recorded: set[str] = set()
    src_tp = manifest.topology.tp
    unknown: list[str] = []
    for e in manifest.tensors:
        if e.name in out:
            continue
        split: TPSplit | None = e.tp_split
        known = src_tp > 1 or target.tp == 1
        if src_tp > 1:
            recorded.add(e.name)
        for rule in rules:
            if re.search(rule.pattern, e.name):
                split, known = rule.split, True
                recorded.add(e.name)
                break
        else:
            # At source tp 1 the manifest cannot see splits (every tensor is whole), but the
            # source's sidecar may still record them from an earlier reshape: keep them, or a
            # later tp change from this output would treat split tensors as replicated.
            if src_tp == 1 and e.name in meta.tp_splits:
                split, known = meta.tp_splits[e.name], True
                recorded.add(e.name)
        if not known and target.tp != src_tp:
            unknown.append(e.name)
        out[e.name] = split
    if unknown:
        more = f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
        raise CheckpointError(
            f"{manifest.root}: cannot change tensor parallelism from {src_tp} to {target.tp}: the "
            f"split of {', '.join(repr(u) for u in unknown[:4])}"
            f"{more} is unknown; "
            "save with the lightning-reshape strategy (it writes lightning_reshape.json) or pass "
            "tp_rules (CLI: --tp-rule PATTERN=DIM[:STRIDE] or PATTERN=replicated)"
        )
    for name, split in out.items():
        if split is not None and target.tp != src_tp:
            shape = next(e.shape for e in manifest.tensors if e.name == name)
            _check_split(name, shape, split, (src_tp, target.tp))
    return out, recorded | (set(out) if target.tp != src_tp else set())


def build_plan(
    manifest: Manifest,
    meta: SourceMeta,
    target: Target,
    *,
    tp_rules: Sequence[TPRule] = (),
) -> Plan:
    """The plan writing ``manifest``'s checkpoint at ``target``. Pure: no IO.

    Raises LayoutError/CheckpointError (nothing written) for a target that cannot be reached.
    """
    src = manifest.topology
    for name in ("tp", "pp", "dp"):
        value = getattr(target, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayoutError(f"target {name}={value!r} must be an integer >= 1")
    if target.zero_stage not in (0, 1, 2, 3):
        raise LayoutError(
            f"target zero_stage={target.zero_stage} is not supported; convert to ZeRO 0, 1, 2 or 3"
        )
    pipeline = "pipeline" in manifest.layout
    _check_source(manifest, pipeline)
    if not pipeline and (src.pp != 1 or target.pp != 1):
        raise CheckpointError(
            f"{manifest.root}: source pp={src.pp}, target pp={target.pp}: a pipeline change needs "
            "a pipeline-engine checkpoint (layer_XX-model_YY-model_states.pt files, saved from a "
            "PipelineModule); this one holds a plain module, so keep pp=1"
        )
    if pipeline and target.zero_stage != 1:
        raise LayoutError(
            f"target zero_stage={target.zero_stage}: DeepSpeed's pipeline engine supports ZeRO "
            "stage 1 only here; convert with zero_stage=1"
        )
    splits, recorded = _splits(manifest, meta, target, tp_rules)
    res = _Resolver(manifest, splits, target.tp)
    by_key = {e.key: e for e in manifest.tensors}
    aliases = dict(manifest.aliases)
    zcfg = dict(meta.ds_config.get("zero_optimization") or {})
    rr = bool(zcfg.get("round_robin_gradients")) and src.zero_stage in (1, 2)
    rr_t = bool(zcfg.get("round_robin_gradients"))
    align = bool(zcfg.get("parameter_alignment"))
    sub_group_size = zcfg.get("sub_group_size", DEFAULT_SUB_GROUP_SIZE)
    model_dtype = manifest.model_dtype
    if model_dtype not in _ELEMENT_SIZE:
        raise CheckpointError(f"{manifest.root}: unknown model dtype {model_dtype!r}")
    bf16 = model_dtype == "bfloat16"
    tgt_config = {**dict(meta.ds_config), "zero_optimization": {**zcfg, "stage": target.zero_stage}}
    zero0_wrapper = zero0.target_wrapper(manifest, tgt_config) if target.zero_stage == 0 else ""
    # DeepSpeed's BF16_Optimizer instead of its ZeRO optimizer at the target?
    bf16_optimizer = uses_bf16_optimizer(tgt_config, target.zero_stage, pipeline)

    # groups in optimizer order (tp rank 0 of each source stage defines names; shapes come from
    # entries); a pipeline's stages each hold a slice of every group, in layer order
    groups: list[tuple[str, ...]] = []
    for stage in range(src.pp if pipeline else 1):
        for g, names in enumerate(source_groups(manifest, meta, stage * src.tp)):
            names = undo_round_robin(names, src.dp) if rr else tuple(names)
            if g < len(groups):
                # a TiedLayerSpec module is held by every stage using it: listed once
                groups[g] += tuple(n for n in names if n not in groups[g])
            else:
                groups.append(names)
    ties = (manifest.extra.get("pipeline_layers") or {}).get("ties") or {}
    stages = _target_stages(manifest, target, groups, splits) if pipeline else None
    optim_keys: dict[str, list[str]] = {}
    for e in manifest.entries(ROLE_OPTIM):
        assert e.state_key is not None
        optim_keys.setdefault(e.name, [])
        if e.state_key not in optim_keys[e.name]:
            optim_keys[e.name].append(e.state_key)
    src_group_of: dict[str, int] = {}
    for e in manifest.entries(ROLE_FP32):
        if e.pieces and e.pieces[0].flat_group is not None:
            src_group_of[e.name] = e.pieces[0].flat_group

    def entry(name: str, role: str, state_key: str | None = None) -> TensorEntry:
        try:
            return by_key[(name, role, state_key)]
        except KeyError:
            if role == ROLE_FP32 and src.zero_stage == 0 and model_dtype == "float32":
                # a ZeRO 0 fp32 run's weights are its own masters
                return entry(name, ROLE_PARAM)
            raise CheckpointError(
                f"{manifest.root}: {name} has no {role} {state_key or ''} tensor in the source; "
                "the checkpoint is incomplete"
            ) from None

    def local_numel(name: str) -> int:
        e = by_key.get((name, ROLE_FP32, None)) or by_key[(name, ROLE_PARAM, None)]
        return math.prod(_local_shape(e.shape, splits.get(name), target.tp))

    def local_shape(e: TensorEntry) -> tuple[int, ...]:
        return _local_shape(e.shape, splits.get(e.name), target.tp)

    def scalar_carries(
        group: int, dst_prefix: KeyPath, src_mp: int, tgt_group: int, first: str = ""
    ) -> list[Carry]:
        out = []
        if src.zero_stage == 0:  # per-parameter scalars: those of the group's first parameter
            return [
                Carry(s.file, s.key, (*dst_prefix, "state", tgt_group, s.state_key))
                for s in manifest.scalars
                if s.owner == first and s.file == meta.model_files[src_mp]
            ]
        for s in manifest.scalars:
            if s.owner == f"mp{src_mp}.group{group}" and s.file == _first_optim(s.file):
                out.append(Carry(s.file, s.key, (*dst_prefix, "state", tgt_group, s.state_key)))
        return out

    def _first_optim(file: str) -> str:
        return file if "zero_pp_rank_0_" in file else ""

    files: list[TargetFile] = []
    frozen = [e for e in manifest.entries(ROLE_PARAM) if e.name not in _trainable(groups)]
    buffers = {e.name: e for e in manifest.entries(ROLE_BUFFER)}
    prefix = "bf16_" if bf16 else ""

    for out_mp in range(target.tp * target.pp):
        stage, mp = divmod(out_mp, target.tp)  # mp: the target tp rank from here on
        stage_groups = groups
        src_stage = 0
        if stages is not None:
            lo, hi = stages[stage], stages[stage + 1]
            stage_groups = [_stage_names(g, lo, hi, ties) for g in groups]
            first = next((g[0] for g in stage_groups if g), None)
            if first is None:
                raise LayoutError(
                    f"{manifest.root}: target pipeline stage {stage} (layers {lo}..{hi - 1}) holds "
                    f"no trainable parameter at pp={target.pp}; choose a smaller pp"
                )
            src_stage = entry(first, ROLE_FP32).pieces[0].pp_stage
            # DeepSpeed builds one flat group per optimizer param group, empty or not
            stage_groups = [g for g in stage_groups if g]
            if len(stage_groups) != len(groups):
                raise LayoutError(
                    f"{manifest.root}: target pipeline stage {stage} would hold parameters of "
                    f"only {len(stage_groups)} of the {len(groups)} optimizer param groups; "
                    "such a layout is not supported"
                )
        src_mp = src_stage * src.tp + (mp if target.tp == src.tp else 0)
        pg_file, pg_key = meta.param_groups_ref.get(src_mp) or (
            meta.optim_files[src_mp],
            (*meta.optim_inner, "param_groups"),
        )

        def param_groups(
            dst: KeyPath,
            params: Sequence[Sequence[int]],
            pg_file: str = pg_file,
            pg_key: KeyPath = pg_key,
        ) -> list[Any]:
            """The source's param groups (hyperparameters as saved) listing ``params``."""
            out: list[Any] = [SetValue(dst, len(params), "list")]
            for g, idx in enumerate(params):
                out.append(Carry(pg_file, (*pg_key, g), (*dst, g)))
                out.append(SetValue((*dst, g, "params"), list(idx)))
            return out

        def zero0_state(
            name: str, index: int, inner: KeyPath, src_mp: int = src_mp, mp: int = mp
        ) -> list[Any]:
            """Torch optimizer state of one parameter (ZeRO 0 target): its scalars, then its
            whole state tensors."""
            items: list[Any] = [SetValue((*inner, "state", index), {}, "raw")]
            if src.zero_stage == 0:
                items += [
                    Carry(s.file, s.key, (*inner, "state", index, s.state_key))
                    for s in manifest.scalars
                    if s.owner == name and s.file == meta.model_files[src_mp]
                ]
            else:
                items += scalar_carries(src_group_of[name], inner, src_mp, index)
            for k in optim_keys.get(name, []):
                items.append(whole(entry(name, ROLE_OPTIM, k), (*inner, "state", index, k), mp))
            return items if len(items) > 1 else []  # no state: torch saves no entry

        def whole(e: TensorEntry, key: KeyPath, mp: int = mp) -> TensorFill:
            """``e``'s whole (tp-local) tensor at ``key``."""
            shape = local_shape(e)
            return TensorFill(key, e.dtype, shape, tuple(res.copies(e, mp, 0, math.prod(shape), 0)))

        if target.zero_stage == 0:
            files.append(
                _model_file(
                    f"mp_rank_{out_mp:02d}_model_states.pt",
                    manifest,
                    meta,
                    target,
                    mp,
                    src_mp,
                    res,
                    entry,
                    local_shape,
                    groups,
                    frozen,
                    buffers,
                    aliases,
                    tgt_config,
                    None,
                    optimizer_items=zero0.optimizer_items(
                        groups,
                        zero0_wrapper,
                        zero0_state,
                        param_groups,
                        lambda name, key: whole(entry(name, ROLE_FP32), key),
                        _loss_scale_top(manifest, meta.model_files[src_mp]),
                    ),
                )
            )
        elif target.zero_stage in (1, 2):
            layouts = [
                zero_group_layout(
                    [(n, local_numel(n)) for n in names],
                    target.dp,
                    optimizer="bf16" if bf16_optimizer else "zero",
                    round_robin_gradients=rr_t and not bf16_optimizer,
                    parameter_alignment=align and not bf16_optimizer,
                    element_size=_ELEMENT_SIZE[model_dtype],
                )
                for names in stage_groups
            ]
            flat_names = [tuple(p.name for p in lay.params) for lay in layouts]
            for r in range(target.dp):
                items: list[Carry | SetValue | TensorFill] = [
                    SetValue(("optimizer_state_dict",), {}, "raw"),
                    *_optimizer_top(meta, src_mp, "bf16" if bf16_optimizer else "zero"),
                    SetValue(("optimizer_state_dict", "base_optimizer_state"), {}, "raw"),
                    SetValue(("optimizer_state_dict", "base_optimizer_state", "state"), {}, "raw"),
                    *param_groups(
                        ("optimizer_state_dict", "base_optimizer_state", "param_groups"),
                        [[g] for g in range(len(layouts))],
                    ),
                    SetValue(
                        ("optimizer_state_dict", "single_partition_of_fp32_groups"),
                        len(layouts),
                        "list",
                    ),
                ]
                base = ("optimizer_state_dict", "base_optimizer_state")
                for g, lay in enumerate(layouts):
                    first = lay.params[0].name
                    sg = src_group_of.get(first, g)
                    items.append(SetValue((*base, "state", g), {}, "raw"))
                    items.extend(scalar_carries(sg, base, src_mp, g, first))
                    frags = lay.rank_fragments(r)
                    fp32_copies: list[Copy] = []
                    for fr in frags:
                        e = entry(fr.name, ROLE_FP32)
                        fp32_copies += res.copies(
                            e, mp, fr.param_start, fr.param_start + fr.numel, fr.partition_start
                        )
                    saved = lay.saved_partition_numel(r)
                    items.append(
                        TensorFill(
                            ("optimizer_state_dict", "single_partition_of_fp32_groups", g),
                            entry(first, ROLE_FP32).dtype,
                            (saved,),
                            tuple(fp32_copies),
                        )
                    )
                    for k in optim_keys.get(first, []):
                        copies: list[Copy] = []
                        for fr in frags:
                            e = entry(fr.name, ROLE_OPTIM, k)
                            copies += res.copies(
                                e, mp, fr.param_start, fr.param_start + fr.numel, fr.partition_start
                            )
                        items.append(
                            TensorFill(
                                (*base, "state", g, k),
                                entry(first, ROLE_OPTIM, k).dtype,
                                (lay.partition_size,),
                                tuple(copies),
                            )
                        )
                if not bf16_optimizer:  # BF16_Optimizer records neither
                    items.append(
                        SetValue(
                            ("optimizer_state_dict", "zero_stage"), target.zero_stage, "zero_stage"
                        )
                    )
                items.append(
                    SetValue(
                        ("optimizer_state_dict", "group_paddings"),
                        [lay.group_paddings[r] for lay in layouts],
                    )
                )
                if not bf16_optimizer:
                    items.append(
                        SetValue(
                            ("optimizer_state_dict", "param_alignment_paddings"),
                            [list(lay.param_alignment_paddings) for lay in layouts],
                        )
                    )
                items += [
                    SetValue(
                        ("optimizer_state_dict", "partition_count"), [target.dp] * len(layouts)
                    ),
                    SetValue(("optimizer_state_dict", "ds_version"), manifest.ds_version),
                    SetValue(
                        ("optimizer_state_dict", "param_slice_mappings"),
                        [
                            {n: (a.numel, a.start) for n, a in lay.slice_mappings[r].items()}
                            for lay in layouts
                        ],
                        "slice_mappings",
                    ),
                    SetValue(("ds_config",), tgt_config),
                    SetValue(("ds_version",), manifest.ds_version),
                ]
                files.append(
                    TargetFile(
                        f"{prefix}zero_pp_rank_{r}_mp_rank_{out_mp:02d}_optim_states.pt",
                        tuple(items),
                    )
                )
            if stages is not None:
                lo, hi = stages[stage], stages[stage + 1]
                files += _layer_files(manifest, res, local_shape, lo, hi, mp)
            stage_buffers = None
            if stages is not None:
                stage_buffers = [n for n in buffers if _in_stage(n, lo, hi, ties)]
            files.append(
                _model_file(
                    f"mp_rank_{out_mp:02d}_model_states.pt",
                    manifest,
                    meta,
                    target,
                    mp,
                    src_mp,
                    res,
                    entry,
                    local_shape,
                    flat_names,
                    frozen,
                    buffers,
                    aliases,
                    tgt_config,
                    None,
                    stage_buffers,
                )
            )
        else:
            lay3 = zero3_layout(
                [[(n, local_numel(n)) for n in names] for names in groups],
                target.dp,
                sub_group_size=sub_group_size,
            )
            # each param group lists its sub-groups' fp32 partitions, in order
            sub_lists = [
                [s for s, g in enumerate(lay3.sub_group_to_group) if g == group]
                for group in range(len(groups))
            ]
            sub_names = [
                tuple(p.name for p in lay3.sub_group_params(s))
                for s in range(len(lay3.sub_group_numels))
            ]
            inner = ("optimizer_state_dict", "optimizer_state_dict")
            for r in range(target.dp):
                items = [
                    SetValue(("optimizer_state_dict",), {}, "raw"),
                    SetValue(("optimizer_state_dict", "zero_stage"), 3, "zero_stage"),
                    *_optimizer_top(meta, src_mp, "zero3"),
                    SetValue(("optimizer_state_dict", "partition_count"), target.dp),
                    SetValue(inner, {}, "raw"),
                    SetValue((*inner, "state"), {}, "raw"),
                    *param_groups((*inner, "param_groups"), sub_lists),
                    SetValue(
                        ("optimizer_state_dict", "fp32_flat_groups"),
                        len(lay3.sub_group_numels),
                        "list",
                    ),
                ]
                for s, numel in enumerate(lay3.sub_group_numels):
                    params = lay3.sub_group_params(s)
                    first = params[0].name
                    items.append(SetValue((*inner, "state", s), {}, "raw"))
                    items.extend(
                        scalar_carries(src_group_of.get(first, s), inner, src_mp, s, first)
                    )
                    keys = [None, *optim_keys.get(first, [])]
                    for k in keys:
                        copies = []
                        for p in params:
                            b = p.param_bounds()
                            if b[r + 1] > b[r]:
                                e = entry(p.name, ROLE_FP32 if k is None else ROLE_OPTIM, k)
                                copies += res.copies(e, mp, b[r], b[r + 1], p.offset)
                        dkey = (
                            ("optimizer_state_dict", "fp32_flat_groups", s)
                            if k is None
                            else (*inner, "state", s, k)
                        )
                        dt = entry(first, ROLE_FP32 if k is None else ROLE_OPTIM, k).dtype
                        items.append(TensorFill(dkey, dt, (numel,), tuple(copies)))
                items += [
                    SetValue(("ds_config",), tgt_config),
                    SetValue(("ds_version",), manifest.ds_version),
                ]
                files.append(
                    TargetFile(
                        f"{prefix}zero_pp_rank_{r}_mp_rank_{mp:02d}_optim_states.pt", tuple(items)
                    )
                )
                files.append(
                    _model_file(
                        f"zero_pp_rank_{r}_mp_rank_{mp:02d}_model_states.pt",
                        manifest,
                        meta,
                        target,
                        mp,
                        src_mp,
                        res,
                        entry,
                        local_shape,
                        sub_names,
                        frozen,
                        buffers,
                        aliases,
                        tgt_config,
                        r,
                    )
                )
    files.sort(key=lambda f: f.name)
    return Plan(
        source_root=manifest.root,
        source_tag=manifest.tag,
        source=f"tp={src.tp} pp={src.pp} dp={src.dp} zero_stage={src.zero_stage}",
        target=target,
        files=tuple(files),
        trusted=manifest.trusted,
        sidecar=_target_sidecar(manifest, target, splits, recorded, stages),
    )


def _check_source(manifest: Manifest, pipeline: bool) -> None:
    """Refuse sources whose optimizer format we cannot read back into every target."""
    src = manifest.topology
    wrapper = manifest.optimizer_wrapper
    ok = (
        (src.zero_stage in (1, 2, 3) and wrapper == "zero")
        or (src.zero_stage == 1 and wrapper == "bf16_optimizer")
        or (src.zero_stage == 0 and wrapper == "none" and not pipeline)
        or (
            src.zero_stage == 0
            and wrapper == "fp16_optimizer"
            and manifest.model_dtype == "bfloat16"
            and not pipeline
        )
    )
    if not ok:
        what = {
            "fp16_optimizer": "DeepSpeed's fp16 optimizer without ZeRO (loss scaling)",
            "bf16_optimizer": "DeepSpeed's BF16_Optimizer without ZeRO (pipeline engine)",
            "none": "a pipeline-engine ZeRO 0 run",
        }.get(wrapper, f"optimizer wrapper {wrapper!r}")
        raise CheckpointError(
            f"{manifest.root}: source is ZeRO stage {src.zero_stage} with {what}; this format "
            "cannot be reshaped yet (supported: ZeRO 0 with an fp32 or bf16 model, ZeRO 1, 2 "
            "and 3, and BF16_Optimizer at ZeRO 1)"
        )


def source_groups(manifest: Manifest, meta: SourceMeta, mp: int) -> tuple[tuple[str, ...], ...]:
    """Trainable parameter names per optimizer param group of source mp rank ``mp``, in flat
    order. ZeRO 3's ``param_shapes`` lists sub-groups, several per param group when
    ``sub_group_size`` is below the group's size: they are joined back by the number of
    partitions each param group lists. ZeRO 0 has no ``param_shapes``: its optimizer's groups."""
    if manifest.topology.zero_stage == 0:
        return tuple(manifest.extra.get("zero0_groups", {}).get(meta.model_files[mp], ()))
    shapes = meta.param_shapes[mp]
    if manifest.topology.zero_stage != 3:
        return shapes
    sizes = meta.param_group_sizes.get(mp) or (1,) * len(shapes)
    if sum(sizes) != len(shapes):
        raise CheckpointError(
            f"{manifest.root}: the optimizer's param groups list {sum(sizes)} ZeRO 3 partitions "
            f"but param_shapes holds {len(shapes)} sub-groups; files from different saves?"
        )
    out, at = [], 0
    for n in sizes:
        out.append(tuple(name for sub in shapes[at : at + n] for name in sub))
        at += n
    return tuple(out)


def uses_bf16_optimizer(config: Mapping[str, Any], stage: int, pipeline: bool) -> bool:
    """Whether DeepSpeed (``engine._do_optimizer_sanity_check``) wraps the optimizer in its
    BF16_Optimizer for this config and stage: bf16 with fp32 gradient accumulation at ZeRO 1
    without offload (the Megatron-DeepSpeed recipe), or bf16 in the pipeline engine at ZeRO 0."""
    bf16 = config.get("bf16") or config.get("bfloat16") or {}
    if not (isinstance(bf16, Mapping) and bf16.get("enabled")):
        return False
    accum = str((config.get("data_types") or {}).get("grad_accum_dtype") or "").lower()
    fp32_accum = accum in ("fp32", "float32", "float", "torch.float32")
    zcfg = config.get("zero_optimization") or {}
    offload = (zcfg.get("offload_optimizer") or {}).get("device") not in (None, "none")
    if stage == 1:
        return fp32_accum and not offload
    return stage == 0 and pipeline and not fp32_accum


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


# DeepSpeed's default ``gradient_clipping`` (runtime/constants.py): what ZeRO 1/2 save as clip_grad
GRADIENT_CLIPPING_DEFAULT = 1.0


def _optimizer_top(meta: SourceMeta, src_mp: int, kind: str) -> list[Carry | SetValue]:
    """The top-level entries of a target optimizer file before its tensors: carried from the
    source where it has them, else what DeepSpeed writes for a bf16/fp32 run (static loss scale
    1, no overflow, the configured clipping). ``kind``: zero (ZeRO 1/2), zero3 or bf16."""
    keys = {
        "zero": ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad"),
        "zero3": ("loss_scaler", "dynamic_loss_scale", "overflow"),
        "bf16": ("clip_grad",),
    }[kind]
    has = set(meta.optim_top_keys) if src_mp in meta.optim_files else set()
    out: list[Carry | SetValue] = []
    for k in keys:
        dst = ("optimizer_state_dict", k)
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


def _saves_frozen(manifest: Manifest, target: Target, frozen: Sequence[TensorEntry]) -> bool:
    """Whether the target's model files hold ``frozen_param_shapes``/``_fragments`` (else None).

    DeepSpeed writes them at ZeRO 2 and 3 unless saved with ``exclude_frozen_parameters=True``;
    a None is what tells its loader not to look for frozen weights. A source that excluded them
    keeps excluding them; with no frozen parameter at all, None loads the same as an empty dict
    and is the only safe choice when a ZeRO 0/1 source cannot tell whether it excluded any."""
    if target.zero_stage < 2 or manifest.extra.get("excluded_frozen"):
        return False
    return bool(frozen) or bool(manifest.extra.get("frozen_recorded"))


def _target_sidecar(
    manifest: Manifest,
    target: Target,
    splits: Mapping[str, TPSplit | None],
    recorded: set[str],
    stages: Sequence[int] | None = None,
) -> Sidecar | None:
    """The target's sidecar, recording every split that is known (``recorded``), and only
    those: a later reshape of the output needs each of them (buffers and frozen weights too),
    and at tp 1 nothing else can tell it; a split merely assumed (tp 1 -> 1) is left out, so
    it stays unknown rather than becoming a false "replicated". A pipeline's layer record
    (modules, ties) travels on with the target's stage boundaries, so the copy can be reshaped
    again. None when nothing is known."""
    names = [e.name for e in manifest.tensors if e.role != ROLE_OPTIM and e.name in recorded]
    layers = manifest.extra.get("pipeline_layers") or {}
    extra: dict[str, Any] = {"reshaped_from": manifest.topology.__dict__ | {"tag": manifest.tag}}
    if layers.get("ties") and stages is not None:
        extra["pipeline"] = {
            "num_layers": layers["num_layers"],
            "module_layers": list(layers["module_layers"]),
            "parts": list(stages),
            "ties": {k: {a: list(b) for a, b in t.items()} for k, t in layers["ties"].items()},
        }
    if not names and "pipeline" not in extra:
        return None
    return Sidecar(
        tp=target.tp,
        pp=target.pp,
        dp=target.dp,
        zero_stage=target.zero_stage,
        tp_splits={n: splits.get(n) for n in dict.fromkeys(names)},
        extra=extra,
    )


def _layer_of(name: str) -> int:
    """Global pipeline layer index of a pipeline-engine name (``<layer>.<name in layer>``)."""
    head = name.split(".", 1)[0]
    if not head.isdigit():
        raise CheckpointError(
            f"{name}: not a pipeline-engine parameter name (<layer index>.<name>); the checkpoint "
            "mixes pipeline and plain module files"
        )
    return int(head)


def _layers_of(name: str, ties: Mapping[str, Any]) -> tuple[int, ...]:
    """The pipeline layers using a parameter: its own, or every use of its tied module."""
    if name.startswith(TIED_PREFIX):
        key = name[len(TIED_PREFIX) :].split(".", 1)[0]
        if key not in ties:
            raise CheckpointError(
                f"{name}: a TiedLayerSpec parameter whose uses are not recorded; only checkpoints "
                "with our sidecar's pipeline record (ReshapeDeepSpeedStrategy) can move it"
            )
        return tuple(ties[key]["layers"])
    return (_layer_of(name),)


def _in_stage(name: str, lo: int, hi: int, ties: Mapping[str, Any]) -> bool:
    return any(lo <= x < hi for x in _layers_of(name, ties))


def _stage_names(
    names: Sequence[str], lo: int, hi: int, ties: Mapping[str, Any]
) -> tuple[str, ...]:
    """A stage's parameters of one group in PipelineModule's order: its tied modules first
    (registered before the layers, in the order of their first use in the stage), then its
    layers' parameters in layer order."""
    mine = [n for n in names if _in_stage(n, lo, hi, ties)]
    tied = [n for n in mine if n.startswith(TIED_PREFIX)]
    first_use = {n: min(x for x in _layers_of(n, ties) if lo <= x < hi) for n in tied}
    tied.sort(key=lambda n: first_use[n])  # stable: a module's own order is kept
    return (*tied, *(n for n in mine if not n.startswith(TIED_PREFIX)))


def _target_stages(
    manifest: Manifest,
    target: Target,
    groups: Sequence[Sequence[str]],
    splits: Mapping[str, TPSplit | None],
) -> tuple[int, ...]:
    """Stage boundaries at the target pp, as DeepSpeed's PipelineModule computes them for the
    target's ``partition_method``: by default "parameters", balanced by each layer's trainable
    (tp-local) parameter count; "uniform"; or explicit boundaries. Layers are numbered by their
    files; a layer without a file (a function) counts as 0 parameters. Function layers after the
    last layer file are known only from our sidecar (its layer count)."""
    layers = {p.layer for e in manifest.tensors for p in e.pieces if p.layer is not None}
    known = manifest.extra.get("pipeline_layers") or {}
    ties = known.get("ties") or {}
    layers.update(x for t in ties.values() for x in t["layers"])
    layers.update(known.get("module_layers", ()))
    if not layers:
        raise CheckpointError(f"{manifest.root}: a pipeline checkpoint without layer files")
    counts = [0] * max(max(layers) + 1, int(known.get("num_layers", 0) or 0))
    shapes = {e.name: e.shape for e in manifest.entries(ROLE_FP32)}
    for names in groups:
        for n in names:
            numel = math.prod(_local_shape(shapes[n], splits.get(n), target.tp))
            for layer in _layers_of(n, ties):  # DeepSpeed counts a tied module at every use
                counts[layer] += numel
    if target.pp > len(counts):
        raise LayoutError(
            f"target pp={target.pp} exceeds the {len(counts)} pipeline layers of "
            f"{manifest.root}; choose pp <= {len(counts)}"
        )
    method = target.pp_partition.strip().lower()
    if method in ("parameters", "uniform"):
        return pipeline_stages(len(counts), target.pp, method, layer_params=counts).parts
    try:
        bounds = tuple(int(x) for x in method.split(","))
    except ValueError:
        raise LayoutError(
            f"pp_partition={target.pp_partition!r}: expected 'parameters', 'uniform' or stage "
            f"boundaries like '0,{len(counts) // 2},{len(counts)}' (pp + 1 layer offsets)"
        ) from None
    try:
        return pipeline_stages(len(counts), target.pp, "explicit", boundaries=bounds).parts
    except LayoutError as exc:
        raise LayoutError(f"pp_partition={target.pp_partition!r}: {exc}") from None


def _layer_files(
    manifest: Manifest, res: _Resolver, local_shape: Any, lo: int, hi: int, tp_rank: int
) -> list[TargetFile]:
    """The pipeline layer files ``lo..hi-1`` of one tp rank: each a plain state dict of the
    layer (weights as stored, buffers), keyed by global layer index, so only the owner moves."""
    by_layer: dict[int, list[TensorFill]] = {}
    known = manifest.extra.get("pipeline_layers") or {}
    ties = known.get("ties") or {}
    for e in manifest.tensors:
        if e.role not in (ROLE_PARAM, ROLE_BUFFER) or not e.pieces:
            continue
        layers: tuple[int, ...] = (e.pieces[0].layer,) if e.pieces[0].layer is not None else ()
        if e.name.startswith(TIED_PREFIX):
            # a tied module is saved in the file of each of its uses without a forward_fn
            tie = ties[e.name[len(TIED_PREFIX) :].split(".", 1)[0]]
            layers = tuple(tie["module_layers"])
        key = e.pieces[0].key
        shape = local_shape(e)
        for layer in (x for x in layers if lo <= x < hi):
            copies = res.copies(e, tp_rank, 0, math.prod(shape), 0)
            by_layer.setdefault(layer, []).append(TensorFill(key, e.dtype, shape, tuple(copies)))
    # Modules without parameters or buffers (activations, dropout) still have a layer file,
    # an empty state dict, which DeepSpeed's load_state_dir requires.
    for layer in known.get("module_layers", ()):
        if lo <= layer < hi:
            by_layer.setdefault(layer, [])
    return [
        TargetFile(f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt", tuple(fills))
        for layer, fills in sorted(by_layer.items())
    ]


def _trainable(groups: Sequence[Sequence[str]]) -> set[str]:
    return {n for g in groups for n in g}


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


def _model_file(
    name: str,
    manifest: Manifest,
    meta: SourceMeta,
    target: Target,
    mp: int,
    src_mp: int,
    res: _Resolver,
    entry: Any,
    local_shape: Any,
    flat_names: Sequence[Sequence[str]],
    frozen: Sequence[TensorEntry],
    buffers: Mapping[str, TensorEntry],
    aliases: Mapping[str, str],
    tgt_config: Mapping[str, Any],
    z3_rank: int | None,
    pipeline_buffers: Sequence[str] | None = None,
    optimizer_items: Sequence[Carry | SetValue | TensorFill] | None = None,
) -> TargetFile:
    """A model-states file: ``mp_rank_XX`` (ZeRO 1/2) or ``zero_pp_rank_R_mp_rank_XX`` (ZeRO 3).

    ``pipeline_buffers`` (pipeline engine only): the stage's buffer names; the module itself
    lives in the layer files then, so ``module`` is None. ``optimizer_items`` (ZeRO 0 only): the
    whole optimizer state, which ZeRO 0 keeps in this file; ZeRO 0 records no ``param_shapes``
    or ``shared_params``."""
    src_file = meta.model_files[src_mp]
    items: list[Carry | SetValue | TensorFill] = []
    trainable = _trainable(flat_names)
    frozen_names = {e.name for e in frozen}
    shared = dict(meta.shared_params.get(src_mp) or {})
    for alias, source in aliases.items():
        shared.setdefault(alias, source)
    model_dtype = manifest.model_dtype
    known = {t.key for t in manifest.tensors}
    module_keys = set(meta.module_keys[src_mp])
    for key in meta.model_keys[src_mp]:
        if pipeline_buffers is not None and key in ("module", "buffer_names"):
            value = None if key == "module" else list(pipeline_buffers)
            items.append(SetValue((key,), value))
            continue
        if key not in _MODEL_COMPUTED:
            items.append(Carry(src_file, (key,), (key,)))
            continue
        if key == "module":
            items.append(SetValue(("module",), None, "odict"))
            for mkey in meta.module_keys[src_mp]:
                dkey = ("module", mkey)
                if mkey in buffers:
                    e = buffers[mkey]
                    n = math.prod(local_shape(e))
                    items.append(
                        TensorFill(dkey, e.dtype, local_shape(e), tuple(res.copies(e, mp, 0, n, 0)))
                    )
                elif z3_rank is not None:
                    items.append(TensorFill(dkey, model_dtype, (0,)))
                elif (
                    mkey in shared
                    and mkey not in trainable
                    and mkey not in frozen_names
                    and shared[mkey] in module_keys  # not when excluded from the save
                ):
                    items.append(TensorFill(dkey, model_dtype, (), tie=("module", shared[mkey])))
                else:
                    if (
                        manifest.extra.get("excluded_frozen")
                        and (mkey, ROLE_PARAM, None) not in known
                        and (mkey, ROLE_FP32, None) not in known
                    ):
                        # a frozen weight tied to another, saved at ZeRO 3 with
                        # exclude_frozen_parameters=True: its placeholder is all the checkpoint
                        # holds, so it stays out, and the model keeps its own value on load
                        # (strict=False), as it does when resuming the source
                        continue
                    e = (
                        entry(mkey, ROLE_PARAM)
                        if (mkey, ROLE_PARAM, None) in known
                        else entry(mkey, ROLE_FP32)
                    )
                    n = math.prod(local_shape(e))
                    copies = res.copies(e, mp, 0, n, 0)
                    items.append(TensorFill(dkey, model_dtype, local_shape(e), tuple(copies)))
        elif key == "optimizer":
            if optimizer_items is None:
                items.append(SetValue(("optimizer",), None))
            else:
                items.extend(optimizer_items)
        elif key in ("param_shapes", "shared_params") and target.zero_stage == 0:
            items.append(SetValue((key,), None))
        elif key == "param_shapes":
            shapes = []
            for names in flat_names:
                shapes.append({n: local_shape(entry(n, ROLE_FP32)) for n in names})
            items.append(SetValue(("param_shapes",), shapes, "shapes"))
        elif key == "frozen_param_shapes":
            if _saves_frozen(manifest, target, frozen):
                items.append(
                    SetValue(
                        ("frozen_param_shapes",),
                        {e.name: local_shape(e) for e in frozen},
                        "frozen_shapes",
                    )
                )
            else:
                items.append(SetValue(("frozen_param_shapes",), None))
        elif key == "frozen_param_fragments":
            if not _saves_frozen(manifest, target, frozen):
                items.append(SetValue(("frozen_param_fragments",), None))
                continue
            items.append(SetValue(("frozen_param_fragments",), None, "odict"))
            for e in frozen:
                shape = local_shape(e)
                n = math.prod(shape)
                if z3_rank is None:
                    copies = res.copies(e, mp, 0, n, 0)
                    items.append(
                        TensorFill(
                            ("frozen_param_fragments", e.name), e.dtype, shape, tuple(copies)
                        )
                    )
                else:
                    part = -(-n // target.dp)
                    lo, hi = min(n, z3_rank * part), min(n, (z3_rank + 1) * part)
                    copies = res.copies(e, mp, lo, hi, 0) if hi > lo else []
                    items.append(
                        TensorFill(
                            ("frozen_param_fragments", e.name), e.dtype, (part,), tuple(copies)
                        )
                    )
        elif key == "shared_params":
            items.append(SetValue(("shared_params",), shared))
        elif key == "dp_world_size":
            items.append(SetValue((key,), target.dp))
        elif key == "mp_world_size":
            items.append(SetValue((key,), target.tp * target.pp))
        elif key == "checkpoint_parallel_dimensions":
            items.append(SetValue((key,), {"pp_degree": target.pp, "tp_degree": target.tp}))
        elif key == "ds_config":
            items.append(SetValue((key,), dict(tgt_config)))
    return TargetFile(name, tuple(items))


def format_plan(plan: Plan) -> str:
    """Human-readable plan: per target file, its sources and byte counts."""

    def mb(n: int) -> str:
        return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n} B"

    lines = [
        f"reshape {plan.source_root}",
        f"  from {plan.source}",
        f"  to   {plan.target}",
        f"  {len(plan.files)} target files, {mb(sum(f.copy_bytes() for f in plan.files))} of "
        "tensor data",
    ]
    for f in plan.files:
        n_t = len(f.tensors)
        n_c = sum(len(t.copies) for t in f.tensors)
        carries = sum(1 for i in f.items if isinstance(i, Carry))
        lines.append(
            f"{f.name}: {n_t} tensors ({mb(f.copy_bytes())}, {n_c} copies), "
            f"{carries} carried values"
        )
        for src, nbytes in sorted(f.sources().items()):
            lines.append(f"    <- {src}: {mb(nbytes)}")
    return "\n".join(lines)
