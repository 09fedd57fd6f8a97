"""Rank bodies for the tensor-parallel layer tests: each returns max |difference| values
against the unsplit computation done in the same process."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_reshape.distributed import ParallelState
from lightning_reshape.nn import (
    ColumnParallelLinear,
    GPTConfig,
    RowParallelLinear,
    TinyGPT,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from lightning_reshape.topology import ParallelConfig

D = torch.float64


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _slice(t: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    return t.chunk(2, dim=dim)[rank]


def layers_worker(rank: int, world_size: int) -> dict[str, float | bool]:
    tp2 = ParallelState.build(ParallelConfig(tp=2).resolve(world_size))
    tp1 = ParallelState.build(ParallelConfig(tp=1).resolve(world_size))  # tp group of one rank
    gen = torch.Generator().manual_seed(7)  # same data on both ranks
    out: dict[str, float | bool] = {}

    # ColumnParallelLinear, split and gathered output.
    for gather in (False, True):
        full = ColumnParallelLinear(8, 6, tp1, seed=3, dtype=D)
        full.bias.data.normal_(generator=gen)
        layer = ColumnParallelLinear(8, 6, tp2, seed=3, dtype=D, gather_output=gather)
        layer.bias.data.copy_(_slice(full.bias.data, 0, rank))
        x = torch.randn(4, 8, dtype=D, generator=gen, requires_grad=True)
        up = torch.randn(4, 6, dtype=D, generator=gen)
        x_ref = x.detach().clone().requires_grad_()
        y_ref = F.linear(x_ref, full.weight, full.bias)
        (y_ref * up).sum().backward()
        y = layer(x)
        (y * (up if gather else _slice(up, 1, rank))).sum().backward()
        key = f"column_gather{int(gather)}"
        out[f"{key}_init"] = _diff(layer.weight.detach(), _slice(full.weight.detach(), 0, rank))
        out[f"{key}_out"] = _diff(y, y_ref if gather else _slice(y_ref, 1, rank))
        out[f"{key}_dx"] = _diff(x.grad, x_ref.grad)
        out[f"{key}_dw"] = _diff(layer.weight.grad, _slice(full.weight.grad, 0, rank))
        out[f"{key}_db"] = _diff(layer.bias.grad, _slice(full.bias.grad, 0, rank))
        out["column_attrs"] = (
            layer.weight.tensor_model_parallel,
            layer.weight.partition_dim,
            layer.weight.partition_stride,
        ) == (True, 0, 1)

    # RowParallelLinear, input already split or split here.
    for parallel_in in (True, False):
        full = RowParallelLinear(8, 6, tp1, seed=4, dtype=D)
        full.bias.data.normal_(generator=gen)
        layer = RowParallelLinear(8, 6, tp2, seed=4, dtype=D, input_is_parallel=parallel_in)
        layer.bias.data.copy_(full.bias.data)
        x_full = torch.randn(4, 8, dtype=D, generator=gen)
        up = torch.randn(4, 6, dtype=D, generator=gen)
        x_ref = x_full.clone().requires_grad_()
        y_ref = F.linear(x_ref, full.weight, full.bias)
        (y_ref * up).sum().backward()
        x = (_slice(x_full, 1, rank) if parallel_in else x_full).clone().requires_grad_()
        y = layer(x)
        (y * up).sum().backward()
        key = f"row_parallel_in{int(parallel_in)}"
        out[f"{key}_out"] = _diff(y, y_ref)
        out[f"{key}_dx"] = _diff(x.grad, _slice(x_ref.grad, 1, rank) if parallel_in else x_ref.grad)
        out[f"{key}_dw"] = _diff(layer.weight.grad, _slice(full.weight.grad, 1, rank))
        out[f"{key}_db"] = _diff(layer.bias.grad, full.bias.grad)
        out["row_attrs"] = (
            layer.weight.tensor_model_parallel,
            layer.weight.partition_dim,
            layer.bias.tensor_model_parallel,
        ) == (True, 1, False)

    # VocabParallelEmbedding.
    full = VocabParallelEmbedding(16, 5, tp1, seed=5, dtype=D)
    layer = VocabParallelEmbedding(16, 5, tp2, seed=5, dtype=D)
    ids = torch.randint(0, 16, (3, 7), generator=gen)
    up = torch.randn(3, 7, 5, dtype=D, generator=gen)
    ref = torch.nn.Embedding.from_pretrained(full.weight.detach().clone(), freeze=False)
    (ref(ids) * up).sum().backward()
    y = layer(ids)
    (y * up).sum().backward()
    out["embedding_out"] = _diff(y, ref(ids))
    out["embedding_dw"] = _diff(layer.weight.grad, _slice(ref.weight.grad, 0, rank))

    # Cross-entropy over a split vocabulary.
    logits = torch.randn(3, 7, 16, dtype=D, generator=gen) * 3
    target = torch.randint(0, 16, (3, 7), generator=gen)
    up = torch.rand(3, 7, dtype=D, generator=gen)
    ref_logits = logits.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref_logits.view(-1, 16), target.view(-1), reduction="none")
    (ref_loss * up.view(-1)).sum().backward()
    local = _slice(logits, 2, rank).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, tp2)
    (loss * up).sum().backward()
    out["ce_loss"] = _diff(loss.view(-1), ref_loss)
    out["ce_dlogits"] = _diff(local.grad, _slice(ref_logits.grad, 2, rank))

    tp1.destroy()
    tp2.destroy()
    return out


def gpt_worker(rank: int, world_size: int, dtype_names: list[str]) -> dict[str, dict]:
    """TinyGPT at tp 2 and tp 1 from the same seed: losses over a few SGD steps, per dtype."""
    return {name: _gpt_losses(world_size, getattr(torch, name)) for name in dtype_names}


def _gpt_losses(world_size: int, dtype: torch.dtype) -> dict[str, list[float]]:
    tp2 = ParallelState.build(ParallelConfig(tp=2).resolve(world_size))
    tp1 = ParallelState.build(ParallelConfig(tp=1).resolve(world_size))
    config = GPTConfig(dtype=dtype)
    models = {"tp2": TinyGPT(config, tp2), "tp1": TinyGPT(config, tp1)}
    gen = torch.Generator().manual_seed(11)
    batches = [torch.randint(0, config.vocab_size, (2, config.seq_len + 1), generator=gen)] * 3
    losses: dict[str, list[float]] = {}
    for name, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses[name] = []
        for batch in batches:
            loss = model.loss(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    tp1.destroy()
    tp2.destroy()
    return {"tp2": losses["tp2"], "tp1": losses["tp1"]}
