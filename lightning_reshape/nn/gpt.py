"""A tiny tensor-parallel GPT for CPU tests and the example app.

Why: reshape tests need a model whose parameters are genuinely split across tp ranks (column
and row parallel, vocabulary parallel) and which starts from the same weights at any tp, so
losses before and after a reshape can be compared. Every weight is drawn from a seed derived
from ``config.seed`` and the parameter's position, never from the global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_reshape.nn.layers import (
    ColumnParallelLinear,
    GroupLike,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_parallel_region,
    normal_init,
    set_partition_attributes,
    tp_group_of,
    vocab_parallel_cross_entropy,
)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 128
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    seq_len: int = 32
    ffn_hidden: int = 256
    tie_embeddings: bool = True
    seed: int = 1234
    dtype: torch.dtype = torch.float32


def _replicated_layer_norm(hidden: int, dtype: torch.dtype) -> nn.LayerNorm:
    norm = nn.LayerNorm(hidden, dtype=dtype)
    for p in norm.parameters():
        set_partition_attributes(p, False)
    return norm


class ParallelAttention(nn.Module):
    """Causal self-attention with heads split across tp ranks.

    The fused QKV weight is laid out per head ([h0: q, k, v][h1: q, k, v]...), as Megatron
    does, so a contiguous row slice of the full weight holds whole heads.
    """

    def __init__(self, config: GPTConfig, group: dist.ProcessGroup, seed: int) -> None:
        super().__init__()
        world = dist.get_world_size(group)
        self.head_dim = config.hidden // config.heads
        self.local_heads = config.heads // world
        self.qkv = ColumnParallelLinear(
            config.hidden, 3 * config.hidden, group, seed=seed, dtype=config.dtype
        )
        self.proj = RowParallelLinear(
            config.hidden,
            config.hidden,
            group,
            seed=seed + 1,
            dtype=config.dtype,
            init_method=normal_init(0.02 / math.sqrt(2 * config.layers)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.local_heads, 3, self.head_dim)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))


class ParallelMLP(nn.Module):
    def __init__(self, config: GPTConfig, group: dist.ProcessGroup, seed: int) -> None:
        super().__init__()
        self.fc = ColumnParallelLinear(
            config.hidden, config.ffn_hidden, group, seed=seed, dtype=config.dtype
        )
        self.proj = RowParallelLinear(
            config.ffn_hidden,
            config.hidden,
            group,
            seed=seed + 1,
            dtype=config.dtype,
            init_method=normal_init(0.02 / math.sqrt(2 * config.layers)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig, group: dist.ProcessGroup, seed: int) -> None:
        super().__init__()
        self.ln1 = _replicated_layer_norm(config.hidden, config.dtype)
        self.attn = ParallelAttention(config, group, seed)
        self.ln2 = _replicated_layer_norm(config.hidden, config.dtype)
        self.mlp = ParallelMLP(config, group, seed + 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token + position embeddings, ``layers`` blocks, final norm, vocabulary-parallel head.

    ``forward(ids)`` gives this rank's vocabulary slice of the logits; ``loss(ids, targets)``
    the mean cross-entropy over the whole vocabulary (identical on every tp rank).
    """

    def __init__(self, config: GPTConfig, group: GroupLike) -> None:
        super().__init__()
        self.config = config
        self.group = tp_group_of(group)
        if config.heads % dist.get_world_size(self.group):
            raise ValueError(
                f"heads={config.heads} is not divisible by the tensor-parallel size "
                f"{dist.get_world_size(self.group)}."
            )
        seed = config.seed
        self.embed = VocabParallelEmbedding(
            config.vocab_size, config.hidden, self.group, seed=seed, dtype=config.dtype
        )
        self.pos = nn.Parameter(torch.empty(config.seq_len, config.hidden, dtype=config.dtype))
        normal_init()(self.pos.data, torch.Generator().manual_seed(seed + 1))
        set_partition_attributes(self.pos, False)
        self.blocks = nn.ModuleList(
            TransformerBlock(config, self.group, seed + 100 * (i + 1)) for i in range(config.layers)
        )
        self.ln_f = _replicated_layer_norm(config.hidden, config.dtype)
        if config.tie_embeddings:
            self.head = None
        else:
            self.head = ColumnParallelLinear(
                config.hidden,
                config.vocab_size,
                self.group,
                bias=False,
                seed=seed + 2,
                dtype=config.dtype,
            )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.head is not None:
            return self.head(x)
        return F.linear(copy_to_tensor_parallel_region(x, self.group), self.embed.weight)

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(self(ids), targets, self.group).mean()


# ---------------------------------------------------------------------- pipeline form
class GPTEmbedding(nn.Module):
    """Token + position embeddings: the first layer of the pipeline GPT."""

    def __init__(self, config: GPTConfig, group: GroupLike) -> None:
        super().__init__()
        group = tp_group_of(group)
        self.embed = VocabParallelEmbedding(
            config.vocab_size, config.hidden, group, seed=config.seed, dtype=config.dtype
        )
        self.pos = nn.Parameter(torch.empty(config.seq_len, config.hidden, dtype=config.dtype))
        normal_init()(self.pos.data, torch.Generator().manual_seed(config.seed + 1))
        set_partition_attributes(self.pos, False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) + self.pos[: ids.shape[1]]


class GPTBlock(TransformerBlock):
    """A transformer block as a pipeline layer, seeded as ``TinyGPT``'s block ``index``."""

    def __init__(self, config: GPTConfig, group: GroupLike, index: int) -> None:
        super().__init__(config, tp_group_of(group), config.seed + 100 * (index + 1))


class GPTFinalNorm(nn.LayerNorm):
    """The final layer norm (replicated over tp)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config.hidden, dtype=config.dtype)
        for p in self.parameters():
            set_partition_attributes(p, False)


class GPTHead(nn.Module):
    """Vocabulary-parallel output projection (untied): this rank's slice of the logits."""

    def __init__(self, config: GPTConfig, group: GroupLike) -> None:
        super().__init__()
        self.group = tp_group_of(group)
        self.proj = ColumnParallelLinear(
            config.hidden, config.vocab_size, self.group, bias=False, seed=config.seed + 2
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class VocabParallelLoss:
    """``loss_fn(logits, targets)`` of the pipeline: mean cross-entropy over the whole
    vocabulary from this rank's logits slice."""

    def __init__(self, group: GroupLike) -> None:
        self.group = tp_group_of(group)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets, self.group).mean()


def gpt_pipeline_layers(config: GPTConfig, group: GroupLike) -> list:
    """The GPT as DeepSpeed ``LayerSpec``s (built only on the stage that holds each layer):
    embeddings, ``config.layers`` blocks, final norm, head. The head is untied."""
    from deepspeed.pipe import LayerSpec

    return [
        LayerSpec(GPTEmbedding, config, group),
        *[LayerSpec(GPTBlock, config, group, i) for i in range(config.layers)],
        LayerSpec(GPTFinalNorm, config),
        LayerSpec(GPTHead, config, group),
    ]
