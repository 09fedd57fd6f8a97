"""Workers for test_direct: one checkpoint change loaded two ways at the same target layout.

Path (a): a converted copy loaded by ``engine.load_checkpoint`` (the copy path). Path (b): the
same plan loaded straight into the engine by ``load_direct`` (the engine sink). Each returns the
engine's full local state right after the load (module tensors and ZeRO 3 partitions, the
optimizer wrapper's own ``state_dict``: fp32 masters, every optimizer state, loss scaler; the lr
scheduler; step counters; client state) and again after 2 training steps, and the two must be
equal bit for bit. Families: ``net`` (a small model with a buffer, a frozen layer and a tied
head, formats_workers), ``gpt`` (TinyGPT with tensor parallelism) and ``pipe`` (DeepSpeed's
pipeline engine); each in fp32 and bf16.
"""

from __future__ import annotations

import enum
import gc
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from lightning_reshape.checkpoint.convert import (
    convert_checkpoint,
    plan_conversion,
    plan_rank_load,
)
from lightning_reshape.checkpoint.direct import DIRECT_PREFIX, load_direct
from lightning_reshape.distributed import ParallelState
from lightning_reshape.topology import ParallelConfig
from tests.checkpoint.ds_workers import make_optimizer
from tests.reshape import formats_workers, pp_workers, tp_workers

CLIENT = {"epoch": 7, "note": "hi"}


@dataclass(frozen=True)
class Case:
    """One engine family and layout: ``opts`` are the family's spec fields."""

    family: str  # net | gpt | pipe
    world: int
    bf16: bool = False
    opts: dict[str, Any] = field(default_factory=dict)


def _gpt_engine(case: Case) -> tuple[Any, ParallelState]:
    import deepspeed

    tp = case.opts["tp"]
    state = ParallelState.build(ParallelConfig(tp=tp).resolve(case.world))
    torch.manual_seed(0)
    model = tp_workers.LossGPT(tp_workers.CFG, state)
    spec = formats_workers.FSpec("gpt", case.opts.get("stage", 1), bf16=case.bf16)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=make_optimizer("adamw", model.parameters()),
        config=formats_workers.config(spec),
        mpu=state,
    )
    return engine, state


def build(case: Case) -> tuple[Any, Any]:
    """A fresh engine for ``case`` and what to release with it."""
    if case.family == "net":
        spec = formats_workers.FSpec("net", bf16=case.bf16, **case.opts)
        return formats_workers.engine_for(spec), None
    if case.family == "gpt":
        return _gpt_engine(case)
    spec = pp_workers.PPSpec("pipe", bf16=case.bf16, **case.opts)
    return pp_workers._engine(spec, case.world), None


def train(engine: Any, case: Case, first: int, steps: int) -> list[float]:
    """``steps`` steps from step ``first``; the losses."""
    losses = []
    for step in range(first, first + steps):
        if case.family == "pipe":
            loss = engine.train_batch(iter(pp_workers._batches(step)))
        else:
            batch = formats_workers._batch(step) if case.family == "net" else None
            args = (batch,) if batch is not None else tp_workers._batch(step)
            loss = engine(*args)
            engine.backward(loss)
            engine.step()
        losses.append(float(loss.detach().float()))
    return losses


def coordinates(engine: Any, case: Case) -> tuple[int, int, int]:
    """(tp rank, pp stage, dp rank) of this rank, from the engine's own groups."""
    if case.family == "pipe":
        grid = engine.grid
        return grid.get_slice_parallel_rank(), grid.get_stage_id(), grid.get_data_parallel_rank()
    if case.family == "gpt":
        mpu = engine.mpu
        return mpu.get_tensor_model_parallel_rank(), 0, mpu.get_data_parallel_rank()
    return 0, 0, dist.get_rank()


def release(engine: Any, extra: Any) -> None:
    dist.barrier()
    engine.destroy()
    from deepspeed.utils import groups

    if extra is not None:
        extra.destroy()
    groups.mpu = None  # DeepSpeed keeps the last mpu (or pipeline grid): the next engine has none
    gc.collect()


def _clone(value: Any) -> Any:
    """A deep copy with tensors cloned and objects as dicts of their attributes (comparable)."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, enum.Enum):
        return value
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clone(v) for v in value]
    if hasattr(value, "__dict__") and not callable(value):
        return {"<type>": type(value).__name__, **_clone(vars(value))}
    return value


def full_state(engine: Any, client: dict[str, Any] | None) -> dict[str, Any]:
    """This rank's whole engine state, as DeepSpeed keeps it."""
    module = {}
    for name, p in engine.module.named_parameters():
        module[name] = p.ds_tensor if hasattr(p, "ds_tensor") else p
    module.update(dict(engine.module.named_buffers()))
    sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    out = {
        "module": _clone(module),
        "optimizer": _clone(engine.optimizer.state_dict()),
        "scheduler": _clone(sched),
        "steps": (engine.global_steps, engine.global_samples, engine.skipped_steps),
    }
    if client is not None:
        out["client"] = _clone({k: v for k, v in client.items() if k != "optimizer"})
    return out


def equal(a: Any, b: Any, where: str, out: list[str]) -> None:
    """Append to ``out`` every place where ``a`` and ``b`` differ (tensors: dtype, shape, bits)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        same = torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype
        if not (same and a.shape == b.shape and torch.equal(a, b)):
            out.append(f"{where} differs")
    elif isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            out.append(f"{where}: keys {sorted(a, key=str)} vs {sorted(b, key=str)}")
        for k in a:
            if k in b:
                equal(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: lengths {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            equal(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(f"{where}: {a!r} vs {b!r}")


def save_source(out_dir: str, name: str, case: Case, steps: int = 3) -> None:
    """Train ``case`` ``steps`` steps and save it under ``out_dir/name`` (with a sidecar at tp)."""
    engine, extra = build(case)
    train(engine, case, 0, steps)
    save_dir = os.path.join(out_dir, name)
    engine.save_checkpoint(save_dir, tag="src", client_state=dict(CLIENT))
    if case.family == "gpt":
        from lightning_reshape.checkpoint.sidecar import write_sidecar

        spec = tp_workers.TPSpec("gpt", case.opts["tp"], case.opts.get("stage", 1))
        sidecar = tp_workers._sidecar(engine, spec, case.world // case.opts["tp"])
        if dist.get_rank() == 0:
            write_sidecar(os.path.join(save_dir, "src"), sidecar)
    release(engine, extra)


@dataclass(frozen=True)
class Job:
    """Load source ``src`` (a save dir) at ``target`` (reshaped to ``to``: convert's axes)."""

    label: str
    src: str
    target: Case
    to: dict[str, int]


_PLANNED: dict[str, int] = {}  # job label -> files in this rank's own plan (path b)


def _load(job: Job, path: str, scratch: str) -> tuple[dict[str, Any], dict[str, Any]]:
    engine, extra = build(job.target)
    if path == "a":
        converted = os.path.join(scratch, f"converted-{job.label}")
        _, client = engine.load_checkpoint(converted, tag="src", load_lr_scheduler_states=True)
    else:
        # this rank's own files only, as the strategy plans them
        plan, plan_file = plan_rank_load(job.src, coordinates(engine, job.target), **job.to)
        client = load_direct(engine, plan, load_lr_scheduler_states=True, plan_file=plan_file)
        _PLANNED[job.label] = len(plan.files)
    loaded = full_state(engine, client)
    losses = train(engine, job.target, 3, 2)
    after = {**full_state(engine, None), "losses": losses}
    release(engine, extra)
    return loaded, after


def both_paths(rank: int, job: Job, scratch: str) -> dict[str, Any]:
    """Path (a) and path (b) of ``job`` at this world size; what differs, and a few facts."""
    if rank == 0:
        convert_checkpoint(job.src, os.path.join(scratch, f"converted-{job.label}"), **job.to)
    dist.barrier()
    a_loaded, a_after = _load(job, "a", scratch)
    b_loaded, b_after = _load(job, "b", scratch)
    problems: list[str] = []
    equal(a_loaded, b_loaded, "loaded", problems)
    equal(a_after, b_after, "after", problems)
    return {
        "problems": problems,
        "steps": b_loaded["steps"][0],
        "epoch": b_loaded["client"].get("epoch"),
        "has_state": bool(b_loaded["optimizer"]),
        "losses": b_after["losses"],
        "temp_left": _ours_left(),
        "planned": (_PLANNED[job.label], len(plan_conversion(job.src, **job.to).files)),
    }


def _ours_left() -> list[str]:
    """Placeholder folders of the direct load still in this rank's temporary directory."""
    return [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(DIRECT_PREFIX)]


def truncated_source(rank: int, job: Job, scratch: str) -> dict[str, Any]:
    """A source file cut short after planning: the load fails with our error, the engine's
    checkpoint engine is restored and the placeholder folder is gone."""
    import shutil

    from lightning_reshape.errors import CheckpointError

    src = os.path.join(scratch, "truncated")
    if rank == 0:
        shutil.copytree(job.src, src)
    dist.barrier()
    plan = plan_conversion(src, **job.to)
    dist.barrier()
    if rank == 0:  # a file every rank reads first (its model states), so all fail together
        name = next(n for f in plan.files for n in f.sources() if n.startswith("mp_rank_"))
        victim = os.path.join(src, "src", name)
        os.truncate(victim, os.path.getsize(victim) // 2)
    dist.barrier()
    engine, extra = build(job.target)
    before = engine.checkpoint_engine
    error = ""
    try:
        load_direct(engine, plan)
    except CheckpointError as exc:
        error = str(exc)
    restored = engine.checkpoint_engine is before
    release(engine, extra)
    return {"error": error, "restored": restored, "temp_left": _ours_left()}


def zero3_without_optimizer(rank: int, job: Job) -> dict[str, Any]:
    """DeepSpeed's ZeRO 3 load without optimizer states reads the files itself: the direct load
    says so (the strategy then takes the copy path) and leaves the engine as it was."""
    from lightning_reshape.checkpoint.direct import direct_unsupported_reason
    from lightning_reshape.errors import CheckpointError

    engine, extra = build(at(job.target, job.target.world, stage=3))
    reasons = [direct_unsupported_reason(engine, load_optimizer_states=f) for f in (True, False)]
    plan = plan_conversion(job.src, **{**job.to, "zero_stage": 3})
    before, error = engine.checkpoint_engine, ""
    try:
        load_direct(engine, plan, load_optimizer_states=False)
    except CheckpointError as exc:
        error = str(exc)
    restored = engine.checkpoint_engine is before
    release(engine, extra)
    return {"reasons": reasons, "error": error, "restored": restored, "temp_left": _ours_left()}


def worker(
    rank: int,
    world: int,
    out_dir: str,
    sources: list[tuple[str, Case]],
    jobs: list[Job],
    fail: Job | None = None,
) -> dict[str, Any]:
    """Save ``sources`` (name, case) under ``out_dir``, then run ``jobs`` both ways."""
    tempfile.tempdir = os.path.join(out_dir, f"tmp-{world}-{rank}")  # ours only: see temp_left
    os.makedirs(tempfile.tempdir, exist_ok=True)
    for name, case in sources:
        save_source(out_dir, name, case)
    out: dict[str, Any] = {job.label: both_paths(rank, job, out_dir) for job in jobs}
    if fail is not None:
        out["truncated"] = truncated_source(rank, fail, out_dir)
        out["zero3_no_optim"] = zero3_without_optimizer(rank, fail)
    return out


def at(case: Case, world: int, **opts: Any) -> Case:
    """``case`` at another world size and options."""
    return replace(case, world=world, opts={**case.opts, **opts})
