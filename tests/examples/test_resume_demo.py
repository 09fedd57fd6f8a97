"""The README's main job end to end: train at tp=2, resume at dp=2 with auto-reshape."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "examples" / "resume_demo.py"


def test_resume_demo_reshapes_and_the_loss_carries_on(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(DEMO), "--workdir", str(tmp_path), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "saved at tp=2 pp=1 dp=1 (ZeRO 1), resuming at tp=1 pp=1 dp=2" in out.stdout
    assert "checkpoint reshaped: True" in out.stdout
    # a readable resume line, not a dataclass repr
    assert "ResumeReport(" not in out.stdout
    assert f"resumed {tmp_path / 'tp2.ckpt'} saved at tp=2 pp=1 dp=1 (ZeRO 1) at " in out.stdout
    assert "loss carried on" in out.stdout
    # The original checkpoint is untouched; loaded directly, no reshaped copy beside it.
    ckpt = tmp_path / "tp2.ckpt"
    assert (ckpt / "checkpoint" / "mp_rank_01_model_states.pt").exists()
    assert "loaded directly in" in out.stdout
    assert not list(ckpt.glob("reshaped-*"))


def test_demo_removes_its_temporary_folder_only_when_it_succeeds(tmp_path: Path) -> None:
    """Without --workdir: a failed demo keeps its folder and prints where (its logs are there);
    a successful one leaves nothing in the temporary directory."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, str(DEMO), "--first", "no_such_preset", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode != 0
    (kept,) = tmp_path.glob("lightning-reshape-demo-*")
    assert f"kept the demo's folder for its logs: {kept}" in out.stderr
    assert (kept / "first.log").is_file()

    spec = importlib.util.spec_from_file_location("resume_demo", DEMO)
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    tempfile.tempdir = str(tmp_path / "ok")
    try:
        (tmp_path / "ok").mkdir()
        with demo.workdir_for(None) as work:
            (work / "first.log").write_text("done")
        assert not work.exists() and not list((tmp_path / "ok").iterdir())
        with demo.workdir_for(tmp_path / "given") as work:
            (work / "first.log").write_text("done")
        assert (tmp_path / "given" / "first.log").is_file()  # a folder the user named stays
    finally:
        tempfile.tempdir = None


TRAIN = DEMO.with_name("train.py")


def test_registered_strategy_name_works_as_the_trainer_flag(tmp_path: Path) -> None:
    """``trainer.strategy=deepspeed_reshape`` (the registered name) from the command line."""
    out = subprocess.run(
        [sys.executable, str(TRAIN), "trainer.strategy=deepspeed_reshape", "trainer.max_steps=2",
         "model.log_every_n_steps=1", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "lightning-reshape: layout world 2: dp=2\n" in log  # only the axes above 1
    assert "step    2  loss" in log


def test_pipeline_example_tp2_pp2_resumes_at_pp1(tmp_path: Path) -> None:
    """The README's pipeline commands: tp 2 x pp 2 on 4 CPU processes, resumed at dp 4."""
    common = ["model=pipeline_gpt", "trainer.devices=4", "strategy.micro_batches=2"]
    runs = [
        ["parallel=tp2_pp2", "trainer.max_steps=4", f"save_path={tmp_path / 'p.ckpt'}"],
        ["parallel=dp_only", "trainer.max_steps=6", f"ckpt_path={tmp_path / 'p.ckpt'}"],
    ]
    logs = []
    for i, extra in enumerate(runs):
        out = subprocess.run(
            [sys.executable, str(TRAIN), *common, *extra, "model.log_every_n_steps=2",
             f"hydra.run.dir={tmp_path / f'run{i}'}"],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )  # fmt: skip
        logs.append(out.stdout + out.stderr)
        assert out.returncode == 0, logs[-1][-3000:]
    assert "layout world 4: tp=2 pp=2 " in logs[0] and "step    4  loss" in logs[0]
    assert (
        "saved at tp=2 pp=2 dp=1 (ZeRO 1), resuming at tp=1 pp=1 dp=4: loaded directly" in logs[1]
    )
    assert "step    6  loss" in logs[1]
