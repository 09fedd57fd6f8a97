"""Distributed workers for the tensor-parallel reshape tests: TinyGPT on a ParallelState mpu.

Why: a tensor-parallel reshape is only right if stock DeepSpeed, at the target (tp, dp), loads
the converted files with ``engine.load_checkpoint(load_optimizer_states=True)`` and every
logical tensor (tp shards joined along their split dim) equals the source's bit for bit. The
logical state is gathered live from the engines with DeepSpeed's own ``safe_get_full_*`` API, so
the oracle never goes through our reader. Every rank sees the same batch. Module level for the
harness (spawned processes pickle functions by name).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_reshape.checkpoint.sidecar import Sidecar, TPSplit, write_sidecar
from lightning_reshape.distributed import ParallelState
from lightning_reshape.nn import GPTConfig, TinyGPT, vocab_parallel_cross_entropy
from lightning_reshape.topology import ParallelConfig
from tests.checkpoint.ds_workers import make_optimizer
from tests.reshape.workers import zero_config

CFG = GPTConfig(
    vocab_size=32, hidden=16, layers=1, heads=4, seq_len=8, ffn_hidden=32, tie_embeddings=False
)
TAG = "step3"


class LossGPT(TinyGPT):
    """TinyGPT whose forward returns the loss (DeepSpeed's engine calls forward)."""

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = TinyGPT.forward(self, ids)
        return vocab_parallel_cross_entropy(logits, targets, self.group).mean()


@dataclass(frozen=True)
class TPSpec:
    """One engine: tensor-parallel degree, ZeRO stage, optimizer."""

    name: str
    tp: int
    stage: int
    optimizer: str = "adamw"
    steps: int = 3
    # bf16 with fp32 gradient accumulation at ZeRO 1: DeepSpeed's BF16_Optimizer
    bf16_optimizer: bool = False


def _config(spec: TPSpec) -> dict[str, Any]:
    cfg = zero_config(spec.stage)
    if spec.bf16_optimizer:
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2000 + step)
    ids = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _engine(spec: TPSpec, world: int) -> tuple[Any, ParallelState]:
    import deepspeed

    state = ParallelState.build(ParallelConfig(tp=spec.tp).resolve(world))
    torch.manual_seed(0)
    model = LossGPT(CFG, state)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=make_optimizer(spec.optimizer, model.parameters()),
        config=_config(spec),
        mpu=state,
    )
    return engine, state


def _train(engine: Any, first: int, steps: int) -> list[float]:
    losses = []
    for step in range(first, first + steps):
        loss = engine(*_batch(step))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def _join(local: torch.Tensor, param: torch.Tensor, state: ParallelState, what: str) -> Any:
    """The logical tensor: tp shards joined along the split dim; replicated ones checked equal
    across tp ranks (a difference is returned as a problem string)."""
    group = state.get_tensor_model_parallel_group()
    world = dist.get_world_size(group)
    local = local.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    if getattr(param, "tensor_model_parallel", False):
        return torch.cat(parts, dim=int(param.partition_dim))
    if any(not torch.equal(parts[0], p) for p in parts[1:]):
        return f"{what}: replicated tensor differs across tp ranks"
    return parts[0]


def _state(engine: Any, state: ParallelState) -> dict[str, Any]:
    """Full logical fp32 params and optimizer states, through DeepSpeed's own API."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._lazy_init_hp_params_optimizer_state()  # ZeRO 1/2 link states lazily on step()
    keys: set[str] = set()
    for st in opt.optimizer.state.values():
        keys.update(k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0)
    fp32: dict[str, Any] = {}
    states: dict[str, dict[str, Any]] = {}
    for name, p in engine.module.named_parameters():
        fp32[name] = _join(safe_get_full_fp32_param(p), p, state, name)
        states[name] = {
            k: _join(safe_get_full_optimizer_state(p, k), p, state, f"{name}.{k}")
            for k in sorted(keys)
        }
    out = {"fp32": fp32, "states": states, "global_steps": engine.global_steps}
    if engine.bfloat16_enabled() and engine.zero_optimization_stage() < 3:
        # the bf16 module weights too (DeepSpeed loads them from the model-states files)
        out["weights"] = {
            name: _join(p, p, state, f"{name} (bf16)")
            for name, p in engine.module.named_parameters()
        }
    return out


def _sidecar(engine: Any, spec: TPSpec, dp: int) -> Sidecar:
    """What the Lightning strategy records: each parameter's split from its Megatron attributes."""
    splits: dict[str, TPSplit | None] = {}
    for name, p in engine.module.named_parameters():
        if getattr(p, "tensor_model_parallel", False):
            splits[name] = TPSplit(int(p.partition_dim), int(getattr(p, "partition_stride", 1)))
        else:
            splits[name] = None
    return Sidecar(tp=spec.tp, pp=1, dp=dp, zero_stage=spec.stage, tp_splits=splits)


def _release(engine: Any, state: ParallelState) -> None:
    dist.barrier()
    engine.destroy()
    state.destroy()
    gc.collect()


def train_worker(rank: int, world: int, out_dir: str, specs: list[TPSpec]) -> dict[str, Any]:
    """Train each spec, save it (tag ``step3``) with its sidecar and the expected logical state."""
    problems: dict[str, Any] = {}
    for spec in specs:
        engine, state = _engine(spec, world)
        _train(engine, 0, spec.steps)
        save_dir = os.path.join(out_dir, spec.name)
        engine.save_checkpoint(save_dir, tag=TAG, client_state={"epoch": 7})
        expected = _state(engine, state)
        problems[spec.name] = _problems(expected)
        if rank == 0:
            write_sidecar(os.path.join(save_dir, TAG), _sidecar(engine, spec, world // spec.tp))
            torch.save(expected, os.path.join(save_dir, "expected.pt"))
        _release(engine, state)
    return problems


def _problems(state: dict[str, Any]) -> list[str]:
    out = [v for v in state["fp32"].values() if isinstance(v, str)]
    out += [v for v in state.get("weights", {}).values() if isinstance(v, str)]
    out += [v for st in state["states"].values() for v in st.values() if isinstance(v, str)]
    return out


def _diff(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    out = _problems(got)
    if set(expected["fp32"]) != set(got["fp32"]):
        out.append(f"param names {sorted(expected['fp32'])} vs {sorted(got['fp32'])}")
    for n, t in expected["fp32"].items():
        g = got["fp32"].get(n)
        if torch.is_tensor(g) and not (g.dtype == t.dtype and torch.equal(t, g)):
            out.append(f"fp32 {n} differs")
    for n, st in expected["states"].items():
        g = got["states"].get(n, {})
        if set(st) != set(g):
            out.append(f"states {n}: keys {sorted(st)} vs {sorted(g)}")
        for k, t in st.items():
            v = g.get(k)
            if torch.is_tensor(v) and not torch.equal(t, v):
                out.append(f"state {n}.{k} differs")
    for n, t in expected.get("weights", {}).items():
        g = got.get("weights", {}).get(n)
        if not (torch.is_tensor(g) and g.dtype == t.dtype and torch.equal(t, g)):
            out.append(f"bf16 weight {n} differs")
    if expected["global_steps"] != got["global_steps"]:
        out.append(f"global_steps {expected['global_steps']} vs {got['global_steps']}")
    return out


def load_worker(rank: int, world: int, jobs: list[tuple[str, str, TPSpec, str]]) -> dict:
    """For each (label, save dir, target spec, expected.pt): build the target engine, load with
    optimizer states, compare the logical state with the source's, train one more step."""
    results = {}
    for label, save_dir, spec, expected_path in jobs:
        engine, state = _engine(spec, world)
        problems: list[str] = []
        try:
            _, client = engine.load_checkpoint(save_dir, load_optimizer_states=True)
            expected = torch.load(expected_path, weights_only=False)
            assert expected["fp32"], f"{expected_path}: no parameters recorded"
            problems = _diff(expected, _state(engine, state))
            if (client or {}).get("epoch") != 7:
                problems.append(f"client state {client}")
            _train(engine, spec.steps, 1)
        except Exception as exc:  # noqa: BLE001 - report per job; other jobs still run
            problems.append(f"{type(exc).__name__}: {exc}")
        results[label] = problems
        _release(engine, state)
    return results


def train_and_load_worker(
    rank: int,
    world: int,
    out_dir: str,
    specs: list[TPSpec],
    jobs: list[tuple[str, str, TPSpec, str]],
) -> tuple[dict, dict]:
    """Both in one launch (launches cost seconds each)."""
    return load_worker(rank, world, jobs), train_worker(rank, world, out_dir, specs)
