"""Path (b), a dp-only change loaded straight into the engine, against path (a), a converted copy
loaded by ``engine.load_checkpoint(load_optimizer_states=True)``: bit for bit the same fp32
partitions, optimizer states, step, loss scaler, module, and the same next losses and states.

Three launches: dp 2 sources; dp 1 sources + loads of the dp 2 ones; dp 2 loads of the dp 1 ones
(ZeRO 1 with AdamW, ZeRO 2 with Adagrad)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deepspeed_harness import run_distributed
from tests.reshape.direct_workers import both_paths_worker, train_then_both_worker
from tests.reshape.workers import Spec, train_worker

MORE = 2
SPECS = [Spec("z1", 1, "adamw"), Spec("z2", 2, "adagrad")]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    dp2 = tmp_path_factory.mktemp("dp2")
    dp1 = tmp_path_factory.mktemp("dp1")
    run_distributed(train_worker, 2, str(dp2), SPECS, MORE, timeout=300)
    jobs_from_2 = [(str(dp2 / s.name), s) for s in SPECS]
    per_rank = run_distributed(
        train_then_both_worker, 1, str(dp1), SPECS, MORE, jobs_from_2, timeout=300
    )
    out: dict[str, Any] = {"dp1": per_rank}
    jobs_from_1 = [(str(dp1 / s.name), s) for s in SPECS]
    out["dp2"] = run_distributed(both_paths_worker, 2, str(dp2), jobs_from_1, MORE, timeout=300)
    return out


def _rank_results(results: dict[str, Any]) -> list[dict[str, Any]]:
    ranks = [r[1] for r in results["dp1"]]  # (trained, loaded) per rank
    ranks += results["dp2"]
    return ranks


@pytest.mark.parametrize("label", ["z1->dp1", "z2->dp1", "z1->dp2", "z2->dp2"])
def test_direct_equals_converted(results: dict[str, Any], label: str) -> None:
    seen = 0
    for per_rank in _rank_results(results):
        if label not in per_rank:
            continue
        seen += 1
        res = per_rank[label]
        assert not res["problems"], res["problems"]
        assert res["steps"] == 3
        assert res["epoch"] == 7
        assert res["has_state"], "no optimizer state loaded"
        assert len(res["losses"]) == MORE
    assert seen == (1 if label.endswith("dp1") else 2)
