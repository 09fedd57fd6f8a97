"""Benchmark ``Trainer.fit(ckpt_path=...)`` to the first training step: with and without a change.

Why: the promise is that resuming at another layout costs about what resuming at the same one
does. Writes (once, cached in --workdir) ~1.3 GB ZeRO-1 AdamW fp32 checkpoints at dp 1 and
dp 2 with ``ReshapeDeepSpeedStrategy`` (an ~85M-parameter MLP), then times, each in fresh processes
(2 ranks, CPU, gloo), the wall time from ``Trainer.fit`` to the first ``training_step``:

- resume at the saved dp (no change: plain DeepSpeed load), at dp 1 and at dp 2;
- resume at the other dp (change: the strategy writes a reshaped copy, DeepSpeed loads it);
- the same change with ``AutoReshape(direct=True)`` (each rank fills its ZeRO partitions straight
  from the slices of the source it owns; no copy written);
- DeepSpeed's own path for the same change: ``ds_to_universal`` (timed as a process) plus a
  ``load_universal`` resume at dp 1;
- the pipeline engine (the same layers as a ``PipelineLightningModule``, 2 ranks): pp 2 -> pp 1
  x dp 2 and pp 1 x dp 2 -> pp 2, each beside the unchanged resume at its target layout.

    python benchmarks/lightning_resume.py [--workdir /tmp/lightning_reshape_bench_lightning]
                                          [--rows dp,pp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HIDDEN = 3072
LAYERS = 9  # 9 x (3072 x 3072 + 3072) = 84.9M parameters


def _worker(spec: dict[str, Any]) -> None:
    """One Trainer run (Lightning re-runs this for rank 1); rank 0 writes timings to out."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from lightning_reshape.lightning import (
        AutoReshape,
        PipelineLayers,
        PipelineLightningModule,
        ReshapeDeepSpeedStrategy,
        pipeline_step,
    )

    class Plain(ReshapeDeepSpeedStrategy):
        """DeepSpeed's own load (Lightning's DeepSpeedStrategy behaviour, on CPU)."""

        def load_checkpoint(self, checkpoint_path: Any, weights_only: Any = None) -> Any:
            t0 = time.perf_counter()
            _, client = self.deepspeed_engine.load_checkpoint(
                os.fspath(checkpoint_path), load_lr_scheduler_states=False
            )
            self.load_seconds = time.perf_counter() - t0
            return client

    class Timed(ReshapeDeepSpeedStrategy):
        def load_checkpoint(self, checkpoint_path: Any, weights_only: Any = None) -> Any:
            t0 = time.perf_counter()
            client = super().load_checkpoint(checkpoint_path, weights_only)
            self.load_seconds = time.perf_counter() - t0
            return client

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(
                *[torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS)]
            )
            self.first_step_at: float | None = None

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.first_step_at is None:
                self.first_step_at = time.perf_counter()
            return self.net(batch).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class PipeMLP(PipelineLightningModule):
        """The same layers as a pipeline (DeepSpeed's PipelineEngine at any pp)."""

        def __init__(self) -> None:
            super().__init__()
            self.first_step_at: float | None = None

        def configure_pipeline(self) -> PipelineLayers:
            torch.manual_seed(0)
            layers = [torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS)]
            return PipelineLayers(layers, _square_loss, split_batch=_self_pair)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.first_step_at is None:
                self.first_step_at = time.perf_counter()
            return pipeline_step(self, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    config: dict[str, Any] = {
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": 2,
    }
    if spec.get("universal"):
        config["checkpoint"] = {"load_universal": True}
    cls = Plain if spec.get("plain") else Timed
    pipe = spec.get("pp") is not None
    strategy = cls(config=config, parallel={"pp": int(spec["pp"])} if pipe else None)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=int(spec["devices"]),
        strategy=strategy,
        max_steps=int(spec["steps"]),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[AutoReshape(direct=True)] if spec.get("direct") else None,
    )
    module: Any = PipeMLP() if pipe else MLP()
    loader = DataLoader(torch.randn(64, HIDDEN), batch_size=2)
    start = time.perf_counter()
    trainer.fit(module, loader, ckpt_path=spec.get("resume"))
    if spec.get("save"):
        trainer.save_checkpoint(spec["save"])
    if trainer.is_global_zero and spec.get("out"):
        assert module.first_step_at is not None
        report = getattr(strategy, "last_resume", None)
        result = {
            "fit_to_first_step": module.first_step_at - start,
            "load_checkpoint": getattr(strategy, "load_seconds", None),
            "reshape": None if report is None or not report.reshaped else report.seconds,
        }
        Path(spec["out"]).write_text(json.dumps(result))


def _square_loss(out: Any, labels: Any) -> Any:
    return out.pow(2).mean()


def _self_pair(batch: Any) -> tuple[Any, Any]:
    return batch, batch


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(spec: dict[str, Any]) -> float:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port())}
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "worker", json.dumps(spec)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/lightning_reshape_bench_lightning")
    parser.add_argument(
        "--rows",
        default="dp,pp",
        help="which changes to time: dp (ZeRO dp changes, direct, universal), pp (pipeline "
        "engine pp 2 <-> 1 on 2 ranks), or both",
    )
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    kinds = {k.strip() for k in args.rows.split(",")}
    if not kinds <= {"dp", "pp"}:
        parser.error(f"--rows {args.rows!r}: choose dp, pp or dp,pp")
    if "dp" in kinds:
        _dp_rows(work)
    if "pp" in kinds:
        _pp_rows(work)


def _timed(work: Path, rows: list, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    out = work / f"{name.replace(' ', '_').replace('>', '')}.json"
    wall = _run({**spec, "steps": 2, "out": str(out)})
    result = json.loads(out.read_text())
    rows.append((name, wall, result))
    return result


def _pp_rows(work: Path) -> None:
    """Pipeline engine on 2 ranks: pp 2 x dp 1 <-> pp 1 x dp 2, beside the unchanged resumes."""
    ckpts = {pp: work / f"pp{pp}.ckpt" for pp in (1, 2)}
    for pp, ckpt in ckpts.items():
        if not (ckpt / "latest").is_file():
            shutil.rmtree(ckpt, ignore_errors=True)
            _run({"devices": 2, "pp": pp, "steps": 1, "save": str(ckpt)})
        for old in ckpt.glob("reshaped-*"):
            shutil.rmtree(old)
        size = _size(ckpt / "checkpoint")
        print(f"checkpoint {ckpt}: {size / 1e9:.2f} GB, pipeline engine, ZeRO 1, pp {pp}")
    rows: list[tuple[str, float, dict[str, Any]]] = []
    same2 = _timed(
        work, rows, "pp 2 -> pp 2 (no change)", {"devices": 2, "pp": 2, "resume": str(ckpts[2])}
    )
    down = _timed(
        work, rows, "pp 2 -> pp 1 dp 2 (reshape)", {"devices": 2, "pp": 1, "resume": str(ckpts[2])}
    )
    same1 = _timed(
        work, rows, "pp 1 -> pp 1 (no change)", {"devices": 2, "pp": 1, "resume": str(ckpts[1])}
    )
    up = _timed(
        work, rows, "pp 1 dp 2 -> pp 2 (reshape)", {"devices": 2, "pp": 2, "resume": str(ckpts[1])}
    )
    print(f"{'run':<34} {'fit->1st step s':>16} {'load s':>8} {'process s':>10}")
    for name, wall, r in rows:
        load = r["load_checkpoint"]
        print(f"{name:<34} {r['fit_to_first_step']:>16.2f} {load or 0:>8.2f} {wall:>10.2f}")
    for name, r, base in (("pp 2 -> 1", down, same1), ("pp 1 -> 2", up, same2)):
        print(
            f"{name}: fit->first step {r['fit_to_first_step'] / base['fit_to_first_step']:.2f}x "
            f"the unchanged resume at the target layout (target <= 1.5x); load_checkpoint "
            f"{r['load_checkpoint'] / base['load_checkpoint']:.2f}x (reshape {r['reshape']:.2f} s)"
        )


def _dp_rows(work: Path) -> None:
    """ZeRO-1 dp changes (copy, direct) and DeepSpeed's universal path."""
    ckpts = {dp: work / f"dp{dp}.ckpt" for dp in (1, 2)}
    for dp, ckpt in ckpts.items():
        if not (ckpt / "latest").is_file():
            shutil.rmtree(ckpt, ignore_errors=True)
            _run({"devices": dp, "steps": 1, "save": str(ckpt)})
        for old in ckpt.glob("reshaped-*"):
            shutil.rmtree(old)
        size = _size(ckpt / "checkpoint")
        print(
            f"checkpoint {ckpt}: {size / 1e9:.2f} GB, ZeRO 1, dp {dp}, "
            f"{LAYERS * (HIDDEN + 1) * HIDDEN / 1e6:.1f}M parameters"
        )
    ckpt = ckpts[2]

    rows: list[tuple[str, float, dict[str, Any]]] = []

    def timed(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        out = work / f"{name.replace(' ', '_')}.json"
        wall = _run({**spec, "steps": 2, "out": str(out)})
        result = json.loads(out.read_text())
        rows.append((name, wall, result))
        return result

    same2 = timed("dp 2 -> dp 2 (no change)", {"devices": 2, "resume": str(ckpts[2])})
    up = timed("dp 1 -> dp 2 (reshape)", {"devices": 2, "resume": str(ckpts[1])})
    same1 = timed("dp 1 -> dp 1 (no change)", {"devices": 1, "resume": str(ckpts[1])})
    down = timed("dp 2 -> dp 1 (reshape)", {"devices": 1, "resume": str(ckpts[2])})
    up_direct = timed(
        "dp 1 -> dp 2 (direct)", {"devices": 2, "resume": str(ckpts[1]), "direct": True}
    )
    down_direct = timed(
        "dp 2 -> dp 1 (direct)", {"devices": 1, "resume": str(ckpts[2]), "direct": True}
    )
    uni = work / "universal"
    shutil.rmtree(uni, ignore_errors=True)
    uni.mkdir()
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(ckpt / "checkpoint"),
            "--output_folder",
            str(uni / "checkpoint"),
            "--inject_missing_state",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    to_universal = time.perf_counter() - t0
    (uni / "latest_universal").write_text("checkpoint")
    universal = timed(
        "dp 2 -> dp 1 (load_universal)",
        {"devices": 1, "resume": str(uni), "plain": True, "universal": True},
    )

    print(f"{'run':<34} {'fit->1st step s':>16} {'load s':>8} {'process s':>10}")
    for name, wall, r in rows:
        load = r["load_checkpoint"]
        print(f"{name:<34} {r['fit_to_first_step']:>16.2f} {load or 0:>8.2f} {wall:>10.2f}")
    print(f"{'ds_to_universal (offline)':<34} {'':>16} {'':>8} {to_universal:>10.2f}")
    for name, r, base in (
        ("dp 1 -> 2", up, same2),
        ("dp 2 -> 1", down, same1),
        ("dp 1 -> 2 direct", up_direct, same2),
        ("dp 2 -> 1 direct", down_direct, same1),
    ):
        print(
            f"{name}: fit->first step {r['fit_to_first_step'] / base['fit_to_first_step']:.2f}x "
            f"the unchanged resume (target <= 1.5x); load_checkpoint "
            f"{r['load_checkpoint'] / base['load_checkpoint']:.2f}x (reshape {r['reshape']:.2f} s)"
        )
    print(
        "dp 2 -> 1, DeepSpeed universal (ds_to_universal + fit->first step): "
        f"{(universal['fit_to_first_step'] + to_universal) / same1['fit_to_first_step']:.2f}x"
    )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        _worker(json.loads(sys.argv[2]))
    else:
        main()
