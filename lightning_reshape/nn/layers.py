"""Tensor-parallel layers in Megatron's style, on an explicit tensor-parallel group.

Why explicit groups: no module-level parallel state; the caller passes the tp group (or the
ParallelState that owns it). Why partition attributes: the checkpoint layer reads
``tensor_model_parallel``, ``partition_dim`` and ``partition_stride`` on every parameter to
know how it is split across tp ranks. Why seeded master weights: each rank builds the full
weight from the same seed and keeps its slice, so runs at tp=1 and tp=2 start identically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_reshape.errors import ReshapeError

#: Fills a full (unsplit) weight in place from a generator.
InitMethod = Callable[[torch.Tensor, torch.Generator], Any]
GroupLike = Any  # a ProcessGroup, or an object with get_tensor_model_parallel_group()


def normal_init(std: float = 0.02) -> InitMethod:
    """Megatron's default: N(0, std) drawn from the given generator."""

    def init(weight: torch.Tensor, generator: torch.Generator) -> None:
        nn.init.normal_(weight, mean=0.0, std=std, generator=generator)

    return init


def tp_group_of(group: GroupLike) -> dist.ProcessGroup:
    """The tensor-parallel group from a ProcessGroup or a ParallelState-like object."""
    if hasattr(group, "get_tensor_model_parallel_group"):
        return group.get_tensor_model_parallel_group()
    if group is None:
        raise ReshapeError(
            "no tensor-parallel group given; pass the ParallelState or its "
            "get_tensor_model_parallel_group()."
        )
    return group


def set_partition_attributes(
    param: torch.Tensor, is_parallel: bool, dim: int = -1, stride: int = 1
) -> None:
    """Megatron's attributes, read by the checkpoint layer to know how ``param`` is split."""
    param.tensor_model_parallel = is_parallel
    param.partition_dim = dim if is_parallel else -1
    param.partition_stride = stride


def master_slice(
    shape: tuple[int, ...],
    dim: int,
    rank: int,
    world: int,
    init: InitMethod,
    seed: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """This rank's slice along ``dim`` of the full weight initialised from ``seed``."""
    full = torch.empty(shape, dtype=dtype)
    init(full, torch.Generator().manual_seed(seed))
    return full.chunk(world, dim=dim)[rank].clone()


def _divide(total: int, world: int, what: str) -> int:
    if total % world:
        raise ReshapeError(f"{what}={total} is not divisible by the tensor-parallel size {world}.")
    return total // world


# ---------------------------------------------------------------------- autograd functions
def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    if dist.get_world_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    return x.chunk(world, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _CopyToRegion(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (input enters a tp region)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce forward (partial sums leave a tp region); identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    """All-gather along the last dim forward; keep this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _split_last(grad, ctx.group), None


class _ScatterToRegion(torch.autograd.Function):
    """Keep this rank's slice along the last dim forward; all-gather the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather_last(grad, ctx.group), None


def copy_to_tensor_parallel_region(x: torch.Tensor, group: GroupLike) -> torch.Tensor:
    return _CopyToRegion.apply(x, tp_group_of(group))


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: GroupLike) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, tp_group_of(group))


def gather_from_tensor_parallel_region(x: torch.Tensor, group: GroupLike) -> torch.Tensor:
    return _GatherFromRegion.apply(x, tp_group_of(group))


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: GroupLike) -> torch.Tensor:
    return _ScatterToRegion.apply(x, tp_group_of(group))


# ---------------------------------------------------------------------- layers
class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split by output rows: each rank computes its slice of Y.

    ``gather_output`` all-gathers Y (else the output stays split, for a following
    RowParallelLinear with ``input_is_parallel=True``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: GroupLike,
        bias: bool = True,
        gather_output: bool = False,
        init_method: InitMethod | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.group = tp_group_of(group)
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.in_features, self.out_features = in_features, out_features
        self.out_per_rank = _divide(out_features, world, "out_features")
        self.gather_output = gather_output
        init = init_method or normal_init()
        self.weight = nn.Parameter(
            master_slice((out_features, in_features), 0, rank, world, init, seed, dtype)
        )
        set_partition_attributes(self.weight, True, dim=0)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_per_rank, dtype=dtype))
            set_partition_attributes(self.bias, True, dim=0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(_CopyToRegion.apply(x, self.group), self.weight, self.bias)
        return _GatherFromRegion.apply(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split by input columns: partial products are all-reduced.

    ``input_is_parallel``: X arrives already split along its last dim (from a
    ColumnParallelLinear); otherwise it is split here. The bias is replicated.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: GroupLike,
        bias: bool = True,
        input_is_parallel: bool = True,
        init_method: InitMethod | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.group = tp_group_of(group)
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank = _divide(in_features, world, "in_features")
        self.input_is_parallel = input_is_parallel
        init = init_method or normal_init()
        self.weight = nn.Parameter(
            master_slice((out_features, in_features), 1, rank, world, init, seed, dtype)
        )
        set_partition_attributes(self.weight, True, dim=1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype))
            set_partition_attributes(self.bias, False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = _ScatterToRegion.apply(x, self.group)
        y = _ReduceFromRegion.apply(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split across tp ranks; lookups outside this
    rank's range give zeros and the all-reduce fills them in."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        group: GroupLike,
        init_method: InitMethod | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.group = tp_group_of(group)
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per_rank = _divide(num_embeddings, world, "num_embeddings")
        self.vocab_start, self.vocab_end = rank * per_rank, (rank + 1) * per_rank
        init = init_method or normal_init()
        self.weight = nn.Parameter(
            master_slice((num_embeddings, embedding_dim), 0, rank, world, init, seed, dtype)
        )
        set_partition_attributes(self.weight, True, dim=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return _ReduceFromRegion.apply(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split along the vocabulary (Megatron's algorithm): global
    max and sum of exponentials by all-reduce, the target logit from its owning rank."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, group: dist.ProcessGroup
    ) -> torch.Tensor:
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        local_max = logits.max(dim=-1).values
        if dist.get_world_size(group) > 1:
            dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - local_max.unsqueeze(-1)
        per_rank = logits.shape[-1]
        start = dist.get_rank(group) * per_rank
        outside = (target < start) | (target >= start + per_rank)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if dist.get_world_size(group) > 1:
            stacked = torch.stack([target_logit, sum_exp])
            dist.all_reduce(stacked, group=group)
            target_logit, sum_exp = stacked[0], stacked[1]
        loss = sum_exp.log() - target_logit
        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        softmax, outside, local_target = ctx.saved_tensors
        grad_logits = softmax.clone()
        hit = (~outside).to(softmax.dtype)
        grad_logits.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        return grad_logits * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: GroupLike
) -> torch.Tensor:
    """Per-token cross-entropy (no reduction) of vocabulary-split ``logits`` [..., V/tp]
    against global ``target`` ids [...]; equals F.cross_entropy on the gathered logits."""
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group_of(group))
