"""Pipeline LightningModules for ``run_trainer.py`` (``model: "pipe"`` / ``"tied_gpt"``).

Why these shapes: ``pipe`` mixes layers with parameters (tensor-parallel blocks, plain linear
layers), parameter-free modules (``nn.GELU``, ``nn.Dropout(0)``) and a plain function, and has
an odd number of parameter layers, so stages are uneven at pp 2. ``tied_gpt`` ties the token
embedding to the output head through DeepSpeed's ``TiedLayerSpec``. Every weight is drawn from
a fixed seed, so a model starts identical at any (tp, pp, dp).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_reshape.lightning import PipelineLayers, PipelineLightningModule, pipeline_step
from lightning_reshape.nn import ColumnParallelLinear, RowParallelLinear
from lightning_reshape.nn.layers import set_partition_attributes

HIDDEN = 16


class Linear(nn.Linear):
    """A replicated linear layer with a fixed seed."""

    def __init__(self, fan_in: int, fan_out: int, seed: int) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            super().__init__(fan_in, fan_out)
        for p in self.parameters():
            set_partition_attributes(p, False)


class TPBlock(nn.Module):
    """Column- then row-parallel MLP with a residual."""

    def __init__(self, group: Any, seed: int) -> None:
        super().__init__()
        self.fc = ColumnParallelLinear(HIDDEN, 32, group, seed=seed)
        self.out = RowParallelLinear(32, HIDDEN, group, seed=seed + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(torch.tanh(self.fc(x)))


def halve(x: torch.Tensor) -> torch.Tensor:
    """A plain function in the layer list: no parameters, no layer file."""
    return x * 0.5


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, y)


class PipeNet(PipelineLightningModule):
    """5 layers with parameters among parameter-free modules and a function (9 layers)."""

    def __init__(self, step_batch: Any, lr: float = 1e-2) -> None:
        super().__init__()
        self.step_batch = step_batch
        self.lr = lr
        self.losses: dict[int, float] = {}
        self.val_losses: list[tuple[int, float]] = []

    def configure_pipeline(self) -> PipelineLayers:
        from deepspeed.pipe import LayerSpec

        group = self.trainer.strategy.parallel_state
        layers = [
            LayerSpec(Linear, 16, HIDDEN, 1),
            LayerSpec(TPBlock, group, 10),
            LayerSpec(nn.GELU),
            LayerSpec(TPBlock, group, 20),
            halve,
            nn.Dropout(0.0),
            LayerSpec(TPBlock, group, 30),
            LayerSpec(nn.Tanh),
            LayerSpec(Linear, HIDDEN, 1, 2),
        ]
        return PipelineLayers(layers, mse)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = pipeline_step(self, self.step_batch(self.global_step))
        self.losses[self.global_step] = float(loss)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = pipeline_step(self, self.step_batch(10_000 + batch_idx))
        self.val_losses.append((self.global_step, float(loss)))
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


VOCAB, SEQ = 32, 8


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(5)
            self.weight = nn.Parameter(torch.randn(VOCAB, HIDDEN) * 0.1)
        set_partition_attributes(self.weight, False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)


def tied_head(embed: Embed, x: torch.Tensor) -> torch.Tensor:
    return x @ embed.weight.t()


class Block(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.fc = Linear(HIDDEN, HIDDEN, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


class TiedGPT(PipeNet):
    """Embedding and head share one weight (TiedLayerSpec) across the first and last stage."""

    def configure_pipeline(self) -> PipelineLayers:
        from deepspeed.pipe import LayerSpec, TiedLayerSpec

        layers = [
            TiedLayerSpec("embed", Embed),
            LayerSpec(Block, 11),
            LayerSpec(Block, 12),
            LayerSpec(Block, 13),
            TiedLayerSpec("embed", Embed, forward_fn=tied_head),
        ]
        return PipelineLayers(layers, token_loss)


def pipeline_state(engine: Any, state: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's full fp32 value and optimizer states, keyed by pipeline name, tp shards
    joined, gathered from every stage (the same on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._lazy_init_hp_params_optimizer_state()
    tp_group = state.get_tensor_model_parallel_group()
    tp = state.layout.tp
    mine: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in engine.module.named_parameters():
        values = {"param": safe_get_full_fp32_param(p)}
        for key in ("exp_avg", "exp_avg_sq"):
            values[key] = safe_get_full_optimizer_state(p, key)
        for key, value in list(values.items()):
            if tp > 1 and getattr(p, "tensor_model_parallel", False):
                parts = [torch.empty_like(value) for _ in range(tp)]
                dist.all_gather(parts, value.contiguous(), group=tp_group)
                value = torch.cat(parts, dim=p.partition_dim)
            values[key] = value.detach().clone()
        mine[name] = values
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for part in gathered:
        merged.update(part)
    return merged
