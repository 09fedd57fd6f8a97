"""Distributed workers for the reshape tests: train and save a source, load a converted target.

Why: a converted checkpoint is only right if stock DeepSpeed, at the target topology, loads it
with ``engine.load_checkpoint(load_optimizer_states=True)`` and holds exactly the source's state,
and training continues as if nothing had happened. Everything is module level for the harness.
Every rank sees the same batch so that data-parallel gradient averaging is exact at dp 1, 2 and 4
(``(g + g) / 2 == g`` in fp32), which is what makes the loss-continuity check bit-exact.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tests.checkpoint.ds_workers import make_optimizer

VOCAB = 16
HIDDEN = 8


class Net(nn.Module):
    """Linear layers, a persistent buffer, a frozen layer, optionally a tied embedding/head."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.l1 = nn.Linear(HIDDEN, 12)
        self.l2 = nn.Linear(12, HIDDEN)
        self.frozen = nn.Linear(HIDDEN, HIDDEN)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        self.register_buffer("running", torch.arange(5, dtype=torch.float32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids)
        x = self.l2(torch.relu(self.l1(e))) + self.frozen(e) + self.running.sum() * 0.0
        logits = self.head(x)
        return nn.functional.cross_entropy(logits.view(-1, VOCAB), ids.view(-1))


@dataclass(frozen=True)
class Spec:
    """One engine: stage, optimizer, tied weights."""

    name: str
    stage: int
    optimizer: str = "adam"
    tied: bool = True
    steps: int = 3


def zero_config(stage: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
        "steps_per_print": 10**9,
    }
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return cfg


def _batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (2, 6), generator=gen)


def _engine(spec: Spec) -> Any:
    import deepspeed

    torch.manual_seed(0)
    model = Net(spec.tied)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=make_optimizer(spec.optimizer, model.parameters()),
        config=zero_config(spec.stage),
    )
    return engine


def _train(engine: Any, first: int, steps: int) -> list[float]:
    losses = []
    for step in range(first, first + steps):
        loss = engine(_batch(step))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def train_worker(rank: int, world: int, out_dir: str, specs: list[Spec], more: int) -> dict:
    """Train each spec, save it, then train ``more`` steps and return those losses."""
    out = {}
    for spec in specs:
        engine = _engine(spec)
        _train(engine, 0, spec.steps)
        save_dir = os.path.join(out_dir, spec.name)
        engine.save_checkpoint(
            save_dir, client_state={"epoch": 7, "note": "hi", "vec": torch.arange(3.0)}
        )
        state = _state(engine)
        if rank == 0:
            torch.save(state, os.path.join(save_dir, "expected.pt"))
        out[spec.name] = _train(engine, spec.steps, more)
        dist.barrier()
        engine.destroy()
        del engine
        gc.collect()
    return out


def _state(engine: Any) -> dict[str, Any]:
    """The live engine's full fp32 params and optimizer states, through DeepSpeed's own API."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._lazy_init_hp_params_optimizer_state()  # ZeRO 1/2 link states lazily on step()
    basic = opt.optimizer
    keys: set[str] = set()
    for st in basic.state.values():
        keys.update(k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0)
    fp32, states, frozen = {}, {}, {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            if hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p]):
                    frozen[name] = p.detach().clone()
            else:
                frozen[name] = p.detach().clone()
            continue
        fp32[name] = safe_get_full_fp32_param(p).detach().clone()
        states[name] = {
            k: safe_get_full_optimizer_state(p, k).detach().clone() for k in sorted(keys)
        }
    buffers = {n: b.detach().clone() for n, b in engine.module.named_buffers()}
    return {"fp32": fp32, "states": states, "frozen": frozen, "buffers": buffers}


def _diff(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    out = []
    for part in ("fp32", "frozen", "buffers"):
        if set(expected[part]) != set(got[part]):
            out.append(f"{part}: names {sorted(expected[part])} vs {sorted(got[part])}")
        for n, t in expected[part].items():
            if n in got[part] and not (
                t.dtype == got[part][n].dtype and torch.equal(t, got[part][n])
            ):
                out.append(f"{part} {n} differs")
    for n, st in expected["states"].items():
        g = got["states"].get(n, {})
        if set(st) != set(g):
            out.append(f"states {n}: keys {sorted(st)} vs {sorted(g)}")
        for k, t in st.items():
            if k in g and not torch.equal(t, g[k]):
                out.append(f"state {n}.{k} differs")
    return out


def load_worker(rank: int, world: int, jobs: list[tuple[str, str, Spec, str, int]]) -> dict:
    """For each (label, save dir, spec, expected.pt, more): build the engine at this world size,
    load with optimizer states, compare everything with the source's logical state, train on."""
    results = {}
    for label, save_dir, spec, expected_path, more in jobs:
        engine = _engine(spec)
        _, client = engine.load_checkpoint(save_dir, load_optimizer_states=True)
        expected = torch.load(expected_path, weights_only=False)
        got = _state(engine)
        problems = _diff(expected, got)
        if (
            client.get("epoch") != 7
            or client.get("note") != "hi"
            or not torch.equal(client.get("vec"), torch.arange(3.0))
        ):
            problems.append(f"client state {client}")
        steps = engine.global_steps
        sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
        losses = _train(engine, spec.steps, more) if more else []
        results[label] = {
            "problems": problems,
            "losses": losses,
            "global_steps": steps,
            "sched": sched,
        }
        dist.barrier()
        del engine
    return results


def train_and_load_worker(
    rank: int,
    world: int,
    out_dir: str,
    specs: list[Spec],
    more: int,
    jobs: list[tuple[str, str, Spec, str, int]],
) -> tuple[dict, dict]:
    """Both in one launch (launches cost seconds each)."""
    return load_worker(rank, world, jobs), train_worker(rank, world, out_dir, specs, more)
