"""inspect_checkpoint / format_inspect on real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_reshape.checkpoint.inspect import format_inspect, inspect_checkpoint


def test_inspect_zero3_bf16(ckpt_root: dict[int, Path]) -> None:
    report = inspect_checkpoint(ckpt_root[2] / "z3bf16")
    json.dumps(report)  # --json must work
    assert report["zero_stage"] == 3 and report["dtype"] == "bfloat16"
    assert report["topology"] == {"tp": 1, "pp": 1, "dp": 2, "source": "deepspeed"}
    assert report["parameters"]["frozen"] == 2
    assert report["parameters"]["tied"] == [["head.weight", "emb.weight"]]
    assert report["client_state"]["global_step"] == 2 and report["client_state"]["epoch"] == 3
    assert report["largest"][0]["name"] == "emb.weight"
    assert report["tensors"]["bytes"] > 0 and report["files"]["count"] == 4
    text = format_inspect(report)
    for needle in ("zero stage", "tp=1 pp=1 dp=2", "bfloat16", "emb.weight", "exp_avg", "epoch"):
        assert needle in text


def test_inspect_tp_and_pipeline(ckpt_root: dict[int, Path]) -> None:
    tp = inspect_checkpoint(ckpt_root[2] / "tp_z1")
    assert tp["topology"]["tp"] == 2 and tp["topology"]["source"] == "sidecar"
    assert "dim 0" in format_inspect(tp)
    pp = inspect_checkpoint(ckpt_root[4] / "pp_z1")
    assert pp["format"].endswith("pipeline") and pp["topology"]["pp"] == 2
    assert pp["optimizer_state_keys"] == ["sum"]
