"""The plan as a pure value: hand-built manifests (no files, no DeepSpeed) for one
data-parallel and one tensor-parallel change, and assertions on which source slices fill
which target file.

Why: the grid tests prove the end result; these pin the geometry itself, run in milliseconds
and show directly which copy is wrong when the layout code changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightning_reshape.checkpoint.convert import plan_rank_load
from lightning_reshape.checkpoint.manifest import (
    ROLE_FP32,
    ROLE_OPTIM,
    ROLE_PARAM,
    Manifest,
    Piece,
    ScalarState,
    SourceTopology,
    TensorEntry,
)
from lightning_reshape.checkpoint.plan import (
    Carry,
    Copy,
    Plan,
    SourceMeta,
    Target,
    TensorFill,
    build_plan,
    rank_files,
)
from lightning_reshape.checkpoint.reader import TPRule
from lightning_reshape.checkpoint.sidecar import TPSplit
from lightning_reshape.errors import CheckpointError, LayoutError

MODEL = "mp_rank_00_model_states.pt"
FP32 = ("optimizer_state_dict", "single_partition_of_fp32_groups", 0)
EXP_AVG = ("optimizer_state_dict", "base_optimizer_state", "state", 0, "exp_avg")


def _optim(dp: int) -> str:
    return f"zero_pp_rank_{dp}_mp_rank_00_optim_states.pt"


def _meta(names: tuple[str, ...]) -> SourceMeta:
    return SourceMeta(
        model_files={0: MODEL},
        model_keys={0: ("module", "param_shapes", "dp_world_size", "global_steps", "epoch")},
        module_keys={0: names},
        param_shapes={0: (names,)},
        shared_params={0: {}},
        ds_config={"zero_optimization": {"stage": 1}},
        optim_files={0: _optim(0)},
        optim_inner=("optimizer_state_dict", "base_optimizer_state"),
        optim_top_keys=("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad"),
    )


def _entries(
    name: str, shape: tuple[int, ...], runs: list[tuple[int, int, int, int]]
) -> list[TensorEntry]:
    """Module weight, fp32 master and exp_avg of one parameter; ``runs`` are the master's and
    exp_avg's (dp rank, offset in that rank's flat partition, offset in the tensor, numel)."""
    n = 1
    for s in shape:
        n *= s
    param = Piece(MODEL, ("module", name), 0, n, local_shape=shape)
    out = [TensorEntry(name, ROLE_PARAM, shape, "float32", (param,))]
    for role, key, state in ((ROLE_FP32, FP32, None), (ROLE_OPTIM, EXP_AVG, "exp_avg")):
        pieces = tuple(
            Piece(_optim(r), key, 0, k, src, dst, shape, dp_rank=r, flat_group=0)
            for r, src, dst, k in runs
        )
        out.append(TensorEntry(name, role, shape, "float32", pieces, state_key=state))
    return out


def _manifest(dp: int, tensors: list[TensorEntry]) -> Manifest:
    step = ScalarState(
        "mp0.group0", "step", 3, _optim(0), (*EXP_AVG[:-1], "step")
    )  # per flat group
    return Manifest(
        root="/nowhere/global_step3",
        layout="deepspeed",
        tag="global_step3",
        topology=SourceTopology(tp=1, pp=1, dp=dp, zero_stage=1, source="deepspeed"),
        model_dtype="float32",
        optimizer_wrapper="zero",
        tensors=tuple(tensors),
        scalars=(step,),
        ds_version="0.19.8",
    )


def _fill(plan: Plan, file: str, key: tuple) -> TensorFill:
    return next(t for t in plan.file(file).tensors if t.key == key)


def test_dp_2_to_1_gathers_both_partitions_in_order() -> None:
    """ZeRO 1 at dp 2: a (6 elements) and b (4) share one flat group split 5 + 5; at dp 1 the
    single partition takes a[0:5] from rank 0, a[5] and b from rank 1, for every state."""
    tensors = _entries("a", (3, 2), [(0, 0, 0, 5), (1, 0, 5, 1)])
    tensors += _entries("b", (4,), [(1, 1, 0, 4)])
    plan = build_plan(_manifest(2, tensors), _meta(("a", "b")), Target(1, 1, 1, 1))

    assert [f.name for f in plan.files] == [MODEL, _optim(0)]
    for key in (FP32, EXP_AVG):
        fill = _fill(plan, _optim(0), key)
        assert fill.copies == (
            Copy(_optim(0), key, 0, 0, 5, "float32"),
            Copy(_optim(1), key, 0, 5, 1, "float32"),
            Copy(_optim(1), key, 1, 6, 4, "float32"),
        )
    # the saved fp32 partition has DeepSpeed's padding stripped; the state keeps it
    assert _fill(plan, _optim(0), FP32).shape == (10,)
    # the module weights come from the model file, whole
    assert _fill(plan, MODEL, ("module", "a")).copies == (
        Copy(MODEL, ("module", "a"), 0, 0, 6, "float32"),
    )
    items = plan.file(MODEL).items
    assert Carry(MODEL, ("global_steps",), ("global_steps",)) in items
    assert Carry(MODEL, ("epoch",), ("epoch",)) in items  # client state, verbatim
    step = ("optimizer_state_dict", "base_optimizer_state", "state", 0, "step")
    assert Carry(_optim(0), step, step) in plan.file(_optim(0)).items
    assert plan.sidecar is None  # splits unknown at tp 1 -> 1 without a sidecar


def test_tp_1_to_2_cuts_rows_and_columns() -> None:
    """w (4, 2) split on dim 0 and v (2, 4) split on dim 1, from tp 1 to tp 2 at dp 1: each
    target mp rank's flat partition is filled from the right source element runs."""
    tensors = _entries("w", (4, 2), [(0, 0, 0, 8)]) + _entries("v", (2, 4), [(0, 8, 0, 8)])
    rules = [TPRule(r"^w$", TPSplit(dim=0)), TPRule(r"^v$", TPSplit(dim=1))]
    plan = build_plan(_manifest(1, tensors), _meta(("w", "v")), Target(2, 1, 1, 1), tp_rules=rules)

    names = [f.name for f in plan.files]
    assert names == [
        MODEL,
        "mp_rank_01_model_states.pt",
        _optim(0),
        "zero_pp_rank_0_mp_rank_01_optim_states.pt",
    ]
    src = _optim(0)
    for mp, file in enumerate((_optim(0), "zero_pp_rank_0_mp_rank_01_optim_states.pt")):
        fill = _fill(plan, file, FP32)
        assert fill.shape == (8,)  # w: 4 local elements, v: 4 local elements
        assert fill.copies == (
            Copy(src, FP32, 4 * mp, 0, 4, "float32"),  # rows 2mp, 2mp + 1 of w
            # v[0, 2mp:2mp + 2] and v[1, 2mp:2mp + 2]: one strided copy of 2 rows
            Copy(src, FP32, 8 + 2 * mp, 4, 2, "float32", rows=2, src_stride=4, dst_stride=2),
        )
        assert [r for c in fill.copies for r in c.runs()] == [
            (4 * mp, 0, 4),
            (8 + 2 * mp, 4, 2),
            (12 + 2 * mp, 6, 2),
        ]
    model1 = plan.file("mp_rank_01_model_states.pt")
    assert _fill(plan, model1.name, ("module", "w")).shape == (2, 2)
    assert _fill(plan, model1.name, ("module", "v")).copies == (
        Copy(MODEL, ("module", "v"), 2, 0, 2, "float32", rows=2, src_stride=4, dst_stride=2),
    )
    assert plan.sidecar is not None and plan.sidecar.tp == 2
    assert plan.sidecar.tp_splits == {"w": TPSplit(0), "v": TPSplit(1)}


def test_tp_change_with_unknown_split_names_the_tensor() -> None:
    tensors = _entries("w", (4, 2), [(0, 0, 0, 8)])
    with pytest.raises(CheckpointError, match="'w'.*tp_rules"):
        build_plan(_manifest(1, tensors), _meta(("w",)), Target(2, 1, 1, 1))


def test_entry_points_refuse_wrong_kinds_of_argument(tmp_path: Path) -> None:
    """A lone file name as ``files`` (iterated as characters it gave an empty plan) and rank
    coordinates that are not integers (raw ValueError/TypeError from deep in the planner)
    are one clear error each, at the entry; out of range is a LayoutError naming the target."""
    manifest = _manifest(2, _entries("a", (3, 2), [(0, 0, 0, 5), (1, 0, 5, 1)]))
    meta, target = _meta(("a",)), Target(1, 1, 2, 1)
    with pytest.raises(TypeError, match=r"files='mp_rank_00_model_states.pt' is one name.*\(\'"):
        build_plan(manifest, meta, target, files=MODEL)
    with pytest.raises(TypeError, match="got 0 \\(int\\)"):
        build_plan(manifest, meta, target, files=[MODEL, 0])  # type: ignore[list-item]
    assert [f.name for f in build_plan(manifest, meta, target, files=[MODEL]).files] == [MODEL]

    assert rank_files(manifest, meta, target, 0, 0, 1) == (MODEL, _optim(1))
    assert rank_files(manifest, meta, target, 0, 0, np.int64(1)) == (MODEL, _optim(1))
    for bad in ("1", 1.0, 0.5, None, True):
        with pytest.raises(TypeError, match=f"rank_files: dp rank must be an integer, got {bad!r}"):
            rank_files(manifest, meta, target, 0, 0, bad)  # type: ignore[arg-type]
    with pytest.raises(LayoutError, match="pp stage -1 is negative"):
        rank_files(manifest, meta, target, 0, -1, 0)
    with pytest.raises(LayoutError, match=r"rank \(tp=0, pp=0, dp=2\) is outside target tp=1"):
        rank_files(manifest, meta, target, 0, 0, 2)

    missing = tmp_path / "never-read"  # the checks come before any IO
    for bad in ((0, 0), (0, "0", 0), "000", (0, 0, 1.5)):
        with pytest.raises(TypeError, match="plan_rank_load: "):
            plan_rank_load(missing, bad, dp=1)  # type: ignore[arg-type]
    with pytest.raises(LayoutError, match="plan_rank_load: dp rank -1 is negative"):
        plan_rank_load(missing, (0, 0, -1))
