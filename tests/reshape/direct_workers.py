"""Workers for test_direct: load a dp-changed ZeRO 1/2 checkpoint through a converted copy
(path a) and straight into the engine (path b), and return both engines' raw state."""

from __future__ import annotations

import gc
import os
from typing import Any

import torch
import torch.distributed as dist

from lightning_reshape.checkpoint.convert import convert_checkpoint, plan_conversion
from lightning_reshape.checkpoint.direct import load_direct
from tests.reshape.workers import Spec, _engine, _train, train_worker


def _equal(a: Any, b: Any, where: str, out: list[str]) -> None:
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (
            torch.is_tensor(a)
            and torch.is_tensor(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        ):
            out.append(f"{where} differs")
    elif isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            out.append(f"{where}: keys {sorted(a, key=str)} vs {sorted(b, key=str)}")
        for k in a:
            if k in b:
                _equal(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            out.append(f"{where}: lengths {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _equal(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(f"{where}: {a!r} vs {b!r}")


def _raw(engine: Any, client: dict[str, Any]) -> dict[str, Any]:
    """Everything the ZeRO 1/2 optimizer and the engine hold after a load, as DeepSpeed keeps it."""
    opt = engine.optimizer
    sd = opt.optimizer.state_dict()
    return {
        "fp32": [t.detach().clone() for t in opt.single_partition_of_fp32_groups],
        "state": {
            g: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
            for g, st in sd["state"].items()
        },
        "param_groups": sd["param_groups"],
        "module": {n: t.detach().clone() for n, t in engine.module.state_dict().items()},
        "global": (
            opt.loss_scaler.cur_scale,
            opt.dynamic_loss_scale,
            opt.overflow,
            opt.clip_grad,
            opt._hp_optimizer_states_linked,
        ),
        "steps": (engine.global_steps, engine.skipped_steps, engine.global_samples),
        "loaded_dp": engine.loaded_checkpoint_dp_world_size,
        "client": sorted(client),
        "epoch": client.get("epoch"),
    }


def _after_steps(engine: Any, spec: Spec, more: int) -> dict[str, Any]:
    losses = _train(engine, spec.steps, more)
    opt = engine.optimizer
    sd = opt.optimizer.state_dict()
    return {
        "losses": losses,
        "fp32": [t.detach().clone() for t in opt.single_partition_of_fp32_groups],
        "state": {
            g: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
            for g, st in sd["state"].items()
        },
    }


def both_paths_worker(
    rank: int, world: int, out_dir: str, jobs: list[tuple[str, Spec]], more: int
) -> dict[str, Any]:
    """For each (source save dir, spec): path (a) and path (b) at this world size."""
    out: dict[str, Any] = {}
    for src, spec in jobs:
        label = f"{os.path.basename(src)}->dp{world}"
        converted = os.path.join(out_dir, f"converted-{label}")
        if rank == 0:
            convert_checkpoint(src, converted, tp=1, dp=world)
        dist.barrier()
        res: dict[str, Any] = {}
        for path in ("a", "b"):
            engine = _engine(spec)
            if path == "a":
                _, client = engine.load_checkpoint(
                    converted, load_optimizer_states=True, load_lr_scheduler_states=False
                )
            else:
                plan = plan_conversion(src, tp=1, dp=world)
                client = load_direct(engine, plan, load_lr_scheduler_states=False)
            res[path] = {"loaded": _raw(engine, client), "after": _after_steps(engine, spec, more)}
            dist.barrier()
            engine.destroy()
            del engine
            gc.collect()
        problems: list[str] = []
        _equal(res["a"]["loaded"], res["b"]["loaded"], "loaded", problems)
        _equal(res["a"]["after"], res["b"]["after"], "after", problems)
        b = res["b"]
        out[label] = {
            "problems": problems,
            "steps": b["loaded"]["steps"][0],
            "epoch": b["loaded"]["epoch"],
            "has_state": bool(b["loaded"]["state"]),
            "losses": b["after"]["losses"],
        }
    return out


def train_then_both_worker(
    rank: int,
    world: int,
    out_dir: str,
    specs: list[Spec],
    more: int,
    jobs: list[tuple[str, Spec]],
) -> tuple[dict, dict]:
    """Save sources at this world size, then load others both ways (one launch)."""
    trained = train_worker(rank, world, out_dir, specs, more)
    return trained, both_paths_worker(rank, world, out_dir, jobs, more)
