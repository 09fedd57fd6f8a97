"""DeepSpeed's pipeline engine inside Trainer.fit, and resume across pipeline degrees.

Real Trainer runs on CPU (gloo, real PipelineEngines) of ``pipe_models.PipeNet``: 9 layers of
which 5 hold parameters (tensor-parallel blocks among them), parameter-free modules and a plain
function, so stages are uneven and some layer files are empty. Data is drawn from the global
step, so every run sees the same global batches whatever its layout.

What is checked: each run trains and saves (ModelCheckpoint every 4 steps, pipeline layer
files, our sidecar); a resume at another (tp, pp, dp) restores every parameter's fp32 value and
Adam states bit for bit (dumped from the live engines at the save and right after the resume,
all stages gathered); the next losses are within 1e-6 relative of the run that never stopped
(another dp or tp only reorders floating-point sums); LR scheduler, step counter and validation
carry on. Runs of one launch start together; 4-process runs are the slow part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.lightning.test_trainer import ok, run

BASE: dict[str, Any] = {"model": "pipe", "global_batch": 8, "micro_batches": 2, "clip": 1.0}
TIED: dict[str, Any] = {**BASE, "model": "tied_gpt"}


def _states_equal(a: Path, b: Path) -> list[str]:
    """Names whose fp32 value or optimizer state differ between two dumps (bit for bit)."""
    x, y = torch.load(a), torch.load(b)
    if sorted(x) != sorted(y):
        return [f"names {sorted(x)} vs {sorted(y)}"]
    return [f"{n}.{k}" for n in x for k in x[n] if not torch.equal(x[n][k], y[n][k])]


def _close(resumed: dict[str, Any], reference: dict[str, Any], steps: list[int]) -> None:
    got = {int(k): v for k, v in resumed["losses"].items()}
    assert sorted(got) == steps, sorted(got)
    for step in steps:
        want = reference["losses"][str(step)]
        assert got[step] == pytest.approx(want, rel=1e-6, abs=0), step


@pytest.fixture(scope="module")
def pp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """pp 2 (2 processes, 8 steps: the run that never stopped), pp 2 x dp 2 (4 processes) and a
    tied GPT at pp 2 train and save; then resumes at pp 1 x dp 2, pp 2 x dp 1, pp 1 x dp 4
    (tied: pp 1 x dp 2); then back to pp 2 from the pp 1 x dp 2 saves, plus an unchanged pp 2
    resume. Three launches."""
    tmp = tmp_path_factory.mktemp("pipe")
    first = run(
        tmp,
        pp2={
            **BASE,
            "devices": 2,
            "parallel": {"pp": 2},
            "steps": 8,
            "ckpt_dir": str(tmp / "pp2"),
            "dump_step": 4,
            "val_every": 3,
        },
        pp2dp2={
            **BASE,
            "devices": 4,
            "parallel": {"pp": 2},
            "steps": 6,
            "ckpt_dir": str(tmp / "pp2dp2"),
            "dump_step": 4,
        },
        tied_pp2={
            **TIED,
            "devices": 2,
            "parallel": {"pp": 2},
            "steps": 8,
            "ckpt_dir": str(tmp / "tied"),
            "dump_step": 4,
        },
    )
    src2, src4 = tmp / "pp2" / "step=4.ckpt", tmp / "pp2dp2" / "step=4.ckpt"
    second = run(
        tmp,
        pp1dp2={
            **BASE,
            "devices": 2,
            "parallel": {"pp": 1},
            "steps": 6,
            "resume": str(src4),
            "save": str(tmp / "pp1dp2-step6.ckpt"),
            "dump_step": 6,
            "policy": {"direct": False},  # with pp2dp1: two copies of src4 at once
        },
        pp2dp1={
            **BASE,
            "devices": 2,
            "parallel": {"pp": 2},
            "steps": 6,
            "resume": str(src4),
            "policy": {"direct": False},
        },
        pp1dp4={**BASE, "devices": 4, "parallel": {"pp": 1}, "steps": 6, "resume": str(src2)},
        tied_pp1dp2={
            **TIED,
            "devices": 2,
            "parallel": {"pp": 1},
            "steps": 6,
            "resume": str(tmp / "tied" / "step=4.ckpt"),
            "save": str(tmp / "tied-pp1dp2-step6.ckpt"),
            "dump_step": 6,
        },
    )
    third = run(
        tmp,
        back={
            **BASE,
            "devices": 2,
            "parallel": {"pp": 2},
            "steps": 8,
            "resume": str(tmp / "pp1dp2-step6.ckpt"),
        },
        same={
            **BASE,
            "devices": 2,
            "parallel": {"pp": 2},
            "steps": 6,
            "resume": str(src2),
            "forbid_reshape": True,
        },
        tied_back={
            **TIED,
            "devices": 2,
            "parallel": {"pp": 2},
            "steps": 8,
            "resume": str(tmp / "tied-pp1dp2-step6.ckpt"),
        },
    )
    return {"tmp": tmp, **first, **second, **third}


def test_pipeline_trains_and_saves(pp_runs: dict[str, Any]) -> None:
    """pp 2 at dp 1 and dp 2 train through Trainer.fit: same losses, stages split unevenly by
    parameters, layer files for every module (the parameter-free ones too), no file for the
    function, validation and the LR scheduler ran, sidecar records the pipeline."""
    pp2, pp2dp2 = ok(pp_runs["pp2"]), ok(pp_runs["pp2dp2"])
    assert pp2["global_step"] == 8 and pp2dp2["global_step"] == 6
    assert pp2["parts"] == [0, 3, 9]
    assert pp2dp2["sampler"] == {"num_replicas": 2, "rank": 0}
    for step in range(6):
        a, b = pp2["losses"][str(step)], pp2dp2["losses"][str(step)]
        assert a == pytest.approx(b, rel=1e-6, abs=0), step
    assert pp2["losses"]["7"] < pp2["losses"]["0"]
    assert pp2["logged_loss"] == pytest.approx(pp2["losses"]["7"])  # self.log each step
    assert pp2["clip"] == 1.0  # Trainer(gradient_clip_val) reaches the pipeline engine
    assert pp2["micro_batches"] == pp2dp2["micro_batches"] == 2
    assert [s for s, _ in pp2["val_losses"]] == [3, 6]
    assert pp2["lr"] == [pytest.approx(1e-2 * 0.5 ** (8 // 3))]  # StepLR(3, 0.5), Lightning's
    tag = pp_runs["tmp"] / "pp2dp2" / "step=4.ckpt" / "checkpoint"
    layers = sorted(p.name for p in tag.glob("layer_*"))
    assert layers == [f"layer_{i:02d}-model_00-model_states.pt" for i in (0, 1, 2, 3, 5, 6, 7, 8)]
    assert torch.load(tag / "layer_02-model_00-model_states.pt") == {}  # nn.GELU
    sidecar = json.loads((tag / "lightning_reshape.json").read_text())
    assert sidecar["topology"] == {"tp": 1, "pp": 2, "dp": 2}
    assert sidecar["extra"]["pipeline"]["num_layers"] == 9
    assert "6.fc.weight" in sidecar["tp_splits"]  # every stage's parameters


@pytest.mark.parametrize(
    ("name", "source", "saved"),
    [
        ("pp1dp2", "pp2dp2", [1, 2, 2]),
        ("pp2dp1", "pp2dp2", [1, 2, 2]),
        ("pp1dp4", "pp2", [1, 2, 1]),
    ],
)
def test_resume_at_other_pp(pp_runs: dict[str, Any], name: str, source: str, saved: list) -> None:
    """State bit-exact at the resume, next losses as the run that never stopped."""
    resumed = ok(pp_runs[name])
    assert resumed["resume"]["reshaped"] and resumed["resume"]["saved"] == saved
    tmp = pp_runs["tmp"]
    assert _states_equal(tmp / f"{source}.json.state4.pt", tmp / f"{name}.json.statestart.pt") == []
    _close(resumed, ok(pp_runs["pp2"]), [4, 5])
    assert resumed["global_step"] == 6
    assert resumed["lr"] == pytest.approx(ok(pp_runs["pp2dp2"])["lr"])


def test_resume_back_to_pp2(pp_runs: dict[str, Any]) -> None:
    """pp 2 -> pp 1 x dp 2 -> (save at step 6) -> pp 2 again; and an unchanged resume does no
    reshape work and continues exactly."""
    back, tmp = ok(pp_runs["back"]), pp_runs["tmp"]
    assert back["resume"]["reshaped"] and back["resume"]["saved"] == [1, 1, 2]
    assert _states_equal(tmp / "pp1dp2.json.state6.pt", tmp / "back.json.statestart.pt") == []
    _close(back, ok(pp_runs["pp2"]), [6, 7])
    same = ok(pp_runs["same"])
    assert not same["resume"]["reshaped"]
    assert same["losses"] == {k: ok(pp_runs["pp2"])["losses"][k] for k in ("4", "5")}


def test_tp2_pp2_resumes_at_tp1(tmp_path: Path) -> None:
    """tp 2 x pp 2 (tensor-parallel blocks inside the stages) resumed at tp 1 x pp 2 x dp 2 and
    at tp 1 x pp 1 x dp 4; the reference is a tp 1 x pp 2 run of the same model."""
    spec = {**BASE, "devices": 4, "steps": 6}
    first = run(
        tmp_path,
        tp2pp2={
            **spec,
            "parallel": {"tp": 2, "pp": 2},
            "ckpt_dir": str(tmp_path / "tp2pp2"),
            "dump_step": 4,
        },
        ref={**spec, "devices": 2, "parallel": {"pp": 2}},
    )
    tp2pp2, ref = ok(first["tp2pp2"]), ok(first["ref"])
    for step in range(4):
        assert tp2pp2["losses"][str(step)] == pytest.approx(ref["losses"][str(step)], rel=1e-6)
    src = tmp_path / "tp2pp2" / "step=4.ckpt"
    assert (src / "checkpoint" / "layer_01-model_01-model_states.pt").is_file()
    second = run(
        tmp_path,
        tp1pp2dp2={**spec, "parallel": {"tp": 1, "pp": 2}, "resume": str(src)},
        tp1pp1dp4={**spec, "parallel": {"tp": 1, "pp": 1}, "resume": str(src)},
    )
    for name in ("tp1pp2dp2", "tp1pp1dp4"):
        resumed = ok(second[name])
        assert resumed["resume"]["saved"] == [2, 2, 1], name
        dumped = (tmp_path / "tp2pp2.json.state4.pt", tmp_path / f"{name}.json.statestart.pt")
        assert _states_equal(*dumped) == [], name
        _close(resumed, ref, [4, 5])


def test_tied_gpt_across_pp(pp_runs: dict[str, Any]) -> None:
    """Embedding and head tied by TiedLayerSpec on the first and last stage: pp 2 -> pp 1 x
    dp 2 -> pp 2, bit-exact at each resume, losses as the run that never stopped."""
    ref, down, back = (ok(pp_runs[k]) for k in ("tied_pp2", "tied_pp1dp2", "tied_back"))
    tmp = pp_runs["tmp"]
    tag = tmp / "tied" / "step=4.ckpt" / "checkpoint"
    record = json.loads((tag / "lightning_reshape.json").read_text())["extra"]["pipeline"]
    assert record["ties"] == {"embed": {"layers": [0, 4], "module_layers": [0]}}
    for saved, resumed in (("tied_pp2", "state4"), ("tied_pp1dp2", "state6")):
        later = "tied_pp1dp2" if saved == "tied_pp2" else "tied_back"
        dumps = (tmp / f"{saved}.json.{resumed}.pt", tmp / f"{later}.json.statestart.pt")
        assert _states_equal(*dumps) == [], later
    _close(down, ref, [4, 5])
    _close(back, ref, [6, 7])
