"""Distributed workers that train tiny models with real DeepSpeed on CPU and save checkpoints.

Why: the reader must be checked against what DeepSpeed really writes, so the tests generate
checkpoints in the test run (never committed). Each worker also records the live engine's
full fp32 parameters and optimizer states (``expected.pt``) as the oracle where DeepSpeed's
own ``zero_to_fp32`` cannot help (pipeline, tensor parallel, optimizer states).

Everything is module level so ``tests/deepspeed_harness.run_distributed`` can spawn it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

VOCAB = 16
HIDDEN = 8


class TinyNet(nn.Module):
    """A few Linear layers, a persistent buffer, a frozen layer and a tied embedding/head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.l1 = nn.Linear(HIDDEN, 12)
        self.l2 = nn.Linear(12, HIDDEN)
        self.frozen = nn.Linear(HIDDEN, HIDDEN)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied: saved once, listed in shared_params
        self.register_buffer("running", torch.arange(5, dtype=torch.float32))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids)
        x = self.l2(torch.relu(self.l1(e))) + self.frozen(e) + self.running.sum() * 0.0
        logits = self.head(x)
        return nn.functional.cross_entropy(logits.float().view(-1, VOCAB), ids.view(-1))


@dataclass(frozen=True)
class RunSpec:
    """One checkpoint to produce inside a launch."""

    name: str
    stage: int
    optimizer: str = "adam"
    dtype: str = "fp32"  # fp32 | bf16
    steps: int = 2
    extra: dict[str, Any] = field(default_factory=dict)


def make_optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=1e-2)
    raise ValueError(kind)


def _ds_config(spec: RunSpec) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": spec.stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if spec.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if spec.stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if spec.extra.get("elastic"):
        cfg["zero_optimization"]["elastic_checkpoint"] = True
    return cfg


def _batch(rank: int, step: int, seq: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (2, seq), generator=gen)


def _full_param(engine: Any, param: torch.nn.Parameter) -> torch.Tensor:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    if hasattr(param, "ds_id") and not param.requires_grad:  # ZeRO-3 frozen: gather it
        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().float().cpu().clone()
    opt = engine.optimizer
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):  # ZeRO 0 fp16/bf16 wrapper
        for g, group in enumerate(opt.fp16_groups):
            for i, p in enumerate(group):
                if p is param:
                    return opt.fp32_groups[g][i].detach().float().cpu().clone()
    full = safe_get_full_fp32_param(param)
    if full is None:  # ZeRO 0 fp32: the parameter is its own master
        full = param.detach()
    return full.detach().float().cpu().clone()


def _full_states(engine: Any, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_optimizer_state

    basic = engine.basic_optimizer if hasattr(engine, "basic_optimizer") else engine.optimizer
    out: dict[str, torch.Tensor] = {}
    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        # Discover the keys from the inner optimizer's flat state.
        keys: set[str] = set()
        for st in basic.state.values():
            keys.update(k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0)
        for key in sorted(keys):
            val = safe_get_full_optimizer_state(param, key)
            if val is not None:
                out[key] = val.detach().float().cpu().clone()
        return out
    opt = engine.optimizer
    key_param: Any = param
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):  # ZeRO 0 fp16/bf16 wrapper
        for g, group in enumerate(opt.fp16_groups):
            for i, p in enumerate(group):
                if p is param:
                    key_param = opt.fp32_groups[g][i]
    st = basic.state.get(key_param, {})
    for key, val in st.items():
        if torch.is_tensor(val) and val.dim() > 0:
            out[key] = val.detach().float().cpu().clone()
    return out


def _train_and_save(rank: int, spec: RunSpec, out_dir: str, model: nn.Module, mpu: Any) -> None:
    import deepspeed

    optimizer = make_optimizer(spec.optimizer, model.parameters())
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=_ds_config(spec), mpu=mpu
    )
    dp_rank = mpu.get_data_parallel_rank() if mpu is not None else rank
    # extra "subdir"/"tag"/"save_latest": saves shaped like Hugging Face Trainer's
    # (checkpoint-N/global_stepN, no latest) or with a custom tag
    save_dir = os.path.join(out_dir, spec.name, spec.extra.get("subdir", ""))
    for step in range(spec.steps):
        ids = _batch(dp_rank, step)
        loss = engine(ids)
        engine.backward(loss)
        engine.step()
        if spec.extra.get("save_each_step") and step < spec.steps - 1:
            engine.save_checkpoint(save_dir, client_state={"epoch": 0, "my_key": "early"})
    engine.save_checkpoint(
        save_dir,
        tag=spec.extra.get("tag"),
        client_state={"epoch": 3, "my_key": "hello"},
        save_latest=spec.extra.get("save_latest", True),
    )
    names = {p: n for n, p in engine.module.named_parameters()}
    expected: dict[str, Any] = {"params": {}, "states": {}}
    for param, name in names.items():
        expected["params"][name] = _full_param(engine, param)
        if param.requires_grad:
            expected["states"][name] = _full_states(engine, param)
    expected["buffers"] = {n: b.detach().cpu().clone() for n, b in engine.module.named_buffers()}
    mp_rank = mpu.get_model_parallel_rank() if mpu is not None else 0
    if dp_rank == 0:
        torch.save(expected, os.path.join(save_dir, f"expected_mp{mp_rank}.pt"))
    dist.barrier()
    del engine, optimizer


def zero_worker(rank: int, world_size: int, out_dir: str, specs: list[RunSpec]) -> None:
    """Train TinyNet under each spec (plain data parallel) and save one checkpoint per spec."""
    for spec in specs:
        torch.manual_seed(0)
        model = TinyNet()
        _train_and_save(rank, spec, out_dir, model, None)


# --- tensor parallel (manual split, an mpu whose model-parallel rank is the tp rank) ---------


class SimpleMPU:
    """Minimal Megatron-style mpu for a tp x dp grid (tp varies fastest), pp = 1."""

    def __init__(self, tp: int) -> None:
        world = dist.get_world_size()
        rank = dist.get_rank()
        self.tp = tp
        self.dp = world // tp
        self.tp_rank = rank % tp
        self.dp_rank = rank // tp
        self.tp_group = None
        self.dp_group = None
        for d in range(self.dp):
            ranks = [d * tp + t for t in range(tp)]
            g = dist.new_group(ranks)
            if rank in ranks:
                self.tp_group = g
        for t in range(tp):
            ranks = [d * tp + t for d in range(self.dp)]
            g = dist.new_group(ranks)
            if rank in ranks:
                self.dp_group = g

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self) -> Any:
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self) -> Any:
        return self.dp_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


class _CopyToTP(torch.autograd.Function):
    """Megatron's copy-to-tensor-parallel-region: identity forward, all-reduce grad backward.

    Without it the replicated layers before a column-parallel layer drift apart across tp
    ranks (and the reader rightly refuses to call them replicated).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class TPNet(nn.Module):
    """Column-parallel then row-parallel Linear, a replicated bias and norm, an embedding."""

    def __init__(self, tp: int, tp_rank: int, group: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        full_col = nn.Linear(HIDDEN, 12)
        full_row = nn.Linear(12, HIDDEN, bias=False)
        self.group = group
        self.emb = nn.Embedding(VOCAB, HIDDEN)  # replicated
        self.col = nn.Linear(HIDDEN, 12 // tp)
        self.row = nn.Linear(12 // tp, HIDDEN, bias=False)
        with torch.no_grad():
            self.col.weight.copy_(full_col.weight.chunk(tp, 0)[tp_rank])
            self.col.bias.copy_(full_col.bias.chunk(tp, 0)[tp_rank])
            self.row.weight.copy_(full_row.weight.chunk(tp, 1)[tp_rank])
        self.row_bias = nn.Parameter(torch.zeros(HIDDEN))  # replicated
        self.norm = nn.LayerNorm(HIDDEN)  # replicated
        self.out = nn.Linear(HIDDEN, VOCAB)  # replicated
        self.register_buffer("running", torch.ones(2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_reduce

        x = self.emb(ids)
        h = torch.relu(self.col(_CopyToTP.apply(x, self.group)))
        y = all_reduce(self.row(h), group=self.group) + self.row_bias
        logits = self.out(self.norm(y))
        return nn.functional.cross_entropy(logits.float().view(-1, VOCAB), ids.view(-1))


TP_SPLITS = {"col.weight": (0, 1), "col.bias": (0, 1), "row.weight": (1, 1)}


def tp_worker(rank: int, world_size: int, out_dir: str, tp: int, specs: list[RunSpec]) -> None:
    """Train TPNet at tp x (world/tp) and save; rank 0 writes our sidecar into the tag folder."""
    from lightning_reshape.checkpoint.sidecar import Sidecar, TPSplit, write_sidecar

    mpu = SimpleMPU(tp)
    for spec in specs:
        model = TPNet(tp, mpu.tp_rank, mpu.tp_group)
        _train_and_save(rank, spec, out_dir, model, mpu)
        if rank == 0 and spec.extra.get("sidecar", True):
            save_dir = os.path.join(out_dir, spec.name)
            with open(os.path.join(save_dir, "latest")) as fh:
                tag = fh.read().strip()
            names = [n for n, _ in model.named_parameters()]
            splits = {
                n: (
                    TPSplit(dim=TP_SPLITS[n][0], stride=TP_SPLITS[n][1]) if n in TP_SPLITS else None
                )
                for n in names
            }
            write_sidecar(
                os.path.join(save_dir, tag),
                Sidecar(tp=tp, pp=1, dp=world_size // tp, zero_stage=spec.stage, tp_splits=splits),
            )
        dist.barrier()


# --- pipeline engine -------------------------------------------------------------------------


class _Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.register_buffer("running", torch.arange(3, dtype=torch.float32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids) + self.running.sum() * 0.0


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HIDDEN, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.proj.weight.float().t() + self.proj.bias.float()


def _pipe_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.view(-1, VOCAB), labels.view(-1))


def pipe_worker(rank: int, world_size: int, out_dir: str, pp: int, specs: list[RunSpec]) -> None:
    """Train a 4-layer PipelineModule at pp stages (dp = world/pp) and save each spec."""
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    for spec in specs:
        torch.manual_seed(0)
        topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=1, num_dp=world_size // pp)
        layers = [LayerSpec(_Embed), LayerSpec(_Block), LayerSpec(_Block), LayerSpec(_Head)]
        model = PipelineModule(
            layers=layers, topology=topo, loss_fn=_pipe_loss, partition_method="uniform"
        )
        cfg = _ds_config(spec)
        cfg["train_micro_batch_size_per_gpu"] = 2
        cfg["gradient_accumulation_steps"] = 2
        optimizer = make_optimizer(spec.optimizer, model.parameters())
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
        dp_rank = engine.grid.get_data_parallel_rank()
        for step in range(spec.steps):
            batches = [
                (_batch(dp_rank, step * 10 + i), _batch(dp_rank, step * 10 + i)) for i in range(2)
            ]
            engine.train_batch(iter(batches))
        save_dir = os.path.join(out_dir, spec.name)
        engine.save_checkpoint(save_dir, client_state={"epoch": 1})
        expected: dict[str, Any] = {"params": {}, "states": {}, "buffers": {}}
        for local_name, param in engine.module.named_parameters():
            expected["params"][local_name] = _full_param(engine, param)
            expected["states"][local_name] = _full_states(engine, param)
        for local_name, buf in engine.module.named_buffers():
            expected["buffers"][local_name] = buf.detach().cpu().clone()
        if dp_rank == 0:
            stage = engine.grid.get_stage_id()
            torch.save(expected, os.path.join(save_dir, f"expected_pp{stage}.pt"))
        dist.barrier()
        del engine, optimizer


def combo_worker(
    rank: int,
    world_size: int,
    out_dir: str,
    zero_specs: list[RunSpec],
    tp_specs: list[RunSpec],
    pp_specs: list[RunSpec],
) -> None:
    """All checkpoints of one world size in one launch (launches cost seconds each)."""
    zero_worker(rank, world_size, out_dir, zero_specs)
    if tp_specs:
        tp_worker(rank, world_size, out_dir, 2, tp_specs)
    if pp_specs:
        pipe_worker(rank, world_size, out_dir, 2, pp_specs)


def describe(path: str) -> str:
    """Debug helper: list a checkpoint directory as JSON."""
    return json.dumps(sorted(os.listdir(path)))
