"""Pipeline reshape against real DeepSpeed: a 6-layer PipelineModule (unequal layers, DeepSpeed's
default ``partition_method="parameters"``) trained with ZeRO 1 at the source pp, converted,
loaded by a PipelineModule engine at the target pp with stock
``engine.load_checkpoint(load_optimizer_states=True)``; every fp32 master, optimizer state and
buffer must equal the source's bit for bit.

Four launches: pp 2 source; pp 1 loads + pp 1 source; pp 3 loads + pp 3 source; 2-process
loads (pp 2, and pp 1 at dp 2). Sources: pp 1, 2, 3 at dp 1 and pp 1 at dp 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_reshape.checkpoint.convert import convert_checkpoint
from lightning_reshape.checkpoint.plan import Target
from lightning_reshape.checkpoint.reader import read_manifest
from lightning_reshape.checkpoint.verify import verify
from lightning_reshape.errors import CheckpointError, LayoutError
from tests.deepspeed_harness import run_distributed
from tests.reshape.pp_workers import PPSpec, load_worker, train_and_load_worker, train_worker
from tests.reshape.rank_plans import check_rank_plans

# (source, target pp, target dp); sources "ppN" are at dp 1, "pp1dp2" at dp 2; ZeRO 1
PAIRS = [
    ("pp2", 1, 1),
    ("pp2", 3, 1),
    ("pp1", 2, 1),
    ("pp3", 2, 1),
    ("pp2", 1, 2),  # pp 2 dp 1 -> pp 1 dp 2
    ("pp1dp2", 2, 1),  # pp 1 dp 2 -> pp 2 dp 1: ZeRO partitions of a dp 2 source
]
# the target PipelineModule partitions uniformly (stages (0, 3, 6), not DeepSpeed's default
# parameter balance (0, 4, 6)): (source, target pp, target dp)
UNIFORM_PAIRS = [("pp2", 2, 1)]
# tensor-parallel pipeline model (column/row/vocabulary parallel layers, sidecar):
# (source, target tp, target pp); tp and pp swap places at 2 processes
TP_PAIRS = [("tp2pp1", 1, 2), ("tp1pp2", 2, 1)]


# layer lists mixing parameter-free modules (GELU, Dropout, Tanh), a plain function and layers
# with parameters; stock DeepSpeed writes and expects a layer file for every module
ACT_PAIRS = [("act2", 1, 2), ("act1dp2", 2, 1)]


def _label(src: str, pp: int, dp: int) -> str:
    return f"{src}->pp{pp}dp{dp}"


def _convert(
    root: Path,
    src_name: str,
    pp: int,
    dp: int = 1,
    tp: int = 0,
    partition: str = "parameters",
    num_stages: bool = False,
    acts: bool = False,
    bf16: bool = False,
) -> tuple[str, str, PPSpec, str]:
    """Convert; ``tp=0`` is the plain model at tp 1, ``tp >= 1`` the tensor-parallel one."""
    src = root / "src" / src_name
    label = _label(src_name, pp, dp) if not tp else f"{src_name}->tp{tp}pp{pp}"
    if partition != "parameters":
        label += f"-{partition}"
    dst = root / "out" / label.replace(">", "")
    convert_checkpoint(src, dst, tp=max(tp, 1), pp=pp, dp=dp, pp_partition=partition)
    spec = PPSpec(
        src_name, pp, tp=tp, partition=partition, num_stages=num_stages, acts=acts, bf16=bf16
    )
    return (label, str(dst), spec, str(src / "expected.pt"))


@pytest.fixture(scope="module")
def pp_grid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pp")
    src = str(root / "src")
    parts = run_distributed(
        train_worker,
        2,
        src,
        [
            PPSpec("pp2", 2),
            PPSpec("pp1dp2", 1),
            PPSpec("tp2pp1", 1, tp=2),
            PPSpec("tp1pp2", 2, tp=1),
            PPSpec("ns2", 2, num_stages=True),
            PPSpec("tied2", 2, tied=True),
            PPSpec("act2", 2, acts=True),
            PPSpec("act1dp2", 1, acts=True),
            PPSpec("bf16pp2", 2, bf16=True),
        ],
        timeout=300,
    )[0]
    jobs1 = [_convert(root, "pp2", 1), _convert(root, "ns2", 1, num_stages=True)]
    res1, p1 = run_distributed(
        train_and_load_worker, 1, src, [PPSpec("pp1", 1)], jobs1, timeout=300
    )[0]
    res3, p3 = run_distributed(
        train_and_load_worker, 3, src, [PPSpec("pp3", 3)], [_convert(root, "pp2", 3)], timeout=300
    )[0]
    jobs2 = [_convert(root, s, pp, dp) for s, pp, dp in PAIRS if pp * dp == 2]
    jobs2 += [_convert(root, s, pp, tp=tp) for s, tp, pp in TP_PAIRS]
    jobs2 += [_convert(root, s, pp, dp, partition="uniform") for s, pp, dp in UNIFORM_PAIRS]
    jobs2 += [_convert(root, s, pp, dp, acts=True) for s, pp, dp in ACT_PAIRS]
    jobs2 += [_convert(root, "bf16pp2", 1, 2, bf16=True)]  # BF16_Optimizer: pp 2 -> dp 2
    res2 = run_distributed(load_worker, 2, jobs2, timeout=300)[0]
    return {"root": root, "parts": {**parts, **p1, **p3}, "results": {**res1, **res3, **res2}}


def test_stages_are_unbalanced_by_layer_count(pp_grid: dict[str, Any]) -> None:
    """The layers differ in size, so DeepSpeed's parameter balancing is what is reproduced."""
    assert [int(x) for x in pp_grid["parts"]["pp2"]] == [0, 4, 6]
    assert [int(x) for x in pp_grid["parts"]["pp3"]] == [0, 2, 4, 6]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: _label(*p))
def test_pp_reshape_loads_bit_exact(pp_grid: dict[str, Any], pair: tuple[str, int, int]) -> None:
    assert pp_grid["results"][_label(*pair)] == []


@pytest.mark.parametrize("pair", TP_PAIRS, ids=lambda p: f"{p[0]}->tp{p[1]}pp{p[2]}")
def test_tp_pp_swap_loads_bit_exact(pp_grid: dict[str, Any], pair: tuple[str, int, int]) -> None:
    assert pp_grid["results"][f"{pair[0]}->tp{pair[1]}pp{pair[2]}"] == []


@pytest.mark.parametrize("pair", ACT_PAIRS, ids=lambda p: _label(*p))
def test_parameter_free_layers_load_bit_exact(
    pp_grid: dict[str, Any], pair: tuple[str, int, int]
) -> None:
    """Every layer file stock DeepSpeed expects at the target is written, empty ones included."""
    assert pp_grid["results"][_label(*pair)] == []
    out = pp_grid["root"] / "out" / _label(*pair).replace(">", "")
    names = {p.name for p in out.glob("*/layer_*")}
    assert {"layer_02-model_00-model_states.pt", "layer_06-model_00-model_states.pt"} <= names
    assert "layer_04-model_00-model_states.pt" not in names  # the plain function


@pytest.mark.parametrize("pair", UNIFORM_PAIRS, ids=lambda p: _label(*p) + "-uniform")
def test_uniform_target_partition_loads_bit_exact(
    pp_grid: dict[str, Any], pair: tuple[str, int, int]
) -> None:
    assert pp_grid["results"][_label(*pair) + "-uniform"] == []


def test_pp_partition_choices(pp_grid: dict[str, Any], tmp_path: Path) -> None:
    """The target's stage boundaries follow the partition asked for; bad ones are refused."""
    src = pp_grid["root"] / "src" / "pp2"
    uniform = convert_checkpoint(src, tmp_path / "u", tp=1, pp=2, dp=1, pp_partition="uniform")
    explicit = convert_checkpoint(src, tmp_path / "e", tp=1, pp=2, dp=1, pp_partition="0,2,6")

    def stages(out: Path) -> list[int]:  # the stage of each layer, as written
        by_layer = {
            p.layer: p.pp_stage
            for e in read_manifest(out).tensors
            for p in e.pieces
            if p.layer is not None
        }
        return [by_layer[k] for k in sorted(by_layer)]

    assert stages(src) == [0, 0, 0, 0, 1, 1]  # DeepSpeed's parameter balance
    assert stages(uniform) == [0, 0, 0, 1, 1, 1]
    assert stages(explicit) == [0, 0, 1, 1, 1, 1]
    assert verify(src, uniform) == [] and verify(src, explicit) == []
    with pytest.raises(LayoutError, match="pp_partition='0,9'"):
        convert_checkpoint(src, tmp_path / "bad", tp=1, pp=2, dp=1, pp_partition="0,9")
    with pytest.raises(LayoutError, match="pp_partition='balanced'"):
        convert_checkpoint(src, tmp_path / "bad2", tp=1, pp=2, dp=1, pp_partition="balanced")


def test_num_stages_pipeline_without_model_axis(pp_grid: dict[str, Any]) -> None:
    """``PipelineModule(num_stages=N)`` names layer files without ``-model_XX``; they are read,
    and the pp 1 copy loads into a ``num_stages=1`` engine bit for bit."""
    src = pp_grid["root"] / "src" / "ns2" / "step2"
    assert (src / "layer_01-model_states.pt").is_file()
    assert not list(src.glob("layer_*-model_00-*"))
    assert pp_grid["results"][_label("ns2", 1, 1)] == []


def test_tied_pipeline_layers_are_refused(pp_grid: dict[str, Any], tmp_path: Path) -> None:
    """Which stages use a TiedLayerSpec module is not in the checkpoint: refused, nothing
    written."""
    src = pp_grid["root"] / "src" / "tied2"
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: .*TiedLayerSpec"):
        convert_checkpoint(src, tmp_path / "out", tp=1, pp=1, dp=1)
    assert not (tmp_path / "out").exists()


def test_round_trip_pp_2_3_1_2_verifies_equal(pp_grid: dict[str, Any], tmp_path: Path) -> None:
    src = pp_grid["root"] / "src" / "pp2"
    a = convert_checkpoint(src, tmp_path / "pp3", tp=1, pp=3, dp=1)
    b = convert_checkpoint(a.parent, tmp_path / "pp1", tp=1, pp=1, dp=1)
    c = convert_checkpoint(b.parent, tmp_path / "pp2", tp=1, pp=2, dp=1)
    assert verify(src, c) == []
    assert sorted(p.name for p in c.glob("*.pt")) == sorted(p.name for p in src.glob("*/*.pt"))


def test_pipeline_targets_refuse_zero_2_and_too_many_stages(
    pp_grid: dict[str, Any], tmp_path: Path
) -> None:
    src = pp_grid["root"] / "src" / "pp2"
    with pytest.raises(LayoutError, match="zero_stage=2"):
        convert_checkpoint(src, tmp_path / "z2", tp=1, pp=2, dp=1, zero_stage=2)
    with pytest.raises(LayoutError, match="pp=7"):
        convert_checkpoint(src, tmp_path / "pp7", tp=1, pp=7, dp=1)


def test_bf16_optimizer_pipeline_reads_as_zero1_and_reshapes(
    pp_grid: dict[str, Any], tmp_path: Path
) -> None:
    """bf16 with fp32 gradient accumulation (the Megatron-DeepSpeed recipe) saves DeepSpeed's
    BF16_Optimizer files (``bf16_zero_pp_rank_*``, no recorded stage): read as ZeRO 1, pp 2 ->
    dp 2 loads bit for bit, and a pp change without an explicit stage round-trips equal."""
    src = pp_grid["root"] / "src" / "bf16pp2"
    m = read_manifest(src)
    assert (m.topology.zero_stage, m.optimizer_wrapper) == (1, "bf16_optimizer")
    assert pp_grid["results"][_label("bf16pp2", 1, 2)] == []
    a = convert_checkpoint(src, tmp_path / "pp3", tp=1, pp=3, dp=1)
    b = convert_checkpoint(a.parent, tmp_path / "pp2", tp=1, pp=2, dp=1)
    assert verify(src, a.parent) == [] and verify(src, b.parent) == []
    assert sorted(p.name for p in b.glob("*.pt")) == sorted(p.name for p in src.glob("*/*.pt"))


def test_rank_plans_equal_the_full_plan_filtered(pp_grid: dict[str, Any]) -> None:
    """Each target rank plans only its model, optimizer and stage's layer files and gets exactly
    the full plan's files: pp, tp and dp changes, parameter-free layers, BF16_Optimizer."""
    src = pp_grid["root"] / "src"
    targets = [Target(1, 1, 2, 1), Target(1, 2, 1, 1), Target(1, 3, 1, 1), Target(1, 2, 2, 1)]
    for name in ("pp2", "pp1dp2", "act2", "bf16pp2"):
        assert check_rank_plans(src / name, targets) == 2 + 2 + 3 + 4
    swaps = [Target(2, 1, 1, 1), Target(1, 2, 1, 1), Target(2, 2, 1, 1, "uniform")]
    assert check_rank_plans(src / "tp2pp1", swaps) == 2 + 2 + 4
