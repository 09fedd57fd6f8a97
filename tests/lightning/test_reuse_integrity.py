"""A Lightning resume never trains from a damaged reshaped copy, and two jobs resuming one
checkpoint at one layout share one copy (issue 11, kinds 1 and 2).

The issue's case: a complete reshaped copy sits beside the checkpoint (as a previous resume at
the same layout leaves it) and one fp32 value in its optimizer shard is changed on disk. Two
jobs then resume at that layout at the same moment: the one that takes the output's lock
notices the damage (the completion record's CRC-32), names the file and writes it again; the
other waits, checks the repaired copy and reuses it. Both train on exactly as the run that
never stopped.
"""

from __future__ import annotations

from pathlib import Path

from lightning_reshape.checkpoint.convert import plan_conversion, write_plan
from tests.checkpoint.helpers import flip_tensor_byte
from tests.lightning.test_trainer import assert_continues, ok, run


def test_damaged_copy_redone_once_for_two_jobs(tmp_path: Path) -> None:
    base = {"strategy": "deepspeed_reshape", "steps": 6, "ckpt_every": 4, "global_batch": 8}
    ref = ok(run(tmp_path, dp1={**base, "devices": 1, "ckpt_dir": str(tmp_path / "dp1")})["dp1"])
    ck = tmp_path / "dp1" / "step=4.ckpt"
    copy = ck / "reshaped-tp1-pp1-dp2-zero2"  # where the strategy keeps its copy for dp 2
    plan = plan_conversion(ck, tp=1, dp=2, zero_stage=2)
    write_plan(plan, copy, plan.source_tag)
    shard = copy / plan.source_tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flip_tensor_byte(shard)

    jobs = run(
        tmp_path,
        a={**base, "devices": 2, "resume": str(ck), "policy": {"direct": False}},
        b={**base, "devices": 2, "resume": str(ck), "policy": {"direct": False}},
    )
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in jobs}
    repaired = [n for n, log in logs.items() if "damaged reshaped output" in log]
    reused = [n for n, log in logs.items() if "reusing the reshaped copy made earlier" in log]
    assert len(repaired) == 1 and len(reused) == 1 and repaired != reused, logs
    assert f"{shard.name}: CRC-32 " in logs[repaired[0]]
    assert "reshaped in" in logs[repaired[0]]
    for name in jobs:
        result = ok(jobs[name])
        assert result["resume"]["reshaped"] and result["resume"]["loaded_from"] == str(copy)
        assert_continues(result, ref, exact=False)
    assert not list(copy.glob(".*.partial"))
