"""Real Trainer runs on CPU (2 processes, gloo, real DeepSpeed engines) through the strategy.

Each scenario runs ``run_trainer.py`` in a subprocess (Lightning's launcher re-runs the script
for rank 1), on its own free port. Data is drawn from the global step, so a run that resumes
sees exactly the global batches of a run that never stopped.

Tolerances: the state DeepSpeed loads after a reshape is the saved state bit for bit (the
converter's ``verify`` checks it, and the first loss after resume is equal). After that, a
different dp or tp changes the order of floating-point sums (gradients averaged over two
half batches instead of one mean; a row-parallel matmul summed in two halves), so later
losses agree to ~1e-6 relative and parameters (Adam normalises updates) to ~1e-5.
Resuming without a change is compared exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).with_name("run_trainer.py")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(spec: dict[str, Any], tmp: Path, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    spec = {**spec, "out": str(tmp / f"{name}.json")}
    log = tmp / f"{name}.log"
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("LOCAL_RANK", None)
    env.pop("WORLD_SIZE", None)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), json.dumps(spec)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
        )
    return proc, log


def run(tmp: Path, **specs: dict[str, Any]) -> dict[str, Any]:
    """Run the named scenarios concurrently; their results, or (rc, log text) on failure."""
    started = {name: _start(spec, tmp, name) for name, spec in specs.items()}
    results: dict[str, Any] = {}
    for name, (proc, log) in started.items():
        rc = proc.wait(timeout=TIMEOUT)
        out = tmp / f"{name}.json"
        if rc == 0 and out.is_file():
            results[name] = json.loads(out.read_text())
        else:
            results[name] = (rc, log.read_text(errors="replace"))
    return results


def ok(result: Any) -> dict[str, Any]:
    if isinstance(result, tuple):
        pytest.fail(f"scenario failed (rc={result[0]}):\n{result[1][-4000:]}")
    return result


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with size and mtime: proves a folder was left untouched."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_continues(resumed: dict[str, Any], reference: dict[str, Any], *, exact: bool) -> None:
    """Losses after resume and final parameters match the run that never stopped."""
    steps = sorted(resumed["losses"], key=int)
    assert steps == ["4", "5"], steps
    first = steps[0]
    assert resumed["losses"][first] == pytest.approx(reference["losses"][first], rel=1e-7, abs=0)
    for step in steps:
        want = reference["losses"][step]
        tol = 0 if exact else 1e-6
        assert resumed["losses"][step] == pytest.approx(want, rel=tol, abs=0), step
    for name, value in reference["params"].items():
        got, want = torch.tensor(resumed["params"][name]), torch.tensor(value)
        if exact:
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5, msg=name)


def test_import_registers_lazily() -> None:
    """``import lightning_reshape`` stays light; the names appear whichever import comes first."""
    code = (
        "import sys, lightning_reshape\n"
        "assert 'lightning' not in sys.modules and 'torch' not in sys.modules\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "names = [n for n in StrategyRegistry.available_strategies() if 'reshape' in n]\n"
        "assert {'deepspeed_reshape', 'deepspeed_reshape_stage_1', 'deepspeed_reshape_stage_2',\n"
        "        'deepspeed_reshape_stage_3'} <= set(names), names\n"
        "s = StrategyRegistry.get('deepspeed_reshape_stage_3')\n"
        "assert type(s).__name__ == 'ReshapeDeepSpeedStrategy' and s.zero_stage_3\n"
        "assert StrategyRegistry['deepspeed']['strategy'].__name__ == 'DeepSpeedStrategy'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    code2 = (
        "import lightning.pytorch, lightning_reshape\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "assert 'deepspeed_reshape' in StrategyRegistry\n"
    )
    subprocess.run([sys.executable, "-c", code2], check=True, env=env, timeout=120)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_dp_change_resume(stage: int, tmp_path: Path) -> None:
    """dp 1 -> 2 and dp 2 -> 1 through Trainer.fit(ckpt_path=...), with registry names."""
    name = "deepspeed_reshape" if stage == 2 else f"deepspeed_reshape_stage_{stage}"
    base = {"strategy": name, "steps": 6, "ckpt_every": 4, "global_batch": 8}
    first = run(
        tmp_path,
        dp1={**base, "devices": 1, "ckpt_dir": str(tmp_path / "dp1")},
        dp2={**base, "devices": 2, "ckpt_dir": str(tmp_path / "dp2")},
    )
    dp1, dp2 = ok(first["dp1"]), ok(first["dp2"])
    assert dp2["strategy"] == "ReshapeDeepSpeedStrategy"
    assert dp2["sampler"] == {"num_replicas": 2, "rank": 0}
    ck1, ck2 = tmp_path / "dp1" / "step=4.ckpt", tmp_path / "dp2" / "step=4.ckpt"
    sidecar = json.loads((ck2 / "checkpoint" / "lightning_reshape.json").read_text())
    assert sidecar["topology"] == {"tp": 1, "pp": 1, "dp": 2}
    assert sidecar["zero_stage"] == stage
    assert set(sidecar["tp_splits"]) == set(dp2["params"])
    before = {ck1: snapshot(ck1 / "checkpoint"), ck2: snapshot(ck2 / "checkpoint")}
    stale = ck1 / "reshaped-tp1-pp1-dp4-zero1"  # an older copy; keep_old=False removes it
    stale.mkdir()
    (stale / "latest").write_text("checkpoint")
    in_use = ck1 / "reshaped-tp1-pp1-dp3-zero1"  # another job is loading it: kept
    (in_use / "checkpoint").mkdir(parents=True)
    (in_use / "latest").write_text("checkpoint")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom lightning_reshape.checkpoint.copies import hold_in_use\n"
            f"with hold_in_use({str(in_use)!r}):\n    print('held', flush=True)\n"
            "    sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"

    second = run(
        tmp_path,
        # keep_old=False is the default; direct=False: this change goes through a copy
        up={**base, "devices": 2, "resume": str(ck1), "policy": {"direct": False}},
        down={
            **base,
            "devices": 1,
            "resume": str(ck2),
            "policy": {"output_dir": str(tmp_path / "copies"), "direct": False},
        },
    )
    up, down = ok(second["up"]), ok(second["down"])
    assert up["resume"]["reshaped"] and up["resume"]["saved"] == [1, 1, 1]
    assert up["resume"]["loaded_from"] == str(ck1 / f"reshaped-tp1-pp1-dp2-zero{stage}")
    assert down["resume"]["reshaped"] and down["resume"]["saved"] == [1, 1, 2]
    copy = tmp_path / "copies" / "step=4.ckpt" / f"reshaped-tp1-pp1-dp1-zero{stage}"
    assert down["resume"]["loaded_from"] == str(copy)
    assert not list(ck2.glob("reshaped-*"))
    assert not stale.exists()
    assert (in_use / "latest").is_file(), "a copy another job was loading was deleted"
    assert holder.stdin is not None
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    assert_continues(up, dp1, exact=False)
    assert_continues(down, dp2, exact=False)
    for ck, snap in before.items():
        assert snapshot(ck / "checkpoint") == snap, f"{ck} was modified"
    assert [(h["dp"], h["world_size"], h["global_step"]) for h in up["history"]] == [
        (1, 1, 0),
        (2, 2, 4),
    ]
    log = (tmp_path / "up.log").read_text()
    line = next(x for x in log.splitlines() if "reshaped in" in x)
    assert line.startswith(
        f"lightning-reshape: checkpoint {ck1} saved at tp=1 pp=1 dp=1 (ZeRO {stage}), "
        "resuming at tp=1 pp=1 dp=2: reshaped in "
    ), line
    assert line.endswith(" on disk)"), line  # where the copy went and what it costs
    assert "removed 1 older reshaped copy beside it" in log  # keep_old=False (the default)
    assert f"kept the older reshaped copy {in_use}: another job is loading it" in log


QKV = "model.blocks.0.attn.qkv.weight"


def test_tp_change_resume_and_unchanged_resume(tmp_path: Path) -> None:
    """TinyGPT at (tp 2, dp 1) resumed at (tp 1, dp 2), and at (tp 2, dp 1) with no work."""
    base = {"model": "gpt", "stage": 1, "steps": 6, "devices": 2, "global_batch": 4}
    tp2 = {**base, "parallel": {"tp": 2}}
    ref = ok(run(tmp_path, ref={**tp2, "ckpt_dir": str(tmp_path / "tp2"), "ckpt_every": 4})["ref"])
    ck = tmp_path / "tp2" / "step=4.ckpt"
    sidecar = json.loads((ck / "checkpoint" / "lightning_reshape.json").read_text())
    assert sidecar["topology"] == {"tp": 2, "pp": 1, "dp": 1}
    assert sidecar["tp_splits"][QKV] == {"dim": 0, "stride": 1}
    assert sidecar["tp_splits"]["model.blocks.0.attn.proj.weight"] == {"dim": 1, "stride": 1}
    assert sidecar["tp_splits"]["model.blocks.0.ln1.weight"] == "replicated"
    # The unchanged resume and the error case each get their own copy: the tp change below
    # writes a reshaped folder into ``ck`` concurrently.
    same_ck, bare_ck = tmp_path / "same.ckpt", tmp_path / "bare.ckpt"
    shutil.copytree(ck, same_ck)
    shutil.copytree(ck, bare_ck)
    (bare_ck / "checkpoint" / "lightning_reshape.json").unlink()
    liar_ck = tmp_path / "liar.ckpt"  # a hand-edited sidecar: qkv cut on dim 1, not 0
    shutil.copytree(ck, liar_ck)
    lie = {**sidecar, "tp_splits": {**sidecar["tp_splits"], QKV: {"dim": 1, "stride": 1}}}
    (liar_ck / "checkpoint" / "lightning_reshape.json").write_text(json.dumps(lie))
    same_before = snapshot(same_ck)

    out = run(
        tmp_path,
        tp1={
            **base,
            "parallel": {"tp": 1},
            "resume": str(ck),
            "policy": {"verify": True, "direct": False},
        },
        same={**tp2, "resume": str(same_ck), "forbid_reshape": True},
        bare={**base, "parallel": {"tp": 1}, "resume": str(bare_ck)},
        liar={**base, "parallel": {"tp": 1}, "resume": str(liar_ck)},
    )
    tp1, same = ok(out["tp1"]), ok(out["same"])
    assert tp1["resume"]["reshaped"] and tp1["resume"]["saved"] == [2, 1, 1]
    assert tp1["sampler"] == {"num_replicas": 2, "rank": 0}
    assert ref["sampler"] == {"num_replicas": 1, "rank": 0}
    assert_continues(tp1, ref, exact=False)

    # No reshape work at all: the converter is booby-trapped in that run, the folder unchanged.
    assert same["resume"] == {
        "reshaped": False,
        "loaded_from": str(same_ck),
        "saved": [2, 1, 1],
        "seconds": same["resume"]["seconds"],
    }
    assert snapshot(same_ck) == same_before
    assert (  # one line from our strategy, so a user sees the resume was looked at
        f"lightning-reshape: layout unchanged (tp=2 pp=1 dp=1, ZeRO 1): DeepSpeed loads "
        f"{same_ck} as saved"
    ) in (tmp_path / "same.log").read_text()
    assert_continues(same, ref, exact=True)

    rc, log = out["bare"]
    assert rc != 0
    assert "tensor-parallel split of 'model." in log and "AutoReshape(tp_rules=[...])" in log

    # the lie is in no file (equal shards), but the model at tp 1 refutes it before the load:
    # one error naming the parameter, the split, both shapes and the sidecar, not torch's
    rc, log = out["liar"]
    assert rc != 0 and "size mismatch" not in log
    assert (
        f"{QKV}: the checkpoint's tensor-parallel split (dim=1 stride=1, as "
        f"{liar_ck / 'checkpoint' / 'lightning_reshape.json'} records it) gives this rank a "
        "shard of shape (48, 64) at tp=1 pp=1 dp=2 zero_stage=1, but the model here has (96, 32)"
    ) in log

    # export: the tp 2 checkpoint and its tp 1 reshaped copy give the same full weights, under
    # the LightningModule's own parameter names
    from safetensors.torch import load_file

    from lightning_reshape.checkpoint.export import export_checkpoint

    at_tp2 = load_file(export_checkpoint(ck, tmp_path / "w2") / "model.safetensors")
    copy = Path(tp1["resume"]["loaded_from"])
    at_tp1 = load_file(export_checkpoint(copy, tmp_path / "w1") / "model.safetensors")
    assert set(ref["params"]) <= set(at_tp2) and set(at_tp2) == set(at_tp1)
    for name, value in at_tp2.items():
        assert torch.equal(value, at_tp1[name]), name
    assert at_tp2["model.blocks.0.attn.qkv.weight"].shape == (96, 32)  # whole, not a tp shard


def test_zero3_with_tp_partitions_over_dp_only(tmp_path: Path) -> None:
    """ZeRO 3 at tp 2: each parameter is partitioned over the data-parallel group only (zero.Init
    is given that group), so the run trains exactly as at ZeRO 1, its checkpoint holds each tp
    rank's whole parameters, and it resumes at tp 1 dp 2. Before: partitioned over the tp ranks
    too, other losses, and a checkpoint no reader could use."""
    from lightning_reshape.checkpoint.reader import read_manifest

    base = {"model": "gpt", "steps": 6, "devices": 2, "global_batch": 4, "parallel": {"tp": 2}}
    out = run(
        tmp_path,
        z1={**base, "stage": 1},
        z3={**base, "stage": 3, "ckpt_dir": str(tmp_path / "z3"), "ckpt_every": 4},
    )
    z1, z3 = ok(out["z1"]), ok(out["z3"])
    for step, loss in z1["losses"].items():
        assert z3["losses"][step] == pytest.approx(loss, rel=1e-6, abs=0), step
    ck = tmp_path / "z3" / "step=4.ckpt"
    m = read_manifest(ck)
    assert (m.topology.tp, m.topology.dp, m.topology.zero_stage) == (2, 1, 3)
    tp1 = {**base, "stage": 3, "parallel": {"tp": 1}, "resume": str(ck)}
    resumed = ok(run(tmp_path, tp1=tp1)["tp1"])
    assert resumed["resume"]["reshaped"] and resumed["resume"]["saved"] == [2, 1, 1]
    assert_continues(resumed, z3, exact=False)


def test_impossible_layout_says_what_to_set(tmp_path: Path) -> None:
    """Layout and ckpt_path are checked before Lightning starts rank 1: one message, once."""
    plain = tmp_path / "plain.ckpt"  # a Lightning checkpoint saved without DeepSpeed
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.5.0"}, plain)
    base = {"devices": 2, "steps": 2}
    out = run(
        tmp_path,
        bad={**base, "parallel": {"tp": 3}},
        missing={**base, "resume": str(tmp_path / "nowhere.ckpt")},
        plain={**base, "resume": str(plain)},
    )
    rc, log = out["bad"]
    assert rc != 0
    assert "world size 2 is not divisible by tp*cp*pp = 3*1*1 = 3" in log
    assert "change tp, cp or pp" in log
    assert log.count("is not divisible by") == 1  # not once per rank
    assert "num_nodes=1 x devices=2" in log
    rc, log = out["missing"]
    assert rc != 0 and log.count("nowhere.ckpt: no such file or directory") == 1
    rc, log = out["plain"]
    assert rc != 0 and log.count("is a plain Lightning checkpoint") == 1


def test_excluded_frozen_tied_resume(tmp_path: Path) -> None:
    """Saved with ``exclude_frozen_parameters=True`` and a frozen weight tied to another (as
    GPT-2's frozen embedding and head): dp 2 -> 1 at ZeRO 2 through Trainer.fit(ckpt_path=...)
    continues like the run that never stopped."""
    base = {"steps": 6, "ckpt_every": 4, "global_batch": 8, "stage": 2, "frozen_tied": True}
    ref = ok(run(tmp_path, dp2={**base, "devices": 2, "ckpt_dir": str(tmp_path / "dp2")})["dp2"])
    ck = tmp_path / "dp2" / "step=4.ckpt"
    sd = torch.load(ck / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False)
    assert "inp.weight" not in sd["module"] and "mix.weight" in sd["module"]
    assert sd["frozen_param_shapes"] is None
    down = ok(run(tmp_path, down={**base, "devices": 1, "resume": str(ck)})["down"])
    assert down["resume"]["reshaped"] and down["resume"]["saved"] == [1, 1, 2]
    assert_continues(down, ref, exact=False)
