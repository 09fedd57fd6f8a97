"""Distributed workers for the pipeline reshape tests: a 6-layer PipelineModule (dp 1, pp = world).

Why: a pipeline reshape moves whole layers between stages (layer files are keyed by global layer
index) and re-partitions each stage's ZeRO optimizer state; it is only right if DeepSpeed's own
pipeline engine at the target pp loads the converted files with
``engine.load_checkpoint(load_optimizer_states=True)`` and every parameter's fp32 master and
optimizer state equal the source's bit for bit. The oracle is read live from the engines with
``safe_get_full_*``. DeepSpeed's default ``partition_method="parameters"`` places the layers.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_reshape.checkpoint.sidecar import Sidecar, TPSplit, write_sidecar
from lightning_reshape.nn import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

VOCAB = 16
HIDDEN = 8
TAG = "step2"


class Embed(nn.Module):
    """Embedding plus a persistent buffer (buffers travel with their layer file)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.register_buffer("running", torch.arange(3, dtype=torch.float32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids) + self.running.sum() * 0.0


class Block(nn.Module):
    def __init__(self, width: int = HIDDEN) -> None:
        super().__init__()
        self.fc = nn.Linear(HIDDEN, width)
        self.out = nn.Linear(width, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(torch.relu(self.fc(x)))


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HIDDEN, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class TPEmbed(nn.Module):
    """Vocabulary-parallel embedding (tensor-parallel pipeline model)."""

    def __init__(self, group: Any) -> None:
        super().__init__()
        self.emb = VocabParallelEmbedding(VOCAB, HIDDEN, group, seed=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


class TPBlock(nn.Module):
    """Column- then row-parallel MLP with a residual; the row bias is replicated."""

    def __init__(self, group: Any, width: int, seed: int) -> None:
        super().__init__()
        self.fc = ColumnParallelLinear(HIDDEN, width, group, seed=seed)
        self.out = RowParallelLinear(width, HIDDEN, group, seed=seed + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(torch.relu(self.fc(x)))


class TPHead(nn.Module):
    def __init__(self, group: Any) -> None:
        super().__init__()
        self.proj = ColumnParallelLinear(HIDDEN, VOCAB, group, gather_output=True, seed=9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class TiedEmbed(nn.Module):
    """One weight for the embedding and (through ``_tied_head``) the output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(VOCAB, HIDDEN) * 0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)


def _tied_head(module: TiedEmbed, x: torch.Tensor) -> torch.Tensor:
    return x @ module.weight.t()


def _halve(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.view(-1, VOCAB), labels.view(-1))


@dataclass(frozen=True)
class PPSpec:
    """One pipeline engine: pp degree (= world size), ZeRO stage, optimizer."""

    name: str
    pp: int
    stage: int = 1
    optimizer: str = "adamw"
    steps: int = 2
    tp: int = 0  # 0: the plain model; >= 1: the tensor-parallel model at this tp
    partition: str = "parameters"  # PipelineModule's partition_method
    num_stages: bool = False  # PipelineModule(num_stages=pp): no model axis, files lack -model_XX
    tied: bool = False  # embedding and head share one TiedLayerSpec module
    acts: bool = False  # parameter-free modules and a plain function between the blocks
    bf16: bool = False  # bf16 + fp32 gradient accumulation: DeepSpeed's BF16_Optimizer


def _tp_group(topo: Any) -> Any:
    """This rank's tensor-parallel group (the topology's "model" axis); every rank creates all."""
    mine = None
    for ranks in topo.get_axis_comm_lists("model"):
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


def _engine(spec: PPSpec, world: int) -> Any:
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    torch.manual_seed(0)
    tp = max(spec.tp, 1)
    topo = PipeModelDataParallelTopology(num_pp=spec.pp, num_mp=tp, num_dp=world // spec.pp // tp)
    widths = (8, 16, 8, 24)  # unequal layers: "parameters" balancing differs from "uniform"
    if spec.tp:
        group = _tp_group(topo)
        layers = [
            LayerSpec(TPEmbed, group),
            *[LayerSpec(TPBlock, group, w, 10 * i) for i, w in enumerate(widths)],
            LayerSpec(TPHead, group),
        ]
    elif spec.tied:
        layers = [
            TiedLayerSpec("emb", TiedEmbed),
            *[LayerSpec(Block, w) for w in widths],
            TiedLayerSpec("emb", TiedEmbed, forward_fn=_tied_head),
        ]
    elif spec.acts:
        # modules without parameters still get a (small) layer file; functions get none
        layers = [
            LayerSpec(Embed),
            LayerSpec(Block, widths[0]),
            LayerSpec(nn.GELU),
            LayerSpec(Block, widths[1]),
            _halve,
            LayerSpec(Block, widths[2]),
            nn.Dropout(0.0),
            LayerSpec(Block, widths[3]),
            LayerSpec(nn.Tanh),
            LayerSpec(Head),
        ]
    else:
        layers = [LayerSpec(Embed), *[LayerSpec(Block, w) for w in widths], LayerSpec(Head)]
    placement: dict[str, Any] = {"num_stages": spec.pp} if spec.num_stages else {"topology": topo}
    model = PipelineModule(
        layers=layers, loss_fn=_loss, partition_method=spec.partition, **placement
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    else:
        opt = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": spec.stage},
        "steps_per_print": 10**9,
    }
    if spec.bf16:
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def _batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(2):
        gen = torch.Generator().manual_seed(3000 + 10 * step + i)
        ids = torch.randint(0, VOCAB, (2, 6), generator=gen)
        out.append((ids, ids))
    return out


def _state(engine: Any) -> dict[str, Any]:
    """This stage's params keyed by global name (``<layer>.<local>``), as in the checkpoint."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._lazy_init_hp_params_optimizer_state()
    keys: set[str] = set()
    for st in opt.optimizer.state.values():
        keys.update(k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0)
    fp32, states = {}, {}
    group = engine.grid.get_slice_parallel_group()
    for name, p in engine.module.named_parameters():
        fp32[name] = _join(safe_get_full_fp32_param(p), p, group)
        states[name] = {
            k: _join(safe_get_full_optimizer_state(p, k), p, group) for k in sorted(keys)
        }
    buffers = {n: b.detach().clone() for n, b in engine.module.named_buffers()}
    return {"fp32": fp32, "states": states, "buffers": buffers}


def _join(local: torch.Tensor, param: torch.Tensor, group: Any) -> Any:
    """The logical tensor: tp shards joined along the split dim (replicated ones must agree)."""
    local = local.detach().clone().contiguous()
    world = dist.get_world_size(group)
    if world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    if getattr(param, "tensor_model_parallel", False):
        return torch.cat(parts, dim=int(param.partition_dim))
    if any(not torch.equal(parts[0], x) for x in parts[1:]):
        return "replicated tensor differs across tp ranks"
    return parts[0]


def _splits(engine: Any) -> dict[str, Any]:
    """Every stage's tensor-parallel splits (what the strategy's sidecar records)."""
    mine = {
        n: TPSplit(int(p.partition_dim)) if getattr(p, "tensor_model_parallel", False) else None
        for n, p in engine.module.named_parameters()
    }
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _gathered(engine: Any) -> dict[str, Any]:
    """Every stage's state merged (all ranks get the union)."""
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, _state(engine))
    out: dict[str, Any] = {"fp32": {}, "states": {}, "buffers": {}}
    for part in parts:
        for k in out:
            out[k].update(part[k])
    out["global_steps"] = engine.global_steps
    return out


def train_worker(rank: int, world: int, out_dir: str, specs: list[PPSpec]) -> dict[str, Any]:
    """Train each spec, save it (tag ``step2``) and the expected logical state; return which
    layers each stage held."""
    parts = {}
    for spec in specs:
        engine = _engine(spec, world)
        for step in range(spec.steps):
            engine.train_batch(iter(_batches(step)))
        save_dir = os.path.join(out_dir, spec.name)
        engine.save_checkpoint(save_dir, tag=TAG, client_state={"epoch": 7})
        expected = _gathered(engine)
        splits = _splits(engine) if spec.tp else None
        if rank == 0:
            torch.save(expected, os.path.join(save_dir, "expected.pt"))
            if splits is not None:
                dp = world // spec.pp // spec.tp
                sidecar = Sidecar(spec.tp, spec.pp, dp, spec.stage, tp_splits=splits)
                write_sidecar(os.path.join(save_dir, TAG), sidecar)
        parts[spec.name] = list(engine.module.parts)
        dist.barrier()
        del engine
        gc.collect()
    return parts


def _diff(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    out = [f"{n}: {v}" for n, v in got["fp32"].items() if isinstance(v, str)]
    for part in (expected, got):
        if any(isinstance(v, str) for st in part["states"].values() for v in st.values()):
            out.append("an optimizer state of a replicated tensor differs across tp ranks")
    if out:
        return out
    for part in ("fp32", "buffers"):
        if set(expected[part]) != set(got[part]):
            out.append(f"{part}: names {sorted(expected[part])} vs {sorted(got[part])}")
        for n, t in expected[part].items():
            g = got[part].get(n)
            if g is not None and not (g.dtype == t.dtype and torch.equal(t, g)):
                out.append(f"{part} {n} differs")
    for n, st in expected["states"].items():
        g = got["states"].get(n, {})
        if set(st) != set(g):
            out.append(f"states {n}: keys {sorted(st)} vs {sorted(g)}")
        for k, t in st.items():
            if k in g and not torch.equal(t, g[k]):
                out.append(f"state {n}.{k} differs")
    if expected["global_steps"] != got["global_steps"]:
        out.append(f"global_steps {expected['global_steps']} vs {got['global_steps']}")
    return out


def load_worker(rank: int, world: int, jobs: list[tuple[str, str, PPSpec, str]]) -> dict:
    """For each (label, save dir, target spec, expected.pt): build the pipeline engine at the
    target pp, load with optimizer states, compare, train one more step."""
    results = {}
    for label, save_dir, spec, expected_path in jobs:
        engine = _engine(spec, world)
        problems: list[str] = []
        try:
            _, client = engine.load_checkpoint(save_dir, load_optimizer_states=True)
            expected = torch.load(expected_path, weights_only=False)
            assert expected["fp32"], f"{expected_path}: no parameters recorded"
            problems = _diff(expected, _gathered(engine))
            if (client or {}).get("epoch") != 7:
                problems.append(f"client state {client}")
            engine.train_batch(iter(_batches(spec.steps)))
        except Exception as exc:  # noqa: BLE001 - report per job
            problems.append(f"{type(exc).__name__}: {exc}")
        results[label] = problems
        dist.barrier()
        del engine
        gc.collect()
    return results


def train_and_load_worker(
    rank: int,
    world: int,
    out_dir: str,
    specs: list[PPSpec],
    jobs: list[tuple[str, str, PPSpec, str]],
) -> tuple[dict, dict]:
    """Both in one launch (launches cost seconds each)."""
    return load_worker(rank, world, jobs), train_worker(rank, world, out_dir, specs)
