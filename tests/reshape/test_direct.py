"""The direct load (path b: the plan served to DeepSpeed's own load by the engine sink) against
the copy path (path a: a converted copy loaded by ``engine.load_checkpoint``), for every kind of
change, in fp32 and bf16: the engines' full states equal bit for bit right after the load and
after 2 more steps (module, ZeRO partitions, fp32 masters, every optimizer state, loss scaler,
lr scheduler, step counters, client state). bf16 ZeRO runs save ``bf16_zero_pp_rank_*`` files
(the name the old direct path got wrong). Three launches: world 2 (sources, and the changes
that stay at 2 ranks), world 1 (sources, dp 2 -> 1), world 2 (dp 1 -> 2, pp 1 -> 2, and a
source truncated under the load)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.deepspeed_harness import run_distributed
from tests.reshape.direct_workers import Case, Job, at, worker

PRECISIONS = ("fp32", "bf16")
CHANGES = ("dp21", "dp12", "tp", "z23", "z31", "z10", "pp21", "pp12")


def _sources(bf16: bool) -> dict[str, Case]:
    opt = "adam" if bf16 else "adagrad"
    return {
        "z2": Case("net", 2, bf16, {"stage": 2}),
        "z3": Case("net", 2, bf16, {"stage": 3, "tied": False}),  # ZeRO 3 -> 1: untied
        "z1": Case("net", 2, bf16, {"stage": 1}),
        "tp2": Case("gpt", 2, bf16, {"tp": 2, "stage": 1}),
        "pp2": Case("pipe", 2, bf16, {"pp": 2}),
        # bf16: DeepSpeed's BF16_Optimizer (Adam); fp32: Adagrad (BF16_Optimizer cannot save it)
        "dp1": Case("net", 1, bf16, {"stage": 1, "grad_accum_fp32": bf16, "optimizer": opt}),
        "pp1": Case("pipe", 1, bf16, {"pp": 1}),
    }


def _jobs(root: str, prec: str) -> dict[str, Job]:
    s = _sources(prec == "bf16")

    def job(change: str, src: str, target: Case, **to: int) -> Job:
        return Job(f"{change}-{prec}", f"{root}/{src}-{prec}", target, to)

    return {
        "z23": job("z23", "z2", at(s["z2"], 2, stage=3), zero_stage=3),
        "z31": job("z31", "z3", at(s["z3"], 2, stage=1), zero_stage=1),
        "z10": job("z10", "z1", at(s["z1"], 2, stage=0), zero_stage=0),
        "tp": job("tp", "tp2", at(s["tp2"], 2, tp=1), tp=1, dp=2),
        "pp21": job("pp21", "pp2", at(s["pp2"], 2, pp=1), pp=1, dp=2),
        "dp21": job("dp21", "z2", at(s["z2"], 1), dp=1),
        "dp12": job("dp12", "dp1", at(s["dp1"], 2), dp=2),
        "pp12": job("pp12", "pp1", at(s["pp1"], 2, pp=2), pp=2, dp=1),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = str(tmp_path_factory.mktemp("direct"))
    src = {p: _sources(p == "bf16") for p in PRECISIONS}
    jobs = {p: _jobs(root, p) for p in PRECISIONS}
    two = [(f"{n}-{p}", c) for p in PRECISIONS for n, c in src[p].items() if c.world == 2]
    one = [(f"{n}-{p}", c) for p in PRECISIONS for n, c in src[p].items() if c.world == 1]
    stay = [jobs[p][c] for p in PRECISIONS for c in ("z23", "z31", "z10", "tp", "pp21")]
    out: dict[str, Any] = {"root": root}
    for per_rank in (
        run_distributed(worker, 2, root, two, stay, timeout=600),
        run_distributed(worker, 1, root, one, [jobs[p]["dp21"] for p in PRECISIONS], timeout=600),
        run_distributed(
            worker,
            2,
            root,
            [],
            [jobs[p][c] for p in PRECISIONS for c in ("dp12", "pp12")],
            jobs["bf16"]["dp12"],
            timeout=600,
        ),
    ):
        for rank, res in enumerate(per_rank):
            for label, value in res.items():
                out.setdefault(label, []).append((rank, value))
    return out


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("change", CHANGES)
def test_direct_equals_copy(results: dict[str, Any], change: str, prec: str) -> None:
    ranks = results[f"{change}-{prec}"]
    assert len(ranks) == (1 if change == "dp21" else 2)
    for rank, res in ranks:
        assert not res["problems"], (rank, res["problems"][:20])
        assert res["steps"] == 3 and res["epoch"] == 7
        assert res["has_state"], "no optimizer state loaded"
        assert len(res["losses"]) == 2
        assert res["temp_left"] == [], "a placeholder folder was left behind"
        own, whole = res["planned"]  # each rank plans its own files, not the world's
        shared = len(ranks) == 1 or whole == 1  # one rank, or one file all ranks load (ZeRO 0)
        assert 0 < own <= whole and (own < whole or shared), res["planned"]


def test_failure_inside_the_load_cleans_up(results: dict[str, Any]) -> None:
    for _, res in results["truncated"]:
        assert "mp_rank_00_model_states.pt" in res["error"], res["error"]
        # cut short after planning: not the file that was planned (identity check)
        assert "changed since the reshape was planned" in res["error"], res["error"]
        assert res["restored"], "the engine's checkpoint engine was not restored"
        assert res["temp_left"] == []


def test_bf16_sources_use_deepspeeds_bf16_file_names(results: dict[str, Any]) -> None:
    """The old direct path's bug: it asked for ``zero_pp_rank_*`` where bf16 runs save
    ``bf16_zero_pp_rank_*``; the bf16 cases above load such files."""
    for name in ("z2", "z1", "dp1", "pp2"):
        tag = Path(results["root"]) / f"{name}-bf16" / "src"
        assert list(tag.glob("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")), name
        assert not list(tag.glob("zero_pp_rank_*_optim_states.pt")), name


def test_zero3_load_without_optimizer_states_is_refused(results: dict[str, Any]) -> None:
    for _, res in results["zero3_no_optim"]:
        assert res["reasons"][0] is None
        assert "ZeRO 3 load without optimizer states" in res["reasons"][1]
        assert "cannot load directly" in res["error"], res["error"]
        assert res["restored"] and res["temp_left"] == []


def test_sink_checks_source_crcs(results: dict[str, Any], tmp_path: Path) -> None:
    """A flipped bit in a source record the sink reads is refused (naming the file and record)
    before its bytes reach an engine; without the check they would be used."""
    import shutil

    from lightning_reshape.checkpoint.convert import plan_conversion
    from lightning_reshape.checkpoint.engine_sink import SourceFiles, materialize
    from lightning_reshape.errors import CheckpointError
    from tests.checkpoint.helpers import flip_tensor_byte

    save = tmp_path / "z2"
    shutil.copytree(Path(results["root"]) / "z2-fp32", save)
    shard = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    flip_tensor_byte(save / "src" / shard)
    plan = plan_conversion(save, dp=1)
    target = next(f for f in plan.files if f.name.endswith("optim_states.pt"))
    assert materialize(plan, target, SourceFiles(plan, None))  # unchecked: read as found
    with pytest.raises(CheckpointError, match=f"{shard}: storage record data/.* CRC-32"):
        materialize(plan, target, SourceFiles(plan, set()))


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_sink_checks_records_read_in_part(
    results: dict[str, Any], tmp_path: Path, dp_rank: int
) -> None:
    """dp 1 -> 2: each rank reads half of each source record into place and checks the record's
    CRC-32 over those bytes in memory plus the other half read for the check alone. A flipped
    bit in the second half (rank 1 reads it into place; rank 0 reads it only for the check) is
    refused on both ranks; without the check the load goes through."""
    import shutil

    from lightning_reshape.checkpoint.convert import plan_rank_load
    from lightning_reshape.checkpoint.engine_sink import SourceFiles, materialize
    from lightning_reshape.errors import CheckpointError
    from tests.checkpoint.helpers import flip_tensor_byte

    save = tmp_path / "dp1"
    shutil.copytree(Path(results["root"]) / "dp1-fp32", save)
    shard = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    plan, _ = plan_rank_load(save, (0, 0, dp_rank), dp=2)
    target = next(f for f in plan.files if f.name.endswith("optim_states.pt"))
    checked: set[Any] = set()
    materialize(plan, target, SourceFiles(plan, checked))  # intact: passes, records checked
    assert checked
    flip_tensor_byte(save / "src" / shard)
    plan, _ = plan_rank_load(save, (0, 0, dp_rank), dp=2)  # planned again: the file changed
    target = next(f for f in plan.files if f.name.endswith("optim_states.pt"))
    assert materialize(plan, target, SourceFiles(plan, None))  # unchecked: read as found
    with pytest.raises(CheckpointError, match=f"{shard}: storage record data/.* CRC-32"):
        materialize(plan, target, SourceFiles(plan, set()))
