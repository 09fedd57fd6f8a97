"""Module-level rank bodies for the distributed tests (spawn pickles them by name)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lightning_reshape.distributed import MESH_DIMS, ParallelState
from lightning_reshape.topology import GROUP_KINDS, ParallelConfig


def groups_worker(rank: int, world_size: int, configs: list[dict[str, Any]]) -> list[dict]:
    """For each layout: build, check every kind's torch group and an all_reduce, destroy."""
    calls: list[list[int]] = []
    original = dist.new_group

    def counting_new_group(ranks: list[int] | None = None, *args: Any, **kwargs: Any) -> Any:
        calls.append(list(range(world_size)) if ranks is None else sorted(ranks))
        return original(ranks, *args, **kwargs)

    dist.new_group = counting_new_group
    reports = []
    try:
        for config in configs:
            layout = ParallelConfig(**config).resolve(world_size)
            calls.clear()
            state = ParallelState.build(layout)
            report: dict[str, Any] = {"config": config, "calls": list(calls), "kinds": {}}
            for kind in GROUP_KINDS:
                expected = layout.group_of(rank, kind)
                group = state.group(kind)
                if not expected:
                    report["kinds"][kind] = (expected, None, None)
                    continue
                torch_ranks = dist.get_process_group_ranks(group)
                value = torch.tensor([float(rank + 1)])
                dist.all_reduce(value, group=group)
                gathered = [torch.zeros(1) for _ in expected]
                dist.all_gather(gathered, torch.tensor([float(rank)]), group=group)
                report["kinds"][kind] = (
                    expected,
                    torch_ranks,
                    value.item(),
                    [g.item() for g in gathered],
                    dist.get_rank(group),
                    dist.get_world_size(group),
                    state.rank_in(kind),
                )
            mesh = state.device_mesh()
            report["mesh"] = {d: dist.get_process_group_ranks(mesh.get_group(d)) for d in MESH_DIMS}
            report["mesh_expected"] = {d: state.ranks(d) for d in MESH_DIMS}
            report["mesh_calls"] = len(calls) - len(report["calls"])
            report["created"] = [list(r) for r in state.created_groups]
            report["mp"] = (
                state.get_model_parallel_rank(),
                state.get_model_parallel_world_size(),
                state.get_data_parallel_rank(),
                state.get_data_parallel_world_size(),
                state.is_pipeline_first_stage(),
                state.is_pipeline_last_stage(),
            )
            state.destroy()
            reports.append(report)
    finally:
        dist.new_group = original
    return reports


class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def deepspeed_worker(rank: int, world_size: int, cases: list[tuple[dict, int]]) -> list[dict]:
    """deepspeed.initialize(mpu=state) for each (config, ZeRO stage); two training steps."""
    import deepspeed

    out = []
    for config, stage in cases:
        layout = ParallelConfig(**config).resolve(world_size)
        state = ParallelState.build(layout)
        ds_config = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
            "gradient_clipping": 1.0,
            "steps_per_print": 1000,
        }
        engine, *_ = deepspeed.initialize(
            model=_TinyNet(), model_parameters=None, config=ds_config, mpu=state
        )
        losses = []
        gen = torch.Generator().manual_seed(1 + state.get_data_parallel_rank())
        for _ in range(2):
            x = torch.randn(2, 8, generator=gen)
            loss = engine(x).pow(2).mean()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        out.append(
            {
                "stage": stage,
                "dp_world_size": engine.dp_world_size,
                "mp_world_size": engine.mp_world_size,
                "checkpoint_mp_rank": engine.mpu.get_model_parallel_rank(),
                "dp_group_ranks": dist.get_process_group_ranks(engine.data_parallel_group),
                "losses": losses,
            }
        )
        engine.destroy()
        del engine
        state.destroy()
    return out
