"""Reshape grid against real DeepSpeed: train at the source, convert, load at the target with
``engine.load_checkpoint(load_optimizer_states=True)``, compare every fp32 master and optimizer
state bit for bit with the live source engine, and check the next losses.

Four launches in all (dp 2 sources; dp 1 loads; dp 3 loads + dp 3 sources; dp 2 loads)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lightning_reshape.checkpoint.convert import convert_checkpoint
from lightning_reshape.checkpoint.plan import Target
from lightning_reshape.checkpoint.verify import verify
from lightning_reshape.errors import ReshapeError
from tests.deepspeed_harness import run_distributed
from tests.reshape.rank_plans import check_rank_plans
from tests.reshape.workers import Spec, load_worker, train_and_load_worker, train_worker

MORE = 3
SOURCES = {
    1: Spec("z1", 1, "adamw"),
    2: Spec("z2", 2, "adagrad"),
    3: Spec(
        "z3", 3, "sgd", tied=False
    ),  # ZeRO 3 + Adagrad: DeepSpeed rebuilds the optimizer and cannot load its param groups
}
# (source stage, target dp, target stage)
GRID_FROM_2 = [
    (1, 1, 1),
    (1, 1, 2),
    (1, 1, 3),
    (2, 1, 2),
    (2, 1, 1),
    (3, 1, 3),
    (3, 1, 1),
    (3, 1, 2),
    (1, 3, 1),
    (1, 3, 3),
    (2, 3, 2),
    (2, 3, 1),  # no Adagrad under ZeRO 3: DeepSpeed cannot load its own
    (3, 3, 3),
    (3, 3, 2),
]
GRID_FROM_3 = [(1, 2, 1), (1, 2, 2), (2, 2, 2), (2, 2, 1), (3, 2, 3), (3, 2, 1)]


def _hashes(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def _spec_for(stage: int, tied: bool) -> Spec:
    base = SOURCES[stage]
    return Spec(base.name, stage, base.optimizer, tied)


def _jobs(src_root: Path, out_root: Path, grid: list[tuple[int, int, int]], src_dp: int) -> list:
    jobs = []
    for s_stage, dp, t_stage in grid:
        src = SOURCES[s_stage]
        label = f"dp{src_dp}z{s_stage}->dp{dp}z{t_stage}"
        dst = out_root / label.replace(">", "")
        convert_checkpoint(src_root / src.name, dst, tp=1, dp=dp, zero_stage=t_stage)
        # the target engine uses the target stage with the source's optimizer and model
        spec = Spec(src.name, t_stage, src.optimizer, src.tied)
        more = MORE if dp in (1, 2, 4) else 0
        jobs.append((label, str(dst), spec, str(src_root / src.name / "expected.pt"), more))
    return jobs


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reshape")
    src2, src3, out = root / "src_dp2", root / "src_dp3", root / "out"
    specs = list(SOURCES.values())
    losses2 = run_distributed(train_worker, 2, str(src2), specs, MORE, timeout=300)[0]
    before = _hashes(src2)
    jobs1 = _jobs(src2, out, [g for g in GRID_FROM_2 if g[1] == 1], 2)
    jobs3 = _jobs(src2, out, [g for g in GRID_FROM_2 if g[1] == 3], 2)
    res1 = run_distributed(load_worker, 1, jobs1, timeout=300)[0]
    res3, losses3 = run_distributed(
        train_and_load_worker, 3, str(src3), specs, MORE, jobs3, timeout=300
    )[0]
    jobs2 = _jobs(src3, out, GRID_FROM_3, 3)
    res2 = run_distributed(load_worker, 2, jobs2, timeout=300)[0]
    return {
        "root": root,
        "src2": src2,
        "src3": src3,
        "out": out,
        "losses2": losses2,
        "losses3": losses3,
        "results": {**res1, **res3, **res2},
        "hashes_before": before,
    }


def test_every_pair_loads_bit_exact(grid: dict[str, Any]) -> None:
    results = grid["results"]
    expected = {f"dp2z{s}->dp{d}z{t}" for s, d, t in GRID_FROM_2} | {
        f"dp3z{s}->dp{d}z{t}" for s, d, t in GRID_FROM_3
    }
    assert set(results) == expected
    bad = {k: v["problems"] for k, v in results.items() if v["problems"]}
    assert not bad
    for label, r in results.items():
        assert r["global_steps"] == 3, label
        assert r["sched"] is not None and r["sched"]["last_batch_iteration"] == 2, label


def test_loss_continuity_dp_change(grid: dict[str, Any]) -> None:
    """dp 2 -> 1 and dp 3 -> 2: the next losses equal the run that stayed (fp32, exactly).
    Every rank sees the same batch, so gradient averaging over 1, 2 (or 4) ranks is exact."""
    results = grid["results"]
    for s in (1, 2, 3):
        name = SOURCES[s].name
        assert results[f"dp2z{s}->dp1z{s}"]["losses"] == grid["losses2"][name]
        assert len(grid["losses2"][name]) == MORE
    # stage changes continue identically too (same elementwise optimizer math)
    assert results["dp2z1->dp1z2"]["losses"] == grid["losses2"]["z1"]
    assert results["dp2z2->dp1z1"]["losses"] == grid["losses2"]["z2"]


def test_source_untouched(grid: dict[str, Any]) -> None:
    assert _hashes(grid["src2"]) == grid["hashes_before"]


def test_round_trip_verify(grid: dict[str, Any]) -> None:
    out = grid["out"]
    for s in (1, 2, 3):
        src = grid["src2"] / SOURCES[s].name
        there = out / f"rt{s}_a"
        back = out / f"rt{s}_b"
        convert_checkpoint(src, there, tp=1, dp=3, zero_stage=1 if s == 3 and False else None)
        convert_checkpoint(there, back, tp=1, dp=2)
        assert verify(src, there) == []
        assert verify(src, back) == []
    # a stage round trip 1 -> 3 -> 1
    src = grid["src2"] / "z1"
    convert_checkpoint(src, out / "st_a", tp=1, dp=3, zero_stage=3)
    convert_checkpoint(out / "st_a", out / "st_b", tp=1, dp=2, zero_stage=1)
    assert verify(src, out / "st_b") == []
    # and verify notices a real difference (dp 2 vs dp 3 sources trained on different data? no:
    # same data and seed, so compare against a checkpoint of a different optimizer instead)
    diffs = verify(grid["src2"] / "z1", grid["src2"] / "z2")
    assert diffs


def test_reuse_and_redo(grid: dict[str, Any], tmp_path: Path) -> None:
    src = grid["src2"] / "z1"
    dst = tmp_path / "o"
    first = convert_checkpoint(src, dst, tp=1, dp=1)
    mtimes = {p: p.stat().st_mtime_ns for p in first.iterdir()}
    again = convert_checkpoint(src, dst, tp=1, dp=1)
    assert {p: p.stat().st_mtime_ns for p in again.iterdir()} == mtimes
    assert (dst / "latest").read_text() == first.name


def test_workers_match_serial(grid: dict[str, Any], tmp_path: Path) -> None:
    """``workers=2`` writes byte-identical files to ``workers=1`` (threads share torch's one
    allow-list; a per-call ``safe_globals()`` context used to drop it under another thread)."""
    for s in (1, 2, 3):
        src = grid["src2"] / SOURCES[s].name
        for dp in (1, 3):
            serial = _hashes(convert_checkpoint(src, tmp_path / f"z{s}dp{dp}w1", tp=1, dp=dp))
            for rep in range(2):
                dst = tmp_path / f"z{s}dp{dp}w2r{rep}"
                assert _hashes(convert_checkpoint(src, dst, tp=1, dp=dp, workers=2)) == serial
                assert verify(src, dst) == []


def test_workers_fresh_process(grid: dict[str, Any], tmp_path: Path) -> None:
    """In a process that has registered nothing yet (DeepSpeed not imported), threads that hit
    DeepSpeed types at the same moment all load them: the allow-list is added to, never reset."""
    src = grid["src2"] / "z1"
    convert_checkpoint(src, tmp_path / "w1", tp=1, dp=3)
    serial = _hashes(tmp_path / "w1")
    script = (
        "import sys\n"
        "assert 'deepspeed' not in sys.modules\n"
        "from lightning_reshape.checkpoint.convert import convert_checkpoint\n"
        "for i in range(3):\n"
        "    convert_checkpoint(sys.argv[1], f'{sys.argv[2]}{i}', tp=1, dp=3, workers=4)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "w4_")], check=True)
    for i in range(3):
        assert _hashes(tmp_path / f"w4_{i}") == serial


def test_bad_targets_write_nothing(grid: dict[str, Any], tmp_path: Path) -> None:
    src = grid["src2"] / "z1"
    for kwargs in (
        {"tp": 2, "dp": 1},
        {"tp": 1, "pp": 2, "dp": 1},
        {"tp": 1, "dp": 1, "zero_stage": 4},  # ZeRO 0 is a valid target since issue 12
    ):
        dst = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        with pytest.raises(ReshapeError) as info:
            convert_checkpoint(src, dst, **kwargs)
        assert str(src) in str(info.value) or "zero_stage" in str(info.value)
        assert not dst.exists() or not any(dst.iterdir())


def test_rank_plans_equal_the_full_plan_filtered(grid: dict[str, Any]) -> None:
    """Each target rank plans only the files it loads (ZeRO 0/1/2/3 from ZeRO 1/2/3 at dp 2)
    and gets exactly the full plan's files."""
    targets = [Target(1, 1, dp, stage) for dp in (1, 2, 3) for stage in (0, 1, 2, 3)]
    for spec in SOURCES.values():
        assert check_rank_plans(grid["src2"] / spec.name, targets) == 24
