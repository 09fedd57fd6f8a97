"""Plan a 175B GPT's direct resume at 128 / 1,024 / 8,192 ranks, without the hardware.

Why: the direct path has every rank plan and read only its own slices of the source.
Whether that holds at scale (plan time per rank, read amplification, planner memory flat in the
world size) can be measured without a cluster and without any data: the planner is pure and
takes a manifest. This benchmark synthesizes the manifest DeepSpeed's files would give
(``read_manifest``'s exact piece geometry; checked against a real tiny save in
``tests/reshape/test_scale_bench.py``) and plans each measured rank's direct load.

Model and format (the Megatron-DeepSpeed recipe): a GPT (GPT-3 175B: 96 layers, hidden 12288,
96 heads, vocab 51200, seq 2048, ffn 4 x hidden, untied head) as the project's pipeline GPT
(``lightning_reshape.nn.gpt.gpt_pipeline_layers``: embedding, blocks, final norm, head), with
Megatron's column/row/vocabulary-parallel tp splits (recorded in the sidecar), saved by
DeepSpeed's pipeline engine (``layer_XX-model_YY-model_states.pt`` files, stages balanced by
``partition_method="parameters"``) with bf16 and fp32 gradient accumulation at ZeRO 1, i.e.
DeepSpeed's BF16_Optimizer (``bf16_zero_pp_rank_D_mp_rank_XX_optim_states.pt``, one flat
param group per stage, AdamW states ``exp_avg``/``exp_avg_sq``): the optimizer wrapper the
planner supports for pp > 1.

Layouts (one family, dp scales; tp 8, pp 16 -> 8 throughout):

    world 128:   tp 8 x pp 16 x dp 1   -> tp 8 x pp 8 x dp 2    (128 ranks)
    world 1024:  tp 8 x pp 16 x dp 8   -> tp 8 x pp 8 x dp 12   (768 ranks; the issue's example)
    world 8192:  tp 8 x pp 16 x dp 64  -> tp 8 x pp 8 x dp 96   (6144 ranks)

Per measured target rank: plan time (wall and CPU) of that rank's direct load, the files its
DeepSpeed engine loads (its model-states file, its stage's layer files for its tp rank, its
optimizer file), named by the planner's ``rank_file_names`` and planned by
``plan_from_context`` on one plan context, as the rank itself would
(``convert.plan_rank_load``); the source metadata rides on the
manifest (``Manifest.source_meta``) as ``read_manifest`` puts it there;
bytes needed (the target tensor bytes of those files) against bytes read (the copies' source
ranges, coalesced per source file and rounded out to 4 KiB pages, as pread/mmap would read
them; records placed in each file as torch.save lays them out, 64-byte aligned), source files
opened, and the planner's peak memory (tracemalloc, manifest excluded: it exists before the
plan starts; the manifest's own size is reported per world size).

    python benchmarks/scale.py                    # 128, 1024, 8192 ranks, 175B
    python benchmarks/scale.py --quick            # small model, 128 and 1024, 8 ranks sampled
    python benchmarks/scale.py --worlds 128,1024 --sample 16 --model gpt-13b
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_reshape.checkpoint.formats.pipeline import pipeline_stages
from lightning_reshape.checkpoint.formats.zero12 import zero_group_layout
from lightning_reshape.checkpoint.manifest import (
    ROLE_FP32,
    ROLE_OPTIM,
    ROLE_PARAM,
    KeyPath,
    Manifest,
    Piece,
    ScalarState,
    SourceMeta,
    SourceTopology,
    StateRef,
    TensorEntry,
)
from lightning_reshape.checkpoint.plan import (
    Plan,
    Target,
    plan_context,
    plan_from_context,
    rank_file_names,
)
from lightning_reshape.checkpoint.reader import DS_CARRIED_KEYS, DS_COMMON_KEYS
from lightning_reshape.checkpoint.sidecar import TPSplit

PAGE = 4096
ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
DS_VERSION = "0.19.8"
OPTIM_STATE_KEYS = ("exp_avg", "exp_avg_sq")  # torch AdamW, flat per group
TAG = "global_step1000"

# targets of issue 13, fixed before measuring
MAX_AMPLIFICATION = 1.05
MAX_PLAN_SECONDS_AT_1024 = 1.0
MAX_MEMORY_RATIO = 1.25  # "flat": planner peak at the largest world / at the smallest


# --------------------------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class GPTShape:
    """A GPT as ``gpt_pipeline_layers`` builds it (``GPTConfig`` field meanings)."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    seq: int
    ffn: int

    def describe(self) -> str:
        return (
            f"{self.name}: {self.layers} layers, hidden {self.hidden}, {self.heads} heads, "
            f"ffn {self.ffn}, vocab {self.vocab}, seq {self.seq}, "
            f"{self.parameters() / 1e9:.1f}B parameters"
        )

    def parameters(self) -> int:
        return sum(math.prod(s) for layer in pipeline_layers(self) for _, s, _ in layer)


MODELS = {
    "gpt-175b": GPTShape("gpt-175b", 51200, 12288, 96, 96, 2048, 4 * 12288),
    "gpt-13b": GPTShape("gpt-13b", 51200, 5120, 40, 40, 2048, 4 * 5120),
    "gpt-small": GPTShape("gpt-small", 51200, 1024, 24, 16, 2048, 4 * 1024),
}

ParamSpec = tuple[str, tuple[int, ...], TPSplit | None]  # name in its layer, global shape, split


def pipeline_layers(shape: GPTShape) -> list[list[ParamSpec]]:
    """Per pipeline layer, its parameters in state-dict order (a module's own parameters before
    its children's) with Megatron's splits: column-parallel weights and biases on dim 0,
    row-parallel weights on dim 1 (their biases replicated), the vocabulary on dim 0."""
    h, f = shape.hidden, shape.ffn
    col, row = TPSplit(0), TPSplit(1)
    block: list[ParamSpec] = [
        ("ln1.weight", (h,), None),
        ("ln1.bias", (h,), None),
        ("attn.qkv.weight", (3 * h, h), col),
        ("attn.qkv.bias", (3 * h,), col),
        ("attn.proj.weight", (h, h), row),
        ("attn.proj.bias", (h,), None),
        ("ln2.weight", (h,), None),
        ("ln2.bias", (h,), None),
        ("mlp.fc.weight", (f, h), col),
        ("mlp.fc.bias", (f,), col),
        ("mlp.proj.weight", (h, f), row),
        ("mlp.proj.bias", (h,), None),
    ]
    return [
        [("pos", (shape.seq, h), None), ("embed.weight", (shape.vocab, h), col)],
        *[list(block) for _ in range(shape.layers)],
        [("weight", (h,), None), ("bias", (h,), None)],
        [("proj.weight", (shape.vocab, h), col)],
    ]


def _local(shape: tuple[int, ...], split: TPSplit | None, tp: int) -> tuple[int, ...]:
    if split is None or tp == 1:
        return shape
    out = list(shape)
    out[split.dim] //= tp
    return tuple(out)


def stage_bounds(shape: GPTShape, tp: int, pp: int) -> tuple[int, ...]:
    """``PipelineModule.parts`` for ``partition_method="parameters"``: layers balanced by their
    tp-local trainable parameter count."""
    counts = [
        sum(math.prod(_local(s, sp, tp)) for _, s, sp in layer) for layer in pipeline_layers(shape)
    ]
    return pipeline_stages(len(counts), pp, "parameters", layer_params=counts).parts


def ds_config(micro_batch: int = 1, grad_accum: int = 1) -> dict[str, Any]:
    """The Megatron-DeepSpeed recipe: bf16, fp32 gradient accumulation, ZeRO 1."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_optimization": {"stage": 1},
        "steps_per_print": 1000000000,
    }


# top-level keys DeepSpeed 0.19.8's pipeline engine writes into mp_rank_XX_model_states.pt (seen
# in real saves), then the client state; and those of them a reshape carries over, in that order
MODEL_KEYS = DS_COMMON_KEYS
CARRIED_MODEL_KEYS = tuple(k for k in DS_CARRIED_KEYS if k in MODEL_KEYS)
# BF16_Optimizer.state_dict() keys, in order
OPTIM_TOP_KEYS = (
    "clip_grad",
    "base_optimizer_state",
    "single_partition_of_fp32_groups",
    "group_paddings",
    "partition_count",
    "ds_version",
    "param_slice_mappings",
)


# --------------------------------------------------------------------------------------------
# the synthetic source


def layer_file(layer: int, tp_rank: int) -> str:
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def model_file(mp: int) -> str:
    return f"mp_rank_{mp:02d}_model_states.pt"


def optim_file(dp: int, mp: int) -> str:
    return f"bf16_zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"


@dataclass
class Source:
    """A synthesized checkpoint: its manifest, the planner's source metadata, and where each
    tensor record sits in its file (byte offset, byte length) for the read model."""

    manifest: Manifest
    meta: SourceMeta
    records: dict[str, dict[KeyPath, tuple[int, int]]] = field(default_factory=dict)


class _Records:
    """torch.save's zip layout, approximately: records in pickling order, each after a small
    local header and aligned to 64 bytes (``data.pkl`` first)."""

    def __init__(self) -> None:
        self.files: dict[str, dict[KeyPath, tuple[int, int]]] = {}
        self.ends: dict[str, int] = {}

    def add(self, file: str, key: KeyPath, nbytes: int) -> None:
        recs = self.files.setdefault(file, {})
        if key in recs:
            return
        start = self.ends.get(file, 4096) + 64  # data.pkl, then a local header
        start = -(-start // 64) * 64
        recs[key] = (start, nbytes)
        self.ends[file] = start + nbytes


_Key = tuple[str, str, "str | None"]
_FlatParam = tuple[str, int, tuple[int, ...], tuple[int, ...]]  # name, numel, local, global
_BASE = ("optimizer_state_dict", "base_optimizer_state", "state", 0)
_FP32 = ("optimizer_state_dict", "single_partition_of_fp32_groups", 0)


class _Synth:
    """Collects pieces in ``read_manifest``'s order: per source mp rank, its layer-file
    parameters, then its optimizer files' flat pieces (fp32 master, then each state)."""

    def __init__(self, tp: int, dp: int, steps: int) -> None:
        self.tp, self.dp, self.steps = tp, dp, steps
        self.records = _Records()
        self.pieces: dict[_Key, dict[int, list[Piece]]] = {}  # first-add order kept
        self.info: dict[_Key, tuple[str, tuple[int, ...]]] = {}  # dtype, global shape
        self.splits: dict[str, TPSplit | None] = {}
        self.scalars: list[ScalarState] = []
        self.refs: list[StateRef] = []

    def add(self, key: _Key, piece: Piece, dtype: str, gshape: tuple[int, ...]) -> None:
        if key not in self.pieces:
            self.pieces[key] = {}
            self.info[key] = (dtype, gshape)
        self.pieces[key].setdefault(piece.tp_rank, []).append(piece)

    def split(self, name: str) -> TPSplit | None:
        """The split as read_manifest records it (none at tp 1)."""
        return self.splits[name] if self.tp > 1 else None

    def layer_params(
        self, layers: Sequence[Sequence[ParamSpec]], lo: int, hi: int, mp: int
    ) -> list[_FlatParam]:
        """The bf16 weights of layers ``lo..hi-1`` of tp rank ``mp % tp``; their flat order."""
        stage, tp_rank = divmod(mp, self.tp)
        names: list[_FlatParam] = []
        for layer in range(lo, hi):
            file = layer_file(layer, tp_rank)
            for local_name, gshape, split in layers[layer]:
                name = f"{layer}.{local_name}"
                self.splits[name] = split
                lshape = _local(gshape, split, self.tp)
                n = math.prod(lshape)
                self.records.add(file, (local_name,), n * 2)
                piece = Piece(
                    file, (local_name,), tp_rank, n, 0, 0, lshape, self.split(name), stage, layer
                )
                self.add((name, ROLE_PARAM, None), piece, "bfloat16", gshape)
                names.append((name, n, lshape, gshape))
        return names

    def optimizer(self, names: Sequence[_FlatParam], mp: int) -> None:
        """The BF16_Optimizer files of mp rank ``mp``: one flat group, a partition per dp rank
        (padding kept), fp32 master and AdamW states cut at the same offsets."""
        stage, tp_rank = divmod(mp, self.tp)
        lay = zero_group_layout([(n, k) for n, k, _, _ in names], self.dp, optimizer="bf16")
        psize = lay.partition_size
        for r in range(self.dp):
            file = optim_file(r, mp)
            self.records.add(file, (*_BASE, "step"), 4)
            for k in OPTIM_STATE_KEYS:
                self.records.add(file, (*_BASE, k), psize * 4)
            self.records.add(file, _FP32, psize * 4)
            owner = f"mp{mp}.group0"
            self.scalars.append(
                ScalarState(owner, "step", float(self.steps), file, (*_BASE, "step"))
            )
            lo, hi = r * psize, (r + 1) * psize
            for p, (name, n, lshape, gshape) in zip(lay.params, names, strict=True):
                s, e = max(p.flat_offset, lo), min(p.flat_offset + n, hi)
                if s >= e:
                    continue
                common: dict[str, Any] = dict(
                    tp_split=self.split(name),
                    tp_rank=tp_rank,
                    numel=e - s,
                    src_offset=s - lo,
                    dst_offset=s - p.flat_offset,
                    local_shape=lshape,
                    pp_stage=stage,
                    dp_rank=r,
                    flat_group=0,
                )
                self.add((name, ROLE_FP32, None), Piece(file, _FP32, **common), "float32", gshape)
                for k in OPTIM_STATE_KEYS:
                    piece = Piece(file, (*_BASE, k), **common)
                    self.add((name, ROLE_OPTIM, k), piece, "float32", gshape)

    def state_refs(self, mp: int, client_state: Sequence[str]) -> None:
        """Non-tensor state read_manifest records: optimizer files first, then the model file."""
        for r in range(self.dp):
            file = optim_file(r, mp)
            self.refs.append(
                StateRef("optimizer:clip_grad", file, ("optimizer_state_dict", "clip_grad"))
            )
            key = ("optimizer_state_dict", "base_optimizer_state", "param_groups")
            self.refs.append(StateRef("optimizer:param_groups", file, key))
        for k in CARRIED_MODEL_KEYS:
            self.refs.append(StateRef(k, model_file(mp), (k,)))
        for k in client_state:
            self.refs.append(StateRef(f"client:{k}", model_file(mp), (k,)))

    def tensors(self) -> tuple[TensorEntry, ...]:
        out = []
        for key, by_rank in self.pieces.items():
            dtype, gshape = self.info[key]
            out.append(
                TensorEntry(
                    name=key[0],
                    role=key[1],
                    state_key=key[2],
                    shape=gshape,
                    dtype=dtype,
                    # added by tp rank, then in dst order (read_manifest's order)
                    pieces=tuple(p for r in sorted(by_rank) for p in by_rank[r]),
                    tp_split=self.split(key[0]),
                )
            )
        return tuple(out)


def synthesize(
    shape: GPTShape,
    tp: int,
    pp: int,
    dp: int,
    *,
    steps: int = 1000,
    micro_batch: int = 1,
    grad_accum: int = 1,
    root: str | None = None,
    client_state: Sequence[str] = ("epoch",),
    with_records: bool = True,
) -> Source:
    """The manifest ``read_manifest`` gives for ``shape`` saved at (tp, pp, dp) as described in
    the module docstring, built from arithmetic alone (no files). ``with_records=False`` leaves
    out the file layout (to measure the manifest's own size)."""
    root = root or f"/synthetic/{shape.name}-tp{tp}-pp{pp}-dp{dp}/{TAG}"
    layers = pipeline_layers(shape)
    parts = stage_bounds(shape, tp, pp)
    syn = _Synth(tp, dp, steps)
    param_shapes: dict[int, tuple[tuple[str, ...], ...]] = {}
    for mp in range(tp * pp):
        stage = mp // tp
        names = syn.layer_params(layers, parts[stage], parts[stage + 1], mp)
        param_shapes[mp] = (tuple(n for n, _, _, _ in names),)
        syn.optimizer(names, mp)
        syn.state_refs(mp, client_state)
    files = sorted(
        [model_file(mp) for mp in range(tp * pp)]
        + [optim_file(r, mp) for mp in range(tp * pp) for r in range(dp)]
        + [layer_file(layer, t) for layer in range(len(layers)) for t in range(tp)]
    )
    splits, records = syn.splits, syn.records
    config = ds_config(micro_batch, grad_accum)
    mps = range(tp * pp)
    meta = SourceMeta(
        model_files={mp: model_file(mp) for mp in mps},
        model_keys={mp: (*MODEL_KEYS, *client_state) for mp in mps},
        module_keys={mp: () for mp in mps},
        param_shapes=param_shapes,
        shared_params={mp: {} for mp in mps},
        ds_config=config,
        optim_files={mp: optim_file(0, mp) for mp in mps},
        optim_inner=("optimizer_state_dict", "base_optimizer_state"),
        optim_top_keys=OPTIM_TOP_KEYS,
        tp_splits=dict(splits),
        param_groups_ref={
            mp: (
                optim_file(0, mp),
                ("optimizer_state_dict", "base_optimizer_state", "param_groups"),
            )
            for mp in mps
        },
        param_group_sizes={mp: (1,) for mp in mps},
    )
    manifest = Manifest(
        root=root,
        layout="deepspeed-pipeline",
        tag=root.rstrip("/").rsplit("/", 1)[-1],
        topology=SourceTopology(tp=tp, pp=pp, dp=dp, zero_stage=1, source="sidecar"),
        model_dtype="bfloat16",
        optimizer_wrapper="bf16_optimizer",
        tensors=syn.tensors(),
        scalars=tuple(syn.scalars),
        state_refs=tuple(syn.refs),
        aliases=(),
        files=tuple(files),
        client_state_keys=tuple(client_state),
        global_steps=steps,
        ds_version=DS_VERSION,
        trusted=False,
        extra={
            "bf16_prefixed_files": True,
            "elastic_checkpoint": False,
            "frozen": (),
            "zero0_groups": {},
            "excluded_frozen": False,
            "frozen_recorded": False,
            "pipeline_layers": {
                "module_layers": tuple(range(len(layers))),
                "num_layers": len(layers),
                "ties": {},
            },
        },
        source_meta=meta,
    )
    return Source(manifest, meta, records.files if with_records else {})


# --------------------------------------------------------------------------------------------
# one rank's direct load


@dataclass(frozen=True)
class Family:
    """One world size of the benchmark: the source layout and the target it resumes at."""

    world: int
    source: tuple[int, int, int]  # tp, pp, dp
    target: Target

    def describe(self) -> str:
        tp, pp, dp = self.source
        t = self.target
        return (
            f"tp {tp} x pp {pp} x dp {dp} = {tp * pp * dp} -> tp {t.tp} x pp {t.pp} x dp {t.dp} "
            f"= {t.tp * t.pp * t.dp} ranks"
        )


def family(world: int, target_tp: int = 8) -> Family:
    """tp 8 x pp 16 x dp (world / 128) resumed at tp 8 x pp 8 x dp (1.5 x that), the issue's
    1,024 -> 768 example; at 128 ranks (dp 1) the target dp is 2 (dp cannot be 1.5).
    ``target_tp`` other than 8 changes tp too (not one of the issue's layouts: a what-if)."""
    if world % 128:
        raise SystemExit(f"--worlds: {world} is not a multiple of 128 (tp 8 x pp 16)")
    dp = world // 128
    target = Target(tp=target_tp, pp=8, dp=max(2, dp * 3 // 2), zero_stage=1)
    return Family(world, (8, 16, dp), target)


def rank_coords(target: Target, rank: int) -> tuple[int, int, int]:
    """(stage, dp rank, tp rank) of ``rank`` in DeepSpeed's ``PipeModelDataParallelTopology``
    (axes pipe, data, model: tp varies fastest)."""
    rest, t = divmod(rank, target.tp)
    stage, d = divmod(rest, target.dp)
    return stage, d, t


def rank_files(shape: GPTShape, target: Target, rank: int) -> tuple[str, ...]:
    """The files rank ``rank``'s engine loads at ``target``: its model-states file, its stage's
    layer files of its tp rank, and its optimizer file."""
    stage, d, t = rank_coords(target, rank)
    parts = stage_bounds(shape, target.tp, target.pp)
    mp = stage * target.tp + t
    return (
        model_file(mp),
        *(layer_file(x, t) for x in range(parts[stage], parts[stage + 1])),
        optim_file(d, mp),
    )


def sample_ranks(target: Target, count: int) -> list[int]:
    """``count`` ranks covering every stage and tp rank and, per stage, the first and last dp
    rank (all ranks if ``count`` covers the world)."""
    world = target.tp * target.pp * target.dp
    if count >= world:
        return list(range(world))
    out: dict[int, None] = {}
    for i in range(count):
        stage = i % target.pp
        t = (i + i // target.pp) % target.tp
        d = 0 if (i // target.pp) % 2 == 0 else target.dp - 1
        out[(stage * target.dp + d) * target.tp + t] = None
    return sorted(out)


class Planner:
    """Plans one rank's direct load as the rank would (``convert.plan_rank_load``): one plan
    context, its files named by the planner's ``rank_file_names`` (checked against
    :func:`rank_files` here), then ``plan_from_context`` of those files."""

    def __init__(self, source: Source, target: Target, shape: GPTShape) -> None:
        self.source = source
        self.target = target
        self.shape = shape

    def plan_rank(self, rank: int) -> tuple[tuple[str, ...], Plan]:
        """The files ``rank`` loads, as the planner names them, and their plan."""
        stage, d, t = rank_coords(self.target, rank)
        m = self.source.manifest
        assert m.source_meta is not None
        ctx = plan_context(m, m.source_meta, self.target)
        files = rank_file_names(ctx, t, stage, d)
        return files, plan_from_context(ctx, files)

    def check_files(self, rank: int, files: Sequence[str]) -> None:
        mine = rank_files(self.shape, self.target, rank)
        if set(files) != set(mine):
            raise SystemExit(
                f"rank {rank}: the planner names files {sorted(files)}, the benchmark expects "
                f"{sorted(mine)}"
            )


@dataclass(frozen=True)
class RankResult:
    rank: int
    coords: tuple[int, int, int]
    seconds: float  # wall
    cpu: float  # this process's CPU time (robust to a shared machine's load)
    needed: int
    read: int
    opened: int
    peak: int

    @property
    def amplification(self) -> float:
        return self.read / self.needed if self.needed else 1.0


def read_bytes(
    plan: Plan, records: dict[str, dict[KeyPath, tuple[int, int]]]
) -> tuple[int, int, int]:
    """(bytes needed, bytes read, source files opened) of a plan: needed = the target tensor
    bytes; read = the copies' source byte ranges, merged per source file and rounded out to
    4 KiB pages; opened = source files copied from or carried from."""
    needed = 0
    ranges: dict[str, list[tuple[int, int]]] = {}
    opened: set[str] = set()
    for f in plan.files:
        needed += f.copy_bytes()
        opened.update(f.sources())
        for t in f.tensors:
            for c in t.copies:
                start, _ = records[c.src_file][c.src_key]
                size = ELEMENT_SIZE[c.src_dtype]
                spans = ranges.setdefault(c.src_file, [])
                for s_off, _, n in c.runs():
                    spans.append((start + s_off * size, start + (s_off + n) * size))
    read = 0
    for spans in ranges.values():
        spans.sort()
        cur_lo, cur_hi = -1, -1
        for a, b in spans:
            lo, hi = a // PAGE * PAGE, -(-b // PAGE) * PAGE
            if lo <= cur_hi:
                cur_hi = max(cur_hi, hi)
                continue
            read += cur_hi - cur_lo if cur_hi > 0 else 0
            cur_lo, cur_hi = lo, hi
        read += cur_hi - cur_lo if cur_hi > 0 else 0
    return needed, read, len(opened)


def measure_rank(planner: Planner, rank: int) -> RankResult:
    """Plan ``rank``'s direct load (name its files, plan them) twice: timed, then under
    tracemalloc for its peak memory."""
    t0, c0 = time.perf_counter(), time.process_time()
    files, plan = planner.plan_rank(rank)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    tracemalloc.start()
    planner.plan_rank(rank)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    planner.check_files(rank, files)
    missing = set(files) - {f.name for f in plan.files}
    if missing:
        raise SystemExit(f"the plan lacks {sorted(missing)[:3]} for rank {rank}")
    needed, read, opened = read_bytes(plan, planner.source.records)
    coords = rank_coords(planner.target, rank)
    return RankResult(rank, coords, seconds, cpu, needed, read, opened, peak)


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class WorldResult:
    fam: Family
    ranks: list[RankResult]
    manifest_bytes: int
    synth_seconds: float

    def max(self, attr: str) -> float:
        return max(getattr(r, attr) for r in self.ranks)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.ranks)


def run_world(
    shape: GPTShape,
    world: int,
    sample: int,
    out: Callable[[str], None],
    per_rank_rows: bool,
    target_tp: int = 8,
) -> WorldResult:
    fam = family(world, target_tp)
    tp, pp, dp = fam.source
    tracemalloc.start()
    t0 = time.perf_counter()
    bare = synthesize(shape, tp, pp, dp, with_records=False)
    synth_seconds = time.perf_counter() - t0
    manifest_bytes, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del bare
    source = synthesize(shape, tp, pp, dp)
    planner = Planner(source, fam.target, shape)
    ranks = sample_ranks(fam.target, sample)
    planner.plan_rank(ranks[0])  # warm-up, untimed: imports, first-call costs
    out(f"\n== world {world}: {fam.describe()}")
    m = source.manifest
    n_pieces = sum(len(t.pieces) for t in m.tensors)
    out(
        f"   manifest: {len(m.tensors)} tensors, {n_pieces} pieces, {len(m.files)} files, "
        f"{manifest_bytes / 2**20:.1f} MiB (tracemalloc, manifest + source meta), synthesized "
        f"in {synth_seconds:.2f} s (traced)"
    )
    what = "all" if len(ranks) == fam.target.tp * fam.target.pp * fam.target.dp else "sample of"
    out(f"   measuring {what} {len(ranks)} target ranks: {ranks if what != 'all' else ''}")
    results = []
    if per_rank_rows:
        out(
            f"   {'rank':>6} {'stage':>5} {'dp':>4} {'tp':>3} {'plan s':>8} {'cpu s':>7} "
            f"{'needed GiB':>11} "
            f"{'read GiB':>9} {'ampl':>7} {'files':>6} {'peak MiB':>9}"
        )
    for rank in ranks:
        r = measure_rank(planner, rank)
        results.append(r)
        if per_rank_rows:
            st, d, t = r.coords
            out(
                f"   {r.rank:>6} {st:>5} {d:>4} {t:>3} {r.seconds:>8.3f} {r.cpu:>7.3f} "
                f"{r.needed / 2**30:>11.3f} "
                f"{r.read / 2**30:>9.3f} {r.amplification:>7.4f} {r.opened:>6} "
                f"{r.peak / 2**20:>9.1f}"
            )
    return WorldResult(fam, results, manifest_bytes, synth_seconds)


def report(results: Sequence[WorldResult], out: Callable[[str], None]) -> bool:
    """Summary, growth with the world size, and the targets with PASS/MISS; True if all pass."""
    out("\n== summary per world size (over the measured ranks)")
    out(
        f"   {'world':>6} {'ranks':>5} {'plan s med':>10} {'plan s max':>10} {'cpu s med':>9} "
        f"{'cpu s max':>9} {'ampl max':>9} {'files max':>9} {'peak MiB max':>12} "
        f"{'manifest MiB':>12}"
    )
    for w in results:
        out(
            f"   {w.fam.world:>6} {len(w.ranks):>5} {w.median('seconds'):>10.3f} "
            f"{w.max('seconds'):>10.3f} {w.median('cpu'):>9.3f} {w.max('cpu'):>9.3f} "
            f"{w.max('amplification'):>9.4f} "
            f"{int(w.max('opened')):>9} {w.max('peak') / 2**20:>12.1f} "
            f"{w.manifest_bytes / 2**20:>12.1f}"
        )
    first = results[0]
    if len(results) > 1:
        out(f"\n== growth relative to {first.fam.world} ranks")
        out(
            f"   {'world':>6} {'x world':>7} {'plan med':>9} {'plan max':>9} {'cpu med':>9} "
            f"{'peak max':>9} {'files max':>9} {'manifest':>9} {'ampl max':>9}"
        )
        for w in results:
            out(
                f"   {w.fam.world:>6} {w.fam.world / first.fam.world:>7.0f} "
                f"{w.median('seconds') / first.median('seconds'):>9.2f} "
                f"{w.max('seconds') / first.max('seconds'):>9.2f} "
                f"{w.median('cpu') / first.median('cpu'):>9.2f} "
                f"{w.max('peak') / first.max('peak'):>9.2f} "
                f"{w.max('opened') / first.max('opened'):>9.2f} "
                f"{w.manifest_bytes / first.manifest_bytes:>9.2f} "
                f"{w.max('amplification') / first.max('amplification'):>9.3f}"
            )
    out("\n== targets (fixed before measuring)")
    ok = True

    def verdict(name: str, passed: bool | None, detail: str) -> None:
        nonlocal ok
        text = "n/a " if passed is None else ("PASS" if passed else "MISS")
        ok = ok and passed is not False
        out(f"   {text}  {name}: {detail}")

    worst = max(results, key=lambda w: w.max("amplification"))
    verdict(
        f"read amplification <= {MAX_AMPLIFICATION} on every measured rank",
        all(r.amplification <= MAX_AMPLIFICATION for w in results for r in w.ranks),
        f"worst {worst.max('amplification'):.4f} (world {worst.fam.world})",
    )
    at_1024 = next((w for w in results if w.fam.world == 1024), None)
    if at_1024 is None:
        verdict(
            f"plan <= {MAX_PLAN_SECONDS_AT_1024} s per rank at 1,024 ranks",
            None,
            "world 1024 not measured",
        )
    else:
        verdict(
            f"plan <= {MAX_PLAN_SECONDS_AT_1024} s per rank at 1,024 ranks",
            at_1024.max("seconds") <= MAX_PLAN_SECONDS_AT_1024,
            f"max {at_1024.max('seconds'):.3f} s, median {at_1024.median('seconds'):.3f} s "
            f"(wall; CPU max {at_1024.max('cpu'):.3f} s)",
        )
    last = results[-1]
    if len(results) < 2:
        verdict("planner memory flat in the world size", None, "needs 2+ world sizes")
    else:
        ratio = last.max("peak") / first.max("peak")
        verdict(
            f"planner memory flat in the world size (peak ratio <= {MAX_MEMORY_RATIO})",
            ratio <= MAX_MEMORY_RATIO,
            f"{last.fam.world} vs {first.fam.world} ranks: {ratio:.2f}x "
            f"({last.max('peak') / 2**20:.1f} vs {first.max('peak') / 2**20:.1f} MiB; manifest "
            f"excluded, which grows {last.manifest_bytes / first.manifest_bytes:.2f}x)",
        )
    return ok


#: largest source world size accepted (as the CLI caps degrees and world sizes)
MAX_WORLD = 1 << 20


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Plan a GPT's direct resume at large layouts from synthesized manifests "
        "(no data): plan time, read amplification, files opened, planner memory per rank.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Layouts" + __doc__.split("Layouts", 1)[1].split("Per measured", 1)[0],
    )
    parser.add_argument(
        "--worlds",
        default=None,
        help="source world sizes, multiples of 128 (default 128,1024,8192; --quick: 128,1024)",
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="gpt-175b")
    parser.add_argument(
        "--sample",
        type=int,
        default=32,
        help="target ranks measured per world above --all-up-to (default 32, --quick: 8)",
    )
    parser.add_argument(
        "--all-up-to",
        type=int,
        default=128,
        help="measure every target rank at source world sizes up to this (default 128)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in seconds: gpt-small, worlds 128,1024, 8 sampled ranks, "
        "--all-up-to 0 (each unless given)",
    )
    parser.add_argument("--no-rows", action="store_true", help="omit the per-rank rows")
    parser.add_argument(
        "--target-tp",
        type=int,
        default=8,
        help="target tp (default 8, as the issue's layouts; others are a what-if: tp changes "
        "too, e.g. 16 splits row-parallel weights into strided reads)",
    )
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(argv)
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    if args.quick:  # defaults of the smoke run, unless given
        if "--model" not in given:
            args.model = "gpt-small"
        if "--worlds" not in given:
            args.worlds = "128,1024"
        if "--sample" not in given:
            args.sample = 8
        if "--all-up-to" not in given:
            args.all_up_to = 0
    try:
        worlds = [int(x) for x in (args.worlds or "128,1024,8192").split(",") if x.strip()]
    except ValueError:
        parser.error(f"--worlds {args.worlds!r}: expected comma-separated integers")
    if args.sample < 1:
        parser.error("--sample must be >= 1")
    shape = MODELS[args.model]
    if args.target_tp < 1 or any(
        sp is not None and s[sp.dim] % args.target_tp
        for layer in pipeline_layers(shape)
        for _, s, sp in layer
    ):
        parser.error(f"--target-tp {args.target_tp} does not divide the split dims of {shape.name}")
    if not worlds:
        parser.error(f"--worlds {args.worlds!r}: expected comma-separated integers")
    if len(set(worlds)) != len(worlds):
        parser.error(f"--worlds {args.worlds!r}: a world size is given twice")
    for w in worlds:
        if w < 128 or w % 128:
            parser.error(f"--worlds: {w} is not a multiple of 128 (tp 8 x pp 16 x dp)")
        if w > MAX_WORLD:
            parser.error(f"--worlds: {w} is above {MAX_WORLD:,} (the CLI's cap, 2**20)")
    print(shape.describe())
    print(
        "format: DeepSpeed pipeline engine, bf16 + fp32 grad accumulation at ZeRO 1 "
        "(BF16_Optimizer), Megatron tp splits; target ZeRO 1"
    )
    results = [
        run_world(
            shape,
            w,
            args.sample if w > args.all_up_to else sys.maxsize,  # all
            lambda s: print(s, flush=True),
            not args.no_rows,
            args.target_tp,
        )
        for w in worlds
    ]
    report(results, print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
