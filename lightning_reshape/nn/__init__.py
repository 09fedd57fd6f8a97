"""Tensor-parallel layers (Megatron style, explicit tp group) and a tiny GPT built from them."""

from lightning_reshape.nn.gpt import GPTConfig, TinyGPT
from lightning_reshape.nn.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    normal_init,
    reduce_from_tensor_parallel_region,
    scatter_to_tensor_parallel_region,
    set_partition_attributes,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "ColumnParallelLinear",
    "GPTConfig",
    "RowParallelLinear",
    "TinyGPT",
    "VocabParallelEmbedding",
    "copy_to_tensor_parallel_region",
    "gather_from_tensor_parallel_region",
    "normal_init",
    "reduce_from_tensor_parallel_region",
    "scatter_to_tensor_parallel_region",
    "set_partition_attributes",
    "vocab_parallel_cross_entropy",
]
