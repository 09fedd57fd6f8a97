"""The direct load (the default) through ``Trainer.fit(ckpt_path=...)``: a dp change under ZeRO 2
loads straight into the engine (no copy written, no temporary folder left), and training
continues bit for bit as after loading the reshaped copy (``AutoReshape(direct=False)``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lightning_reshape.checkpoint.direct import DIRECT_PREFIX
from tests.lightning.test_trainer import ok, run, snapshot


def test_direct_dp_change_equals_copy(tmp_path: Path) -> None:
    base = {"strategy": "deepspeed_reshape", "steps": 6, "ckpt_every": 4, "global_batch": 8}
    first = run(
        tmp_path,
        dp1={**base, "devices": 1, "ckpt_dir": str(tmp_path / "dp1")},
        dp2={**base, "devices": 2, "ckpt_dir": str(tmp_path / "dp2")},
    )
    ok(first["dp1"]), ok(first["dp2"])
    ck1, ck2 = tmp_path / "dp1" / "step=4.ckpt", tmp_path / "dp2" / "step=4.ckpt"
    before = {ck1: snapshot(ck1), ck2: snapshot(ck2)}
    direct = run(
        tmp_path,
        up_b={**base, "devices": 2, "resume": str(ck1)},
        down_b={**base, "devices": 1, "resume": str(ck2)},
    )
    up_b, down_b = ok(direct["up_b"]), ok(direct["down_b"])
    for ck, snap in before.items():
        assert snapshot(ck) == snap, f"{ck}: the direct path wrote or changed files"
    assert not list(Path(tempfile.gettempdir()).glob(f"{DIRECT_PREFIX}*")), "temp folder left"
    copies = run(
        tmp_path,
        up_a={**base, "devices": 2, "resume": str(ck1), "policy": {"direct": False}},
        down_a={**base, "devices": 1, "resume": str(ck2), "policy": {"direct": False}},
    )
    up_a, down_a = ok(copies["up_a"]), ok(copies["down_a"])
    for a, b, ck, saved in ((up_a, up_b, ck1, [1, 1, 1]), (down_a, down_b, ck2, [1, 1, 2])):
        assert b["resume"]["reshaped"] and b["resume"]["saved"] == saved
        assert b["resume"]["loaded_from"] == str(ck)
        assert a["resume"]["loaded_from"] != str(ck)  # path (a) loaded a copy
        assert sorted(b["losses"], key=int) == ["4", "5"]
        assert b["losses"] == a["losses"]
        for name, value in a["params"].items():
            assert torch.equal(torch.tensor(b["params"][name]), torch.tensor(value)), name
    log = (tmp_path / "down_b.log").read_text()
    line = next(x for x in log.splitlines() if "loaded directly in" in x)
    assert line.startswith(
        f"lightning-reshape: checkpoint {ck2} saved at tp=1 pp=1 dp=2 (ZeRO 2), "
        "resuming at tp=1 pp=1 dp=1: loaded directly in "
    ), line
    assert line.endswith(" s (no copy written)"), line
