"""A Lightning resume never trains from a damaged reshaped copy (issue 11, kind 1).

The issue's case: a complete reshaped copy sits beside the checkpoint (as a previous resume at
the same layout leaves it), one fp32 value in its optimizer shard is changed on disk; resuming
at that layout must notice (the completion record's CRC-32), name the file, write it again, and
train on exactly as the run that never stopped.
"""

from __future__ import annotations

from pathlib import Path

from lightning_reshape.checkpoint.convert import plan_conversion, write_plan
from tests.checkpoint.test_output_integrity import flip_tensor_byte
from tests.lightning.test_trainer import assert_continues, ok, run


def test_damaged_reshaped_copy_is_redone(tmp_path: Path) -> None:
    base = {"strategy": "deepspeed_reshape", "steps": 6, "ckpt_every": 4, "global_batch": 8}
    ref = ok(run(tmp_path, dp1={**base, "devices": 1, "ckpt_dir": str(tmp_path / "dp1")})["dp1"])
    ck = tmp_path / "dp1" / "step=4.ckpt"
    copy = ck / "reshaped-tp1-pp1-dp2-zero2"  # where the strategy keeps its copy for dp 2
    plan = plan_conversion(ck, tp=1, dp=2, zero_stage=2)
    write_plan(plan, copy, plan.source_tag)
    shard = copy / plan.source_tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flip_tensor_byte(shard)

    up = ok(run(tmp_path, up={**base, "devices": 2, "resume": str(ck)})["up"])
    log = (tmp_path / "up.log").read_text()
    assert "damaged reshaped output" in log and f"{shard.name}: CRC-32 " in log, log[-3000:]
    assert "reused the complete reshaped copy" not in log
    assert up["resume"]["reshaped"] and up["resume"]["loaded_from"] == str(copy)
    assert_continues(up, ref, exact=False)
