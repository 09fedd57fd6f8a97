"""Workers for the checkpoint-format tests (ZeRO 0, DeepSpeed's BF16_Optimizer, frozen parameters
excluded from the save, ZeRO 3 sub-groups): train and save a source, load a converted target.

Why: each of these formats is only handled right if stock DeepSpeed, at the target layout and
with the same options, loads the converted copy with ``engine.load_checkpoint`` and holds the
source's state bit for bit. Module level for the harness; every rank sees the same batch so
that dp-averaged gradients are exact and the next losses can be compared exactly.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tests.checkpoint.ds_workers import _full_param, _full_states, make_optimizer
from tests.reshape.workers import Net, _batch


@dataclass(frozen=True)
class FSpec:
    """One engine: ZeRO stage, optimizer, dtype and the options under test."""

    name: str
    stage: int
    optimizer: str = "adam"
    tied: bool = True
    bf16: bool = False
    grad_accum_fp32: bool = False  # bf16 + ZeRO 1 + fp32 grad accumulation: BF16_Optimizer
    sub_group_size: int | None = None  # ZeRO 3
    exclude_frozen: bool = False  # save_checkpoint(exclude_frozen_parameters=True)
    freeze_embedding: bool = False  # the (tied) embedding is frozen, as in GPT-2 fine-tuning
    steps: int = 3

    def at(self, stage: int) -> FSpec:
        """The same engine at another ZeRO stage."""
        return FSpec(**{**self.__dict__, "stage": stage})


def config(spec: FSpec) -> dict[str, Any]:
    """The DeepSpeed config of ``spec``."""
    zero: dict[str, Any] = {"stage": spec.stage}
    if spec.stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
        if spec.sub_group_size is not None:
            zero["sub_group_size"] = spec.sub_group_size
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
        "steps_per_print": 10**9,
    }
    if spec.bf16:
        cfg["bf16"] = {"enabled": True}
        if spec.grad_accum_fp32:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def engine_for(spec: FSpec) -> Any:
    """A fresh engine (same seed, so frozen weights are equal everywhere)."""
    import deepspeed

    torch.manual_seed(0)
    model = Net(spec.tied)
    if spec.freeze_embedding:
        model.emb.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=make_optimizer(spec.optimizer, model.parameters()),
        config=config(spec),
    )
    return engine


def _train(engine: Any, first: int, steps: int) -> list[float]:
    losses = []
    for step in range(first, first + steps):
        loss = engine(_batch(step))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach().float()))
    return losses


def state_of(engine: Any) -> dict[str, Any]:
    """Full fp32 masters, optimizer states, frozen weights and buffers of a live engine."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._lazy_init_hp_params_optimizer_state()
    out: dict[str, Any] = {"fp32": {}, "states": {}, "frozen": {}, "weights": {}}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            out["fp32"][name] = _full_param(engine, p)
            out["states"][name] = _full_states(engine, p)
        else:
            out["frozen"][name] = _full_param(engine, p)
        if not hasattr(p, "ds_id"):
            out["weights"][name] = p.detach().clone()
    out["buffers"] = {n: b.detach().clone() for n, b in engine.module.named_buffers()}
    return out


def diff(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """What differs between two ``state_of`` results (dtype and bits)."""
    out = []
    for part in ("fp32", "frozen", "buffers", "weights"):
        if part != "weights" and set(expected[part]) != set(got[part]):  # no weights at ZeRO 3
            out.append(f"{part}: names {sorted(expected[part])} vs {sorted(got[part])}")
        for n, t in expected[part].items():
            g = got[part].get(n)
            if g is not None and not (t.dtype == g.dtype and torch.equal(t, g)):
                out.append(f"{part} {n} differs")
    for n, st in expected["states"].items():
        g = got["states"].get(n, {})
        if set(st) != set(g):
            out.append(f"states {n}: keys {sorted(st)} vs {sorted(g)}")
        for k, t in st.items():
            if k in g and not torch.equal(t, g[k]):
                out.append(f"state {n}.{k} differs")
    return out


def train_worker(rank: int, world: int, out_dir: str, specs: list[FSpec], more: int) -> dict:
    """Train and save each spec, write its state as ``expected.pt``, return the next losses."""
    out = {}
    for spec in specs:
        engine = engine_for(spec)
        _train(engine, 0, spec.steps)
        save_dir = os.path.join(out_dir, spec.name)
        engine.save_checkpoint(
            save_dir,
            client_state={"epoch": 7},
            exclude_frozen_parameters=spec.exclude_frozen,
        )
        state = state_of(engine)
        if rank == 0:
            torch.save(state, os.path.join(save_dir, "expected.pt"))
        out[spec.name] = _train(engine, spec.steps, more)
        dist.barrier()
        engine.destroy()
        del engine
        gc.collect()
    return out


def load_worker(rank: int, world: int, jobs: list[tuple[str, str, FSpec, str, int]]) -> dict:
    """For each (label, save dir, target spec, expected.pt, more): build the engine at this
    world size, stock ``load_checkpoint`` with optimizer states, compare, train ``more`` steps.
    A load that raises is reported as a problem (with DeepSpeed's message), not re-raised."""
    results = {}
    for label, save_dir, spec, expected_path, more in jobs:
        engine = engine_for(spec)
        problems: list[str] = []
        losses: list[float] = []
        try:
            _, client = engine.load_checkpoint(
                save_dir, load_optimizer_states=True, load_module_strict=not spec.exclude_frozen
            )
            expected = torch.load(expected_path, weights_only=False)
            problems += diff(expected, state_of(engine))
            if client.get("epoch") != 7:
                problems.append(f"client state {client}")
            if engine.global_steps != spec.steps:
                problems.append(f"global_steps {engine.global_steps}")
            losses = _train(engine, spec.steps, more) if more else []
        except Exception as exc:  # noqa: BLE001 - the test reports every job's outcome
            problems.append(f"load failed: {type(exc).__name__}: {str(exc)[:300]}")
        results[label] = {"problems": problems, "losses": losses}
        dist.barrier()
        del engine
        gc.collect()
    return results


def train_and_load_worker(
    rank: int,
    world: int,
    out_dir: str,
    specs: list[FSpec],
    more: int,
    jobs: list[tuple[str, str, FSpec, str, int]],
) -> tuple[dict, dict]:
    """Both in one launch (launches cost seconds each)."""
    return load_worker(rank, world, jobs), train_worker(rank, world, out_dir, specs, more)
