"""The reshape plan: for every target file, which slices of which source files fill it.

Why: reshaping is geometry once a checkpoint is described by a manifest. A plan is a pure value
(frozen dataclasses; file names relative to the tag folders; no tensors) that says, for every
file DeepSpeed expects at the target (tp, pp, dp, ZeRO stage), which tensors it holds and which
runs of source elements fill them, plus which non-tensor state is carried over verbatim and which
metadata is written fresh. It can be printed (``--dry-run``), tested without IO and split between
ranks (each executes a share of the files), like PyTorch DCP's planner.

This module holds the format-free part (the value types, the tensor-parallel geometry, what all
files of one plan share) and dispatches each target file to its format's write side in
:mod:`lightning_reshape.checkpoint.formats`. Planning reads nothing: the manifest carries the
source metadata, and ``build_plan(..., files=...)`` computes only the named files (one rank's
share, :func:`rank_files`), so that work does not grow with the world size.

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightning_reshape.checkpoint.entry_checks import check_file_names, check_rank
from lightning_reshape.checkpoint.manifest import (
    ROLE_BUFFER,
    ROLE_FP32,
    ROLE_OPTIM,
    ROLE_PARAM,
    KeyPath,
    Manifest,
    Piece,
    SourceMeta,
    TensorEntry,
)
from lightning_reshape.checkpoint.sidecar import Sidecar, TPSplit
from lightning_reshape.errors import CheckpointError, LayoutError

if TYPE_CHECKING:
    from lightning_reshape.checkpoint.reader import TPRule

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
    "rank_files",
    "rank_file_names",
    "plan_context",
    "plan_from_context",
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
    go to element ``dst_offset`` of the target tensor (cast when dtypes differ); with ``rows``
    > 1, ``rows`` such runs, run k from ``src_offset + k * src_stride`` to
    ``dst_offset + k * dst_stride`` (elements).

    Why strided: a row-parallel weight cut to a new tp is one run per row of the source shard;
    one Copy stands for all of them, so plans stay small at 175B sizes."""

    src_file: str
    src_key: KeyPath
    src_offset: int
    dst_offset: int
    numel: int
    src_dtype: str
    rows: int = 1
    src_stride: int = 0
    dst_stride: int = 0

    @property
    def elements(self) -> int:
        """Elements moved in all: ``numel`` per run, ``rows`` runs."""
        return self.numel * self.rows

    def runs(self) -> Iterator[tuple[int, int, int]]:
        """The contiguous runs this copy moves, each (src_offset, dst_offset, numel) in
        elements: consumers iterate these rather than reading the fields, so a copy may stand
        for many runs."""
        for k in range(self.rows):
            yield (
                self.src_offset + k * self.src_stride,
                self.dst_offset + k * self.dst_stride,
                self.numel,
            )


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
                out[c.src_file] = out.get(c.src_file, 0) + c.elements * _ELEMENT_SIZE.get(
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
    #: the manifest's ``file_ids``: what each source file was when planned
    source_ids: Mapping[str, tuple[int, ...]] = field(default_factory=dict, compare=False)

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


def read_source_meta(manifest: Manifest) -> SourceMeta:
    """The non-tensor facts a plan needs (key orders, group lists, config): read with the
    manifest (:func:`~lightning_reshape.checkpoint.reader.read_manifest`), so this does no IO."""
    if manifest.source_meta is None:
        raise CheckpointError(
            f"{manifest.root}: the manifest carries no source metadata; read it with read_manifest"
        )
    return manifest.source_meta


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


#: a strided run of the tp geometry: (src tp rank, src local flat offset, dst local flat offset,
#: numel, rows, src stride, dst stride); row k moves ``numel`` elements from
#: ``src + k * src stride`` to ``dst + k * dst stride``
_Run = tuple[int, int, int, int, int, int, int]


def _tp_runs(
    shape: tuple[int, ...],
    split: TPSplit | None,
    src_tp: int,
    tgt_tp: int,
    tgt_rank: int,
) -> Iterator[_Run]:
    """Strided runs covering target rank ``tgt_rank``'s whole shard: the runs of one slice
    along the dims before the split dim, each repeated once per such slice (``rows``), so the
    count does not grow with the tensor's rows."""
    if split is None or src_tp == tgt_tp:
        src_rank = tgt_rank if (split is not None and src_tp == tgt_tp) else 0
        if split is None and src_tp == tgt_tp:
            src_rank = tgt_rank
        yield (src_rank, 0, 0, math.prod(_local_shape(shape, split, tgt_tp)), 1, 0, 0)
        return
    d, s = split.dim, split.stride
    big = shape[d]
    outer = math.prod(shape[:d])
    inner = math.prod(shape[d + 1 :])
    w_t, w_s = big // (s * tgt_tp), big // (s * src_tp)
    d_t, d_s = big // tgt_tp, big // src_tp
    for c in range(s):
        a = tgt_rank * w_t  # rows within the stride chunk
        end = a + w_t
        dst = c * w_t * inner
        while a < end:
            q, jq = divmod(a, w_s)
            b = min(end, (q + 1) * w_s)
            n = (b - a) * inner
            yield (q, (c * w_s + jq) * inner, dst, n, outer, d_s * inner, d_t * inner)
            dst += n
            a = b


class _Resolver:
    """Turns (entry, target tp rank, local range) into Copy runs through the entry's pieces."""

    def __init__(self, manifest: Manifest, splits: Mapping[str, TPSplit | None], tgt_tp: int):
        self.m = manifest
        self.splits = splits
        self.tgt_tp = tgt_tp
        self._pieces: dict[tuple[Any, int], tuple[list[int], list[Piece]]] = {}
        self._runs: dict[tuple[Any, ...], list[_Run]] = {}

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

    def runs(self, entry: TensorEntry, rank: int) -> list[_Run]:
        """``_tp_runs``, adjacent runs merged and a strided run whose rows touch in both
        tensors made one run; shared by every entry of the same shape and split (a
        parameter, its master and each optimizer state)."""
        split = self.splits.get(entry.name)
        key = (entry.shape, split, rank)
        if key not in self._runs:
            runs: list[_Run] = []
            for r in _tp_runs(entry.shape, split, self.m.topology.tp, self.tgt_tp, rank):
                last = runs[-1] if runs else None
                if (
                    last is not None
                    and last[0] == r[0]
                    and last[4:] == r[4:]
                    and last[1] + last[3] == r[1]
                    and last[2] + last[3] == r[2]
                ):
                    runs[-1] = (*last[:3], last[3] + r[3], *last[4:])
                else:
                    runs.append(r)
            for i, (q, s_off, d_off, n, rows, ss, ds) in enumerate(runs):
                if rows > 1 and ss == n and ds == n:
                    runs[i] = (q, s_off, d_off, n * rows, 1, 0, 0)
            self._runs[key] = runs
        return self._runs[key]

    def copies(self, entry: TensorEntry, rank: int, lo: int, hi: int, dst_base: int) -> list[Copy]:
        """Copies placing target-local elements [lo, hi) of ``entry`` at ``dst_base``: whole
        rows of a strided run that lie in one source piece become one strided Copy."""
        out: list[Copy] = []
        pieces: dict[int, tuple[list[int], list[Piece]]] = {}
        for q, s_off, d_off, n, rows, ss, ds in self.runs(entry, rank):
            if rows == 1:
                k, k1 = 0, int(d_off < hi and d_off + n > lo)
            else:  # the rows that meet [lo, hi)
                k, k1 = max(0, (lo - d_off - n) // ds + 1), min(rows, -(-(hi - d_off) // ds))
            if k >= k1:
                continue
            if q not in pieces:
                pieces[q] = self.pieces(entry, q)
            offs, ps = pieces[q]
            while k < k1:
                at, src = d_off + k * ds, s_off + k * ss
                a, b = max(lo, at), min(hi, at + n)
                i = bisect.bisect_right(offs, src) - 1
                p = ps[i] if i >= 0 else None
                if (a, b) != (at, at + n) or p is None or p.dst_offset + p.numel < src + n:
                    # a row cut by [lo, hi) or by a piece boundary (or missing): on its own
                    self._piece_copies(
                        entry, pieces[q], src + a - at, b - a, dst_base + a - lo, out
                    )
                    k += 1
                    continue
                last = k1 - 1
                if rows > 1:  # the last row inside both [lo, hi) and the piece
                    end = p.dst_offset + p.numel
                    last = min(last, (end - n - s_off) // ss, (hi - n - d_off) // ds)
                _append(
                    out,
                    Copy(
                        p.file,
                        p.key,
                        p.src_offset + src - p.dst_offset,
                        dst_base + at - lo,
                        n,
                        entry.dtype,
                        last - k + 1,
                        *((ss, ds) if last > k else (0, 0)),
                    ),
                )
                k = last + 1
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
            src_off = p.src_offset + pos - p.dst_offset
            _append(out, Copy(p.file, p.key, src_off, dst, take, entry.dtype))
            pos += take
            dst += take
            i += 1


def _append(out: list[Copy], c: Copy) -> None:
    """Append ``c`` to ``out``, or extend the last copy when ``c`` continues it: the same
    source tensor and either contiguous in both tensors, or the same run length with the
    source and target offsets advancing by the same strides."""
    prev = out[-1] if out else None
    if prev is None or prev.src_file != c.src_file or prev.src_key != c.src_key:
        out.append(c)
        return
    if (
        prev.rows == 1
        and c.rows == 1
        and prev.src_offset + prev.numel == c.src_offset
        and prev.dst_offset + prev.numel == c.dst_offset
    ):
        out[-1] = Copy(
            c.src_file,
            c.src_key,
            prev.src_offset,
            prev.dst_offset,
            prev.numel + c.numel,
            c.src_dtype,
        )
        return
    if prev.numel == c.numel:
        if prev.rows > 1:
            ss, ds = prev.src_stride, prev.dst_stride
        elif c.rows > 1:
            ss, ds = c.src_stride, c.dst_stride
        else:
            ss, ds = c.src_offset - prev.src_offset, c.dst_offset - prev.dst_offset
        if (
            ss >= c.numel
            and ds >= c.numel
            and (c.rows == 1 or (c.src_stride, c.dst_stride) == (ss, ds))
            and c.src_offset == prev.src_offset + prev.rows * ss
            and c.dst_offset == prev.dst_offset + prev.rows * ds
        ):
            out[-1] = Copy(
                c.src_file,
                c.src_key,
                prev.src_offset,
                prev.dst_offset,
                c.numel,
                c.src_dtype,
                prev.rows + c.rows,
                ss,
                ds,
            )
            return
    out.append(c)


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
    shapes: dict[str, tuple[int, ...]] = {}
    for e in manifest.tensors:  # the first entry of each name, as the splits above
        shapes.setdefault(e.name, e.shape)
    for name, split in out.items():
        if split is not None and target.tp != src_tp:
            _check_split(name, shapes[name], split, (src_tp, target.tp))
    return out, recorded | (set(out) if target.tp != src_tp else set())


def _check_target(target: Target) -> None:
    for name in ("tp", "pp", "dp"):
        value = getattr(target, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayoutError(f"target {name}={value!r} must be an integer >= 1")
    if target.zero_stage not in (0, 1, 2, 3):
        raise LayoutError(
            f"target zero_stage={target.zero_stage} is not supported; convert to ZeRO 0, 1, 2 or 3"
        )


def _check_pipeline(manifest: Manifest, target: Target, pipeline: bool) -> None:
    src = manifest.topology
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


@dataclass(frozen=True)
class RankPlan:
    """One target model-parallel rank (``out_mp`` = stage x tp + tp rank): what its files share."""

    out_mp: int
    stage: int
    mp: int  # the target tp rank
    src_mp: int  # the source mp rank whose non-tensor state it carries
    groups: tuple[tuple[str, ...], ...]  # its trainable names per param group, flat order
    layers: tuple[int, int] | None  # pipeline: its layers [lo, hi)
    pg_ref: tuple[str, KeyPath]  # (file, key path) of the source's torch param_groups


@dataclass
class PlanContext:
    """What every target file of one plan shares, computed once per plan (not per file)."""

    manifest: Manifest
    meta: SourceMeta
    target: Target
    splits: dict[str, TPSplit | None]
    recorded: set[str]
    res: _Resolver
    tgt_config: dict[str, Any]
    pipeline: bool
    bf16_optimizer: bool  # DeepSpeed's BF16_Optimizer at the target
    zero0_wrapper: str
    groups: list[tuple[str, ...]] = field(default_factory=list)
    stages: tuple[int, ...] | None = None
    cache: dict[Any, Any] = field(default_factory=dict)  # per-stage layouts and the like

    @property
    def zcfg(self) -> dict[str, Any]:
        return dict(self.meta.ds_config.get("zero_optimization") or {})

    @property
    def ties(self) -> Mapping[str, Any]:
        return (self.manifest.extra.get("pipeline_layers") or {}).get("ties") or {}

    @property
    def prefix(self) -> str:
        """DeepSpeed's optimizer file prefix: ``bf16_`` when bf16 is enabled."""
        return "bf16_" if self.manifest.model_dtype == "bfloat16" else ""

    def _memo(self, key: str, make: Any) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    @property
    def by_key(self) -> dict[tuple[str, str, str | None], TensorEntry]:
        return self._memo("by_key", lambda: {e.key: e for e in self.manifest.tensors})

    @property
    def optim_keys(self) -> dict[str, list[str]]:
        """Optimizer state keys of each parameter, in manifest order."""

        def make() -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for e in self.manifest.entries(ROLE_OPTIM):
                assert e.state_key is not None
                out.setdefault(e.name, [])
                if e.state_key not in out[e.name]:
                    out[e.name].append(e.state_key)
            return out

        return self._memo("optim_keys", make)

    @property
    def src_group_of(self) -> dict[str, int]:
        """Source flat group of each trainable parameter."""

        def make() -> dict[str, int]:
            return {
                e.name: e.pieces[0].flat_group
                for e in self.manifest.entries(ROLE_FP32)
                if e.pieces and e.pieces[0].flat_group is not None
            }

        return self._memo("src_group_of", make)

    @property
    def frozen(self) -> list[TensorEntry]:
        """Module weights outside the optimizer's groups."""

        def make() -> list[TensorEntry]:
            trainable = _trainable(self.groups)
            return [e for e in self.manifest.entries(ROLE_PARAM) if e.name not in trainable]

        return self._memo("frozen", make)

    @property
    def buffers(self) -> dict[str, TensorEntry]:
        return self._memo(
            "buffers", lambda: {e.name: e for e in self.manifest.entries(ROLE_BUFFER)}
        )

    def entry(self, name: str, role: str, state_key: str | None = None) -> TensorEntry:
        """The source entry; a ZeRO 0 fp32 run's weights are its own masters."""
        try:
            return self.by_key[(name, role, state_key)]
        except KeyError:
            src = self.manifest.topology
            if role == ROLE_FP32 and src.zero_stage == 0 and self.manifest.model_dtype == "float32":
                return self.entry(name, ROLE_PARAM)
            raise CheckpointError(
                f"{self.manifest.root}: {name} has no {role} {state_key or ''} tensor in the "
                "source; the checkpoint is incomplete"
            ) from None

    def local_shape(self, e: TensorEntry) -> tuple[int, ...]:
        return _local_shape(e.shape, self.splits.get(e.name), self.target.tp)

    def local_numel(self, name: str) -> int:
        e = self.by_key.get((name, ROLE_FP32, None)) or self.by_key[(name, ROLE_PARAM, None)]
        return math.prod(self.local_shape(e))

    def whole(self, e: TensorEntry, key: KeyPath, mp: int) -> TensorFill:
        """``e``'s whole (tp-local) tensor of target tp rank ``mp`` at ``key``."""
        shape = self.local_shape(e)
        return TensorFill(
            key, e.dtype, shape, tuple(self.res.copies(e, mp, 0, math.prod(shape), 0))
        )

    def scalar_carries(
        self, group: int, dst_prefix: KeyPath, src_mp: int, tgt_group: int, first: str = ""
    ) -> list[Carry]:
        """A target group's scalar optimizer states (``step``): those of its source group (ZeRO
        1/2/3, from the dp-0 file) or of its first parameter (ZeRO 0)."""
        m = self.manifest
        if m.topology.zero_stage == 0:
            return [
                Carry(s.file, s.key, (*dst_prefix, "state", tgt_group, s.state_key))
                for s in m.scalars
                if s.owner == first and s.file == self.meta.model_files[src_mp]
            ]
        return [
            Carry(s.file, s.key, (*dst_prefix, "state", tgt_group, s.state_key))
            for s in m.scalars
            if s.owner == f"mp{src_mp}.group{group}" and "zero_pp_rank_0_" in s.file
        ]

    def param_groups(
        self, rank: RankPlan, dst: KeyPath, params: Sequence[Sequence[int]]
    ) -> list[Carry | SetValue]:
        """The source's param groups (hyperparameters as saved) listing ``params``."""
        pg_file, pg_key = rank.pg_ref
        out: list[Carry | SetValue] = [SetValue(dst, len(params), "list")]
        for g, idx in enumerate(params):
            out.append(Carry(pg_file, (*pg_key, g), (*dst, g)))
            out.append(SetValue((*dst, g, "params"), list(idx)))
        return out

    def rank(self, out_mp: int) -> RankPlan:
        """Target model-parallel rank ``out_mp``: its stage, tp rank, source rank and groups."""
        from lightning_reshape.checkpoint.formats import pipeline

        stage, mp = divmod(out_mp, self.target.tp)
        groups, layers, src_stage = tuple(self.groups), None, 0
        if self.stages is not None:
            layers = (self.stages[stage], self.stages[stage + 1])
            groups = pipeline.stage_groups(self, stage, layers)
            src_stage = self.entry(groups[0][0], ROLE_FP32).pieces[0].pp_stage
        src_tp = self.manifest.topology.tp
        src_mp = src_stage * src_tp + (mp if self.target.tp == src_tp else 0)
        meta = self.meta
        pg_ref = meta.param_groups_ref.get(src_mp) or (
            meta.optim_files[src_mp],
            (*meta.optim_inner, "param_groups"),
        )
        return RankPlan(out_mp, stage, mp, src_mp, groups, layers, pg_ref)


def _trainable(groups: Sequence[Sequence[str]]) -> set[str]:
    return {n for g in groups for n in g}


def plan_context(
    manifest: Manifest, meta: SourceMeta, target: Target, tp_rules: Sequence[TPRule] = ()
) -> PlanContext:
    """Check the target against the source and compute what all its files share."""
    from lightning_reshape.checkpoint.formats import bf16_optimizer, pipeline, zero0

    _check_target(target)
    is_pipeline = "pipeline" in manifest.layout
    _check_source(manifest, is_pipeline)
    _check_pipeline(manifest, target, is_pipeline)
    splits, recorded = _splits(manifest, meta, target, tp_rules)
    if manifest.model_dtype not in _ELEMENT_SIZE:
        raise CheckpointError(f"{manifest.root}: unknown model dtype {manifest.model_dtype!r}")
    zcfg = dict(meta.ds_config.get("zero_optimization") or {})
    tgt_config = {**dict(meta.ds_config), "zero_optimization": {**zcfg, "stage": target.zero_stage}}
    ctx = PlanContext(
        manifest=manifest,
        meta=meta,
        target=target,
        splits=splits,
        recorded=recorded,
        res=_Resolver(manifest, splits, target.tp),
        tgt_config=tgt_config,
        pipeline=is_pipeline,
        zero0_wrapper=(
            zero0.target_wrapper(manifest, tgt_config) if target.zero_stage == 0 else ""
        ),
        bf16_optimizer=bf16_optimizer.uses_bf16_optimizer(
            tgt_config, target.zero_stage, is_pipeline
        ),
    )
    ctx.groups = _optimizer_groups(ctx)
    if is_pipeline:
        ctx.stages = pipeline.target_stages(manifest, target, ctx.groups, splits)
    return ctx


def _optimizer_groups(ctx: PlanContext) -> list[tuple[str, ...]]:
    """Trainable names per optimizer param group, in optimizer order (tp rank 0 of each source
    stage defines names; shapes come from entries); a pipeline's stages each hold a slice of
    every group, in layer order."""
    from lightning_reshape.checkpoint.formats.zero12 import undo_round_robin

    src = ctx.manifest.topology
    rr = bool(ctx.zcfg.get("round_robin_gradients")) and src.zero_stage in (1, 2)
    groups: list[dict[str, None]] = []  # ordered sets: a name is looked up in O(1)
    for stage in range(src.pp if ctx.pipeline else 1):
        for g, names in enumerate(source_groups(ctx.manifest, ctx.meta, stage * src.tp)):
            names = undo_round_robin(names, src.dp) if rr else tuple(names)
            if g == len(groups):
                groups.append({})
            # a TiedLayerSpec module is held by every stage using it: listed once
            groups[g].update(dict.fromkeys(names))
    return [tuple(g) for g in groups]


class _Selection:
    """Which target files to plan: all, or the named ones (``build_plan(files=...)``), found by
    name so that planning one rank's files does work independent of the world size."""

    def __init__(self, ctx: PlanContext, files: Iterable[str] | None) -> None:
        t = ctx.target
        self.names = None if files is None else frozenset(files)
        self.dp: dict[int, set[int]] = {}  # out_mp -> dp ranks named
        self.mp: set[int] = set()
        if self.names is None:
            return
        for name in self.names:
            if m := _RANK_FILE_RE.match(name):
                out_mp = int(m.group("mp"))
                self.mp.add(out_mp)
                if m.group("dp") is not None:
                    self.dp.setdefault(out_mp, set()).add(int(m.group("dp")))
            elif (m := _LAYER_FILE_RE.match(name)) and ctx.stages is not None:
                layer, tp_rank = int(m.group(1)), int(m.group(2))
                stage = bisect.bisect_right(ctx.stages, layer) - 1
                if 0 <= stage < t.pp:
                    self.mp.add(stage * t.tp + tp_rank)

    def ranks(self, count: int) -> Iterable[int]:
        """Target model-parallel ranks holding a named file, in order."""
        return range(count) if self.names is None else sorted(r for r in self.mp if r < count)

    def dp_ranks(self, out_mp: int, dp: int) -> Iterable[int]:
        if self.names is None:
            return range(dp)
        return sorted(r for r in self.dp.get(out_mp, ()) if r < dp)

    def wants(self, name: str) -> bool:
        return self.names is None or name in self.names


_RANK_FILE_RE = re.compile(
    r"^(?:bf16_)?(?:zero_pp_rank_(?P<dp>\d+)_)?mp_rank_(?P<mp>\d+)_(?:model|optim)_states\.pt$"
)
_LAYER_FILE_RE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")


def build_plan(
    manifest: Manifest,
    meta: SourceMeta | None,
    target: Target,
    *,
    tp_rules: Sequence[TPRule] = (),
    files: Iterable[str] | None = None,
) -> Plan:
    """The plan writing ``manifest``'s checkpoint at ``target``. Pure: no IO.

    ``meta``: the source metadata, None for the manifest's own. ``files``: plan only these
    target file names (e.g. :func:`rank_files` of one rank); the others are not computed, and
    a name the target does not have is not in the plan.
    Raises LayoutError/CheckpointError (nothing written) for a target that cannot be reached.
    """
    files = check_file_names(files, "build_plan")
    ctx = plan_context(manifest, meta or read_source_meta(manifest), target, tp_rules)
    return plan_from_context(ctx, files)


def plan_from_context(ctx: PlanContext, files: Iterable[str] | None = None) -> Plan:
    """:func:`build_plan` from a context already computed (:func:`plan_context`): a rank that
    names its files (:func:`rank_file_names`) and plans them computes the context once."""
    from lightning_reshape.checkpoint.formats import zero0, zero3, zero12

    files = check_file_names(files, "plan_from_context")
    manifest, target = ctx.manifest, ctx.target
    sel = _Selection(ctx, files)
    writer = {0: zero0.plan_files, 1: zero12.plan_files, 2: zero12.plan_files}.get(
        target.zero_stage, zero3.plan_files
    )
    out: list[TargetFile] = []
    for out_mp in sel.ranks(target.tp * target.pp):
        out += writer(ctx, ctx.rank(out_mp), sel)
    out.sort(key=lambda f: f.name)
    src = manifest.topology
    return Plan(
        source_root=manifest.root,
        source_tag=manifest.tag,
        source=f"tp={src.tp} pp={src.pp} dp={src.dp} zero_stage={src.zero_stage}",
        target=target,
        files=tuple(out),
        trusted=manifest.trusted,
        sidecar=_target_sidecar(manifest, target, ctx.splits, ctx.recorded, ctx.stages),
        source_ids=manifest.file_ids,
    )


def check_source_file(plan: Plan, name: str) -> None:
    """Refuse source file ``name`` if it is no longer the file the plan was made from (its
    device, inode, size or mtime differ): the plan's offsets would point at other bytes."""
    want = plan.source_ids.get(name)
    if want is None:
        return
    path = os.path.join(plan.source_root, name)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror}); run again") from None
    if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != tuple(want):
        raise CheckpointError(
            f"{path}: changed since the reshape was planned (rewritten or replaced); run again"
        )


def rank_files(
    manifest: Manifest,
    meta: SourceMeta | None,
    target: Target,
    tp_rank: int,
    pp_stage: int,
    dp_rank: int,
    *,
    tp_rules: Sequence[TPRule] = (),
) -> tuple[str, ...]:
    """Names of the files DeepSpeed's engine at target rank (``tp_rank``, ``pp_stage``,
    ``dp_rank``) loads: its model-states file (ZeRO 3: its own ``zero_pp_rank_D`` one), its
    optimizer file (``bf16_`` prefixed when bf16 is enabled; none at ZeRO 0) and, in a pipeline,
    its stage's layer files. Pure: ``build_plan(..., files=rank_files(...))`` plans that rank's
    share alone (:func:`rank_file_names` and :func:`plan_from_context` share one context)."""
    tp_rank, pp_stage, dp_rank = check_rank((tp_rank, pp_stage, dp_rank), "rank_files")
    ctx = plan_context(manifest, meta or read_source_meta(manifest), target, tp_rules)
    return rank_file_names(ctx, tp_rank, pp_stage, dp_rank)


def rank_file_names(ctx: PlanContext, tp_rank: int, pp_stage: int, dp_rank: int) -> tuple[str, ...]:
    """:func:`rank_files` from a context already computed."""
    from lightning_reshape.checkpoint.formats import pipeline

    tp_rank, pp_stage, dp_rank = check_rank((tp_rank, pp_stage, dp_rank), "rank_file_names")
    t = ctx.target
    if not (0 <= tp_rank < t.tp and 0 <= pp_stage < t.pp and 0 <= dp_rank < t.dp):
        raise LayoutError(f"rank (tp={tp_rank}, pp={pp_stage}, dp={dp_rank}) is outside target {t}")
    mp = pp_stage * t.tp + tp_rank
    optim = f"{ctx.prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_optim_states.pt"
    if t.zero_stage == 0:
        return (f"mp_rank_{mp:02d}_model_states.pt",)
    if t.zero_stage == 3:
        return (f"zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_model_states.pt", optim)
    layers: tuple[str, ...] = ()
    if ctx.stages is not None:
        lo, hi = ctx.stages[pp_stage], ctx.stages[pp_stage + 1]
        layers = tuple(
            pipeline.layer_file_name(x, tp_rank) for x in pipeline.file_layers(ctx) if lo <= x < hi
        )
    return (f"mp_rank_{mp:02d}_model_states.pt", optim, *layers)


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
