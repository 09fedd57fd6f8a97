"""ParallelState on real gloo processes: every kind's torch group equals the topology's,
collectives over it add up, a rank creates communicators only for its own groups, and
DeepSpeed accepts the object as its mpu."""

from __future__ import annotations

import pytest

from lightning_reshape.distributed import plan_groups
from lightning_reshape.topology import GROUP_KINDS, ParallelConfig
from tests.deepspeed_harness import run_distributed
from tests.distributed.workers import deepspeed_worker, groups_worker

LAYOUTS = {
    4: [dict(tp=2), dict(tp=1), dict(tp=2, pp=2), dict(cp=2, pp=2), dict(ep=2, tp=2, etp=1)],
    8: [dict(tp=2, cp=2), dict(ep=4, tp=2, etp=1), dict(pp=4, ep=2)],
}


def _check(world_size: int, reports: list[list[dict]]) -> None:
    for rank, rank_reports in enumerate(reports):
        for report in rank_reports:
            layout = ParallelConfig(**report["config"]).resolve(world_size)
            for kind in GROUP_KINDS:
                expected, torch_ranks, total, *rest = report["kinds"][kind]
                assert expected == layout.group_of(rank, kind)
                if not expected:
                    assert torch_ranks is None  # embedding group on a middle stage
                    continue
                assert torch_ranks == expected, (report["config"], kind)
                assert total == sum(r + 1 for r in expected)
                gathered, group_rank, group_size, rank_in = rest
                assert gathered == [float(r) for r in expected]
                assert group_rank == rank_in == expected.index(rank)
                assert group_size == len(expected)
            # Only its own groups: every multi-rank new_group call contains this rank, one per
            # distinct multi-rank group of this rank that is not the whole world.
            multi = [tuple(c) for c in report["calls"] if len(c) > 1]
            own = {
                tuple(layout.group_of(rank, k))
                for k in GROUP_KINDS
                if 1 < len(layout.group_of(rank, k)) < world_size
            }
            assert all(rank in c for c in multi)
            assert len(multi) == len(set(multi)) == len(own)
            assert set(multi) == own
            assert report["mesh"] == report["mesh_expected"]
            assert report["mesh_calls"] == 0  # the DeviceMesh reuses the groups


@pytest.mark.parametrize("world_size", [4, 8])
def test_groups_match_topology(world_size: int) -> None:
    _check(world_size, run_distributed(groups_worker, world_size, LAYOUTS[world_size], timeout=120))


def test_plan_is_rank_independent_and_shares_communicators() -> None:
    layout = ParallelConfig(tp=2).resolve(4)
    sources = {p.kind: (p.source, p.alias_of) for p in plan_groups(layout)}
    assert sources["tp"] == ("comm", None)
    assert sources["tp-pp"] == ("alias", "tp")
    assert sources["pp"] == ("self", None)
    assert sources["dp-cp"] == ("alias", "dp")
    assert plan_groups(ParallelConfig(tp=1).resolve(4))[2].source == "world"  # dp


def test_deepspeed_accepts_state_as_mpu() -> None:
    """One 4-rank launch: tp=2 x dp=2 with ZeRO 1, then tp=1 x dp=4 with ZeRO 1, 2 and 3."""
    cases = [(dict(tp=2), 1)] + [(dict(tp=1), s) for s in (1, 2, 3)]
    results = run_distributed(deepspeed_worker, 4, cases, timeout=180)
    for rank, (tp2, *tp1) in enumerate(results):
        assert tp2["dp_world_size"] == 2
        assert tp2["mp_world_size"] == 2
        assert tp2["checkpoint_mp_rank"] == rank % 2
        assert tp2["dp_group_ranks"] == [rank % 2, rank % 2 + 2]
        assert [r["stage"] for r in tp1] == [1, 2, 3]
        for result in tp1:
            assert result["dp_world_size"] == 4 and result["mp_world_size"] == 1
            assert result["checkpoint_mp_rank"] == 0
            assert result["dp_group_ranks"] == [0, 1, 2, 3]
        # Same data and seed: ZeRO 1, 2 and 3 train alike (float32, different partitioning).
        assert tp1[0]["losses"] == pytest.approx(tp1[2]["losses"], rel=1e-5)
