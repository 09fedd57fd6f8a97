"""Tensor-parallel reshape grid against real DeepSpeed: TinyGPT (column, row and vocabulary
parallel layers, replicated norms and biases) trained at the source (tp, dp, ZeRO stage), saved
with the strategy's sidecar, converted, loaded at the target with stock
``engine.load_checkpoint(load_optimizer_states=True)``; every logical fp32 master and optimizer
state (tp shards joined) must equal the source's bit for bit. One source uses DeepSpeed's
BF16_Optimizer (bf16, ZeRO 1, fp32 gradient accumulation; its bf16 weights are compared too).

Four launches in all: tp 2 and (tp 1, dp 2) sources; tp 1 loads + tp 1 sources; tp 4 loads +
tp 4 sources; every 2-process load."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_reshape.checkpoint.convert import convert_checkpoint
from lightning_reshape.checkpoint.plan import (
    Copy,
    Target,
    TensorFill,
    plan_context,
    plan_from_context,
)
from lightning_reshape.checkpoint.reader import read_manifest
from lightning_reshape.checkpoint.sidecar import read_sidecar, write_sidecar
from lightning_reshape.checkpoint.verify import verify
from lightning_reshape.errors import CheckpointError
from tests.deepspeed_harness import run_distributed
from tests.reshape.tp_workers import TAG, TPSpec, load_worker, train_and_load_worker, train_worker

OPT = {1: "adamw", 2: "adagrad", 3: "adamw"}  # no Adagrad under ZeRO 3: DeepSpeed cannot load it


def _src(tp: int, dp: int, stage: int) -> TPSpec:
    return TPSpec(f"tp{tp}dp{dp}z{stage}", tp, stage, OPT[stage])


# bf16 + ZeRO 1 + fp32 gradient accumulation: DeepSpeed's BF16_Optimizer (files bf16_zero_*)
BF16OPT = TPSpec("tp2dp1z1bf16opt", 2, 1, "adamw", bf16_optimizer=True)
# sources per launch world size
SRC_W2 = [_src(2, 1, 1), _src(2, 1, 2), _src(2, 1, 3), _src(1, 2, 1), _src(1, 2, 2), BF16OPT]
SRC_W1 = [_src(1, 1, 1), _src(1, 1, 2), _src(1, 1, 3)]
SRC_W4 = [_src(4, 1, 1), _src(4, 1, 2)]
# (source name, target tp, target dp, target stage)
PAIRS_AFTER_W2 = [
    ("tp2dp1z1", 1, 1, 1),  # tp 2 -> 1
    ("tp2dp1z2", 1, 1, 2),
    ("tp2dp1z3", 1, 1, 3),
    ("tp2dp1z1", 1, 1, 2),  # tp 2 -> 1 with a ZeRO stage change
    ("tp2dp1z1", 1, 2, 1),  # tp 2 dp 1 -> tp 1 dp 2
    ("tp2dp1z2", 1, 2, 2),
    ("tp2dp1z3", 1, 2, 3),
    ("tp1dp2z1", 2, 1, 1),  # tp 1 dp 2 -> tp 2 dp 1
    ("tp1dp2z2", 2, 1, 2),
    ("tp2dp1z1", 4, 1, 1),  # tp 2 -> 4
    ("tp2dp1z2", 4, 1, 2),
    ("tp2dp1z3", 4, 1, 3),
    ("tp2dp1z2", 2, 2, 2),  # dp 1 -> 2 at tp 2 (4 processes)
    (BF16OPT.name, 1, 1, 1),  # BF16_Optimizer: tp 2 -> 1
    (BF16OPT.name, 1, 2, 1),  # BF16_Optimizer: tp 2 dp 1 -> tp 1 dp 2
]
PAIRS_AFTER_W1 = [("tp1dp1z1", 2, 1, 1), ("tp1dp1z2", 2, 1, 2), ("tp1dp1z3", 2, 1, 3)]  # 1 -> 2
PAIRS_AFTER_W4 = [("tp4dp1z1", 2, 1, 1), ("tp4dp1z2", 2, 1, 2)]  # 4 -> 2 (ZeRO 3: see 2 -> 4)
ALL_PAIRS = PAIRS_AFTER_W2 + PAIRS_AFTER_W1 + PAIRS_AFTER_W4
SOURCES = {s.name: s for s in SRC_W2 + SRC_W1 + SRC_W4}


def _label(src: str, tp: int, dp: int, stage: int) -> str:
    return f"{src}->tp{tp}dp{dp}z{stage}"


def _jobs(root: Path, pairs: list[tuple[str, int, int, int]]) -> dict[int, list]:
    """Convert each pair; jobs grouped by the world size that loads them."""
    by_world: dict[int, list] = {}
    for src, tp, dp, stage in pairs:
        label = _label(src, tp, dp, stage)
        dst = root / "out" / label.replace(">", "")
        convert_checkpoint(root / "src" / src, dst, tp=tp, dp=dp, zero_stage=stage)
        spec = dataclasses.replace(SOURCES[src], tp=tp, stage=stage)
        expected = str(root / "src" / src / "expected.pt")
        by_world.setdefault(tp * dp, []).append((label, str(dst), spec, expected))
    return by_world


@pytest.fixture(scope="module")
def tp_grid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tp")
    src = str(root / "src")
    problems = run_distributed(train_worker, 2, src, SRC_W2, timeout=300)[0]
    jobs = _jobs(root, PAIRS_AFTER_W2)
    res1, p1 = run_distributed(train_and_load_worker, 1, src, SRC_W1, jobs.pop(1), timeout=300)[0]
    more = _jobs(root, PAIRS_AFTER_W1)
    jobs[2] += more[2]
    res4, p4 = run_distributed(train_and_load_worker, 4, src, SRC_W4, jobs.pop(4), timeout=400)[0]
    jobs[2] += _jobs(root, PAIRS_AFTER_W4)[2]
    res2 = run_distributed(load_worker, 2, jobs.pop(2), timeout=400)[0]
    assert not jobs
    return {
        "root": root,
        "source_problems": {**problems, **p1, **p4},
        "results": {**res1, **res4, **res2},
    }


def test_sources_keep_replicated_tensors_equal(tp_grid: dict[str, Any]) -> None:
    """Sanity of the oracle: replicated parameters agree across tp ranks at the source."""
    assert tp_grid["source_problems"] == {s.name: [] for s in SRC_W2 + SRC_W1 + SRC_W4}


@pytest.mark.parametrize("pair", ALL_PAIRS, ids=lambda p: _label(*p))
def test_tp_reshape_loads_bit_exact(tp_grid: dict[str, Any], pair: tuple) -> None:
    assert tp_grid["results"][_label(*pair)] == []


def test_round_trip_tp_1_2_1_verifies_equal(tp_grid: dict[str, Any], tmp_path: Path) -> None:
    src = tp_grid["root"] / "src" / "tp1dp1z1"
    mid = convert_checkpoint(src, tmp_path / "tp2", tp=2, dp=1)
    back = convert_checkpoint(tmp_path / "tp2", tmp_path / "tp1", tp=1, dp=1)
    assert verify(src, back) == []
    assert verify(src, mid) == []  # same logical content at another layout


def test_replicated_shards_that_differ_are_refused(tp_grid: dict[str, Any], tmp_path: Path) -> None:
    """A sidecar calling a split tensor replicated must fail at read time, naming it."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tp_grid["root"] / "src" / "tp2dp1z1", src)
    tag = src / TAG
    sidecar = read_sidecar(tag)
    assert sidecar is not None
    name = "blocks.0.mlp.fc.weight"  # column parallel: its shards differ
    splits = {**sidecar.tp_splits, name: None}
    write_sidecar(tag, type(sidecar)(**{**sidecar.__dict__, "tp_splits": splits}))
    with pytest.raises(CheckpointError, match=name):
        read_manifest(src)


# (source, target tp, target dp, target stage): tp 2 -> 1 and 1 -> 2, with ZeRO partitions
# cutting rows at the source (dp 2) or at the target (dp 2), ZeRO 3, and BF16_Optimizer
STRIDED_PAIRS = [
    ("tp2dp1z1", 1, 1, 1),
    ("tp2dp1z1", 1, 2, 1),
    ("tp1dp1z1", 2, 1, 1),
    ("tp1dp2z1", 2, 1, 1),
    ("tp2dp1z3", 1, 2, 3),
    ("tp1dp1z3", 2, 1, 3),
    (BF16OPT.name, 1, 2, 1),
]


class _ElementResolver:
    """The reference for ``plan._Resolver``: one Copy per contiguous run (what plans held
    before strided copies), found element by element from a global index array cut into
    Megatron's tp shards with numpy, with no use of the planner's run geometry."""

    def __init__(self, manifest: Any, splits: dict[str, Any], tgt_tp: int) -> None:
        self.m, self.splits, self.tgt_tp = manifest, splits, tgt_tp

    @staticmethod
    def _shard(shape: tuple[int, ...], split: Any, tp: int, rank: int) -> Any:
        """Global flat index of each local flat element of tp rank ``rank``."""
        g = np.arange(math.prod(shape)).reshape(shape)
        if split is None or tp == 1:
            return g.reshape(-1)
        chunk = shape[split.dim] // split.stride
        width = chunk // tp
        cols = [c * chunk + rank * width + j for c in range(split.stride) for j in range(width)]
        return np.take(g, cols, axis=split.dim).reshape(-1)

    def copies(self, entry: Any, rank: int, lo: int, hi: int, dst_base: int) -> list[Copy]:
        split, src_tp = self.splits.get(entry.name), self.m.topology.tp
        want = self._shard(entry.shape, split, self.tgt_tp, rank)[lo:hi]
        owner = np.full(math.prod(entry.shape), -1)
        local = np.full(math.prod(entry.shape), -1)
        if split is None:  # replicated: the same tp rank, else tp rank 0
            ranks = [rank if src_tp == self.tgt_tp else 0]
        else:
            ranks = list(range(src_tp))
        for r in ranks:
            g = self._shard(entry.shape, split, src_tp, r)
            owner[g], local[g] = r, np.arange(len(g))
        out: list[Copy] = []
        for d, gi in enumerate(want.tolist()):
            r, at = int(owner[gi]), int(local[gi])
            held = [p for p in entry.pieces if p.tp_rank == r] or [
                p for p in entry.pieces if p.tp_rank == min(q.tp_rank for q in entry.pieces)
            ]
            (p,) = [p for p in held if p.dst_offset <= at < p.dst_offset + p.numel]
            s = p.src_offset + at - p.dst_offset
            last = out[-1] if out else None
            if (
                last is not None
                and (last.src_file, last.src_key) == (p.file, p.key)
                and last.src_offset + last.numel == s
                and last.dst_offset + last.numel == dst_base + d
            ):
                out[-1] = dataclasses.replace(last, numel=last.numel + 1)
            else:
                out.append(Copy(p.file, p.key, s, dst_base + d, 1, entry.dtype))
        return out


def _element_map(fill: TensorFill, sources: dict[tuple[Any, ...], int]) -> Any:
    """(source tensor id, source element) of each target element; -1 where none is copied."""
    out = np.full((fill.numel, 2), -1)
    for c in fill.copies:
        sid = sources.setdefault((c.src_file, c.src_key), len(sources))
        for s, d, n in c.runs():
            assert (out[d : d + n] == -1).all(), f"{fill.key}: element {d} copied twice"
            out[d : d + n, 0], out[d : d + n, 1] = sid, np.arange(s, s + n)
    return out


@pytest.mark.parametrize("pair", STRIDED_PAIRS, ids=lambda p: _label(*p))
def test_strided_copies_move_the_elements_of_one_copy_per_run(
    tp_grid: dict[str, Any], pair: tuple
) -> None:
    """On real DeepSpeed saves, the plan's strided copies, expanded, place every target element
    from the same source element as the element-by-element reference (one Copy per run), with
    fewer Copy objects wherever a row-parallel weight changes tp."""
    src, tp, dp, stage = pair
    manifest = read_manifest(tp_grid["root"] / "src" / src)
    target = Target(tp, 1, dp, stage)
    ctx = plan_context(manifest, manifest.source_meta, target)
    plan = plan_from_context(ctx)
    ref_ctx = plan_context(manifest, manifest.source_meta, target)
    ref_ctx.res = _ElementResolver(manifest, ref_ctx.splits, tp)  # type: ignore[assignment]
    ref = plan_from_context(ref_ctx)
    assert [f.name for f in plan.files] == [f.name for f in ref.files]
    n_new = n_ref = 0
    for f, g in zip(plan.files, ref.files, strict=True):
        assert [i for i in f.items if not isinstance(i, TensorFill)] == [
            i for i in g.items if not isinstance(i, TensorFill)
        ]
        assert [(t.key, t.shape, t.tie) for t in f.tensors] == [
            (t.key, t.shape, t.tie) for t in g.tensors
        ]
        for t, u in zip(f.tensors, g.tensors, strict=True):
            ids: dict[tuple[Any, ...], int] = {}
            np.testing.assert_array_equal(_element_map(t, ids), _element_map(u, ids), str(t.key))
            n_new, n_ref = n_new + len(t.copies), n_ref + len(u.copies)
        assert f.sources() == g.sources() and f.copy_bytes() == g.copy_bytes()
    row_parallel = [n for n, s in ctx.splits.items() if s is not None and s.dim == 1]
    assert row_parallel  # TinyGPT's attention and MLP output projections
    assert any(c.rows > 1 for f in plan.files for t in f.tensors for c in t.copies)
    assert n_new < n_ref


def _assert_same_objects(got: Any, want: Any, where: str) -> None:
    """Equal nested state (tensors bit for bit: dtype, shape and bytes)."""
    import torch

    if torch.is_tensor(want):
        assert torch.is_tensor(got) and got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for k in want:
            _assert_same_objects(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same_objects(g, w, f"{where}/{i}")
    elif hasattr(want, "__dict__") and not isinstance(want, type):  # DeepSpeed's loss scaler
        assert type(got) is type(want), where
        _assert_same_objects(vars(got), vars(want), where)
    else:
        assert got == want or (got != got and want != want), where  # NaN equals NaN here


@pytest.mark.parametrize("chunk", [64, 64 << 20], ids=["rows-in-chunks", "whole-spans"])
@pytest.mark.parametrize("pair", STRIDED_PAIRS, ids=lambda p: _label(*p))
def test_engine_sink_reads_strided_copies_as_spans(
    tp_grid: dict[str, Any], pair: tuple, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine sink reads a strided copy as whole source spans, a chunk of rows at a time
    (``_fill_strided``); the files it builds equal, bit for bit, those it builds from the
    one-Copy-per-run reference plan (read run by run), with every source record CRC-checked."""
    from lightning_reshape.checkpoint import engine_sink
    from lightning_reshape.checkpoint.engine_sink import SourceFiles, materialize

    spans: list[int] = []
    fill_strided = engine_sink._fill_strided

    def counted(c: Any, *args: Any) -> None:
        spans.append(c.rows)
        fill_strided(c, *args)

    monkeypatch.setattr(engine_sink, "STRIDED_CHUNK_BYTES", chunk)
    monkeypatch.setattr(engine_sink, "_fill_strided", counted)
    src, tp, dp, stage = pair
    manifest = read_manifest(tp_grid["root"] / "src" / src)
    target = Target(tp, 1, dp, stage)
    plan = plan_from_context(plan_context(manifest, manifest.source_meta, target))
    ref_ctx = plan_context(manifest, manifest.source_meta, target)
    ref_ctx.res = _ElementResolver(manifest, ref_ctx.splits, tp)  # type: ignore[assignment]
    ref = plan_from_context(ref_ctx)
    for f, g in zip(plan.files, ref.files, strict=True):
        checked: set[Any] = set()
        got = materialize(plan, f, SourceFiles(plan, checked))
        want = materialize(ref, g, SourceFiles(ref, set()))
        assert checked or not any(t.copies for t in f.tensors)
        _assert_same_objects(got, want, f.name)
    assert spans and max(spans) > 1  # the span path ran, on copies of several rows
