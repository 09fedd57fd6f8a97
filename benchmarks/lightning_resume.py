"""Benchmark ``Trainer.fit(ckpt_path=...)`` to the first training step: with and without a change.

Why: the promise is that resuming at another layout costs about what resuming at the same one
does (target: <= 1.1x). Writes (once, cached in --workdir) ~1.4 GB AdamW fp32 checkpoints with
``ReshapeDeepSpeedStrategy`` (an ~85M-parameter MLP: plain, tensor-parallel, or as pipeline
layers), then times, each in fresh processes (CPU, gloo), the wall time from ``Trainer.fit`` to
the first ``training_step`` of each change beside the unchanged resume at its target layout:

- dp 2 -> 1 and dp 1 -> 2 (ZeRO 2), tp 2 -> (tp 1, dp 2) (ZeRO 1), ZeRO 2 -> 3 (dp 2),
  pp 2 -> 1 (pipeline engine, pp 1 x dp 2); every change loads directly (the default: no copy
  written), and the table says whether any reshaped copy is on disk afterwards;
- ``--with-copy``: the same changes through the copy path (``AutoReshape(direct=False)``);
- ``--universal``: DeepSpeed's own path for dp 2 -> 1 (``ds_to_universal`` + ``load_universal``).

The direct rows also split their load: planning, building the target state dicts from the
source (the engine sink, reading included) and the rest (DeepSpeed's own load).

    python benchmarks/lightning_resume.py [--workdir /tmp/lightning_reshape_bench_lightning]
                                          [--rows dp,tp,zero,pp] [--with-copy] [--universal]
                                          [--repeat 3]

Each timing is the median of ``--repeat`` runs, the unchanged and changed resumes interleaved
(a slow spell of a shared machine hits both); each row prints PASS or MISS against the target.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HIDDEN = int(os.environ.get("LIGHTNING_RESHAPE_BENCH_HIDDEN", "3072"))  # smaller: a smoke run
LAYERS = 9  # 9 x (3072 x 3072 + 3072) = 84.9M parameters
TARGET = 1.1  # the target: a change costs at most 1.1x the unchanged resume


def _worker(spec: dict[str, Any]) -> None:
    """One Trainer run (Lightning re-runs this for rank 1); rank 0 writes timings to out."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    import lightning_reshape.checkpoint.direct as direct
    from lightning_reshape.lightning import (
        AutoReshape,
        PipelineLayers,
        PipelineLightningModule,
        ReshapeDeepSpeedStrategy,
        pipeline_step,
    )
    from lightning_reshape.nn import ColumnParallelLinear, RowParallelLinear

    sink_seconds = [0.0]
    materialize = direct.materialize

    def timed_materialize(*args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return materialize(*args)
        finally:
            sink_seconds[0] += time.perf_counter() - t0

    direct.materialize = timed_materialize

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
        plan_seconds = 0.0

        def load_checkpoint(self, checkpoint_path: Any, weights_only: Any = None) -> Any:
            t0 = time.perf_counter()
            client = super().load_checkpoint(checkpoint_path, weights_only)
            self.load_seconds = time.perf_counter() - t0
            return client

        def _rank_plan(self, *args: Any, **kwargs: Any) -> Any:  # the direct path's planning
            t0 = time.perf_counter()
            plan = super()._rank_plan(*args, **kwargs)
            self.plan_seconds = time.perf_counter() - t0
            return plan

    class MLP(pl.LightningModule):
        """Plain layers, or with ``tp`` column- and row-parallel ones (the same shapes)."""

        def __init__(self, tp: bool) -> None:
            super().__init__()
            self.tp = tp
            self.net: torch.nn.Module | None = None
            self.first_step_at: float | None = None

        def configure_model(self) -> None:
            if self.net is not None:
                return
            torch.manual_seed(0)
            if not self.tp:
                layers = [torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS)]
            else:
                group = self.trainer.strategy.parallel_state
                layers = [
                    RowParallelLinear(HIDDEN, HIDDEN, group)
                    if i % 2
                    else ColumnParallelLinear(HIDDEN, HIDDEN, group, gather_output=i == LAYERS - 1)
                    for i in range(LAYERS)
                ]
            self.net = torch.nn.Sequential(*layers)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.first_step_at is None:
                self.first_step_at = time.perf_counter()
            assert self.net is not None
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
        "zero_optimization": {"stage": int(spec.get("stage", 1))},
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": 2,
    }
    if spec.get("universal"):
        config["checkpoint"] = {"load_universal": True}
    cls = Plain if spec.get("plain") else Timed
    pipe = spec.get("pp") is not None
    parallel = {"pp": int(spec["pp"])} if pipe else {"tp": int(spec.get("tp") or 1)}
    strategy = cls(config=config, parallel=parallel)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=int(spec["devices"]),
        strategy=strategy,
        max_steps=int(spec["steps"]),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[AutoReshape(direct=not spec.get("copy"))],
    )
    module: Any = PipeMLP() if pipe else MLP(spec.get("tp") is not None)
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
            "plan": getattr(strategy, "plan_seconds", None),
            "sink": sink_seconds[0],
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


def _run(spec: dict[str, Any], log: Path) -> float:
    """Wall seconds of one worker run; its output goes to ``log``. A failed run is shown (the
    log's tail) and tried once more: a 2-rank gloo start on a shared machine can abort."""
    for attempt in (1, 2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port())}
        t0 = time.perf_counter()
        with open(log, "w") as out:
            cmd = [sys.executable, __file__, "worker", json.dumps(spec)]
            code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        if code == 0:
            return time.perf_counter() - t0
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        print(f"  worker failed (exit {code}, attempt {attempt} of 2); the end of {log}:\n{tail}")
    raise SystemExit(f"a worker failed twice; see {log}")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


#: checkpoint name -> how it is trained (devices, layout, stage); each saved once, cached
CHECKPOINTS: dict[str, dict[str, Any]] = {
    "dp1": {"devices": 1, "stage": 2},
    "dp2": {"devices": 2, "stage": 2},
    "z3dp2": {"devices": 2, "stage": 3},
    "tp2": {"devices": 2, "stage": 1, "tp": 2},
    "tp1dp2": {"devices": 2, "stage": 1, "tp": 1},
    "pp2": {"devices": 2, "stage": 1, "pp": 2},
    "pp1dp2": {"devices": 2, "stage": 1, "pp": 1},
}

#: row -> (source checkpoint, the run's layout, the unchanged resume's checkpoint at that layout)
ROWS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "dp 2 -> 1": ("dp", "dp2", {"devices": 1, "stage": 2}, "dp1"),
    "dp 1 -> 2": ("dp", "dp1", {"devices": 2, "stage": 2}, "dp2"),
    "tp 2 -> (tp 1, dp 2)": ("tp", "tp2", {"devices": 2, "stage": 1, "tp": 1}, "tp1dp2"),
    "ZeRO 2 -> 3": ("zero", "dp2", {"devices": 2, "stage": 3}, "z3dp2"),
    "pp 2 -> 1": ("pp", "pp2", {"devices": 2, "stage": 1, "pp": 1}, "pp1dp2"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/lightning_reshape_bench_lightning")
    parser.add_argument(
        "--rows",
        default="dp,tp,zero,pp",
        help="which changes to time: dp (2 -> 1, 1 -> 2), tp, zero (ZeRO 2 -> 3), pp",
    )
    parser.add_argument("--with-copy", action="store_true", help="also time the copy path")
    parser.add_argument("--universal", action="store_true", help="also time ds_to_universal")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each (unchanged and changed interleaved); the table gives medians",
    )
    args = parser.parse_args()
    kinds = {k.strip() for k in args.rows.split(",")}
    if not kinds <= {"dp", "tp", "zero", "pp"}:
        parser.error(f"--rows {args.rows!r}: choose from dp, tp, zero, pp")
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: give at least 1")
    work = Path(args.workdir)  # made once the arguments are known good: no folder left behind
    work.mkdir(parents=True, exist_ok=True)
    rows = {name: row for name, row in ROWS.items() if row[0] in kinds}
    print(f"load average before: {os.getloadavg()[0]:.1f} (1-minute; the machine is shared)")
    needed = {row[1] for row in rows.values()} | {row[3] for row in rows.values()}
    for name in sorted(needed):
        _checkpoint(work, name)
    table: list[tuple[str, str, float, dict[str, Any], bool]] = []
    hows = ("direct", "copy") if args.with_copy else ("direct",)
    for name, (_, src, layout, same) in rows.items():
        runs: dict[str, list[dict[str, Any]]] = {how: [] for how in ("no change", *hows)}
        copy_left = dict.fromkeys(hows, False)
        for _ in range(args.repeat):  # interleaved: a slow spell of a shared machine hits both
            spec = {**layout, "resume": str(work / same)}
            runs["no change"].append(_timed(work, f"{name} unchanged", spec))
            for how in hows:
                spec = {**layout, "resume": str(work / src), "copy": how == "copy"}
                runs[how].append(_timed(work, f"{name} {how}", spec))
                copy_left[how] |= bool(list((work / src).glob("reshaped-*")))
                for old in (work / src).glob("reshaped-*"):
                    shutil.rmtree(old)
        base = _median(runs["no change"])
        table.append((name, "no change", 0.0, base, False))
        for how in hows:
            r = _median(runs[how])
            ratio = r["fit_to_first_step"] / base["fit_to_first_step"]
            table.append((name, how, ratio, r, copy_left[how]))
    _print(table, args.repeat)
    if args.universal:
        _universal(work)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def _checkpoint(work: Path, name: str) -> None:
    ckpt = work / name
    if not (ckpt / "latest").is_file():
        shutil.rmtree(ckpt, ignore_errors=True)
        _run({**CHECKPOINTS[name], "steps": 1, "save": str(ckpt)}, work / f"{name}.log")
    for old in ckpt.glob("reshaped-*"):
        shutil.rmtree(old)
    print(f"checkpoint {name}: {_size(ckpt / 'checkpoint') / 1e9:.2f} GB, {CHECKPOINTS[name]}")


def _timed(work: Path, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    out = work / f"{name.replace(' ', '_').replace('>', '').replace('(', '').replace(')', '')}.json"
    out.unlink(missing_ok=True)
    wall = _run({**spec, "steps": 2, "out": str(out)}, out.with_suffix(".log"))
    result = {**json.loads(out.read_text()), "process": wall}
    print(f"  {name}: fit->1st step {result['fit_to_first_step']:.2f} s", flush=True)
    return result


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each timing's median over ``runs`` (the fields a run lacks stay None)."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = sorted(r[key] for r in runs if isinstance(r.get(key), (int, float)))
        out[key] = statistics.median(values) if values else None
    return out


def _print(table: list[tuple[str, str, float, dict[str, Any], bool]], repeat: int) -> None:
    print(f"medians of {repeat} run(s) each")
    print(
        f"{'change':<22} {'path':<9} {'fit->1st s':>10} {'ratio':>6} {'load s':>7} "
        f"{'plan s':>7} {'sink s':>7} {'DS rest s':>9} {'copy on disk':>12} {'target':>6}"
    )
    for name, how, ratio, r, copy_left in table:
        load = r["load_checkpoint"] or 0.0
        plan = r.get("plan") or 0.0
        sink = r.get("sink") or 0.0
        split = how == "direct"
        print(
            f"{name:<22} {how:<9} {r['fit_to_first_step']:>10.2f} "
            f"{(f'{ratio:.2f}x' if ratio else ''):>6} {load:>7.2f} "
            f"{(f'{plan:.2f}' if split else ''):>7} {(f'{sink:.2f}' if split else ''):>7} "
            f"{(f'{load - plan - sink:.2f}' if split else ''):>9} "
            f"{('yes' if copy_left else 'no') if how != 'no change' else '':>12} "
            f"{('' if not ratio else 'PASS' if ratio <= TARGET and not copy_left else 'MISS'):>6}"
        )
    print(
        f"target: a change <= {TARGET}x the unchanged resume at its target layout (fit->1st step), "
        "no copy on disk"
    )


def _universal(work: Path) -> None:
    """DeepSpeed's own path for dp 2 -> 1: ds_to_universal (timed as a process) + its load."""
    ckpt, uni = work / "dp2", work / "universal"
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
    spec = {"devices": 1, "stage": 2, "resume": str(uni), "plain": True, "universal": True}
    r = _timed(work, "dp 2 -> 1 universal", spec)
    print(
        f"dp 2 -> 1, DeepSpeed universal: ds_to_universal {to_universal:.2f} s + fit->first step "
        f"{r['fit_to_first_step']:.2f} s"
    )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        _worker(json.loads(sys.argv[2]))
    else:
        main()
