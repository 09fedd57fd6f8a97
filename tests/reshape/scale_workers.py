"""Distributed worker for the scale benchmark's check: a real pipeline GPT checkpoint.

Why: ``benchmarks/scale.py`` synthesizes the manifest of a 175B GPT saved by DeepSpeed's pipeline
engine (Megatron-style tp splits, bf16 with fp32 gradient accumulation at ZeRO 1, i.e.
DeepSpeed's BF16_Optimizer) without writing any data. The synthesis is only worth its numbers
if, at a tiny size, it equals what ``read_manifest`` reads from files DeepSpeed itself wrote for
the same model shape and layout. This worker writes those files with the project's own pipeline
GPT (``lightning_reshape.nn.gpt.gpt_pipeline_layers``) and the sidecar the strategy would write.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_reshape.checkpoint.sidecar import Sidecar, TPSplit, write_sidecar
from lightning_reshape.nn.gpt import GPTConfig, VocabParallelLoss, gpt_pipeline_layers

TAG = "global_step1"


@dataclass(frozen=True)
class GPTRun:
    """One save: layout, model size (``GPTConfig`` fields) and DeepSpeed config knobs."""

    name: str
    tp: int
    pp: int
    vocab: int = 32
    hidden: int = 16
    layers: int = 3
    heads: int = 2
    seq: int = 8
    ffn: int = 32
    steps: int = 1
    micro_batch: int = 2
    grad_accum: int = 1

    def config(self) -> GPTConfig:
        return GPTConfig(
            vocab_size=self.vocab,
            hidden=self.hidden,
            layers=self.layers,
            heads=self.heads,
            seq_len=self.seq,
            ffn_hidden=self.ffn,
            tie_embeddings=False,
        )

    def ds_config(self) -> dict[str, Any]:
        """The Megatron-DeepSpeed recipe: bf16, fp32 gradient accumulation, ZeRO 1."""
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": 1.0,
            "bf16": {"enabled": True},
            "data_types": {"grad_accum_dtype": "fp32"},
            "zero_optimization": {"stage": 1},
            "steps_per_print": 10**9,
        }


def _tp_group(topo: Any) -> Any:
    """This rank's tensor-parallel group (the topology's "model" axis); every rank creates all."""
    mine = None
    for ranks in topo.get_axis_comm_lists("model"):
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


def _splits(engine: Any) -> dict[str, TPSplit | None]:
    """Every stage's tp splits, from the Megatron attributes (what the strategy records)."""
    mine = {
        n: TPSplit(int(p.partition_dim), int(getattr(p, "partition_stride", 1)))
        if getattr(p, "tensor_model_parallel", False)
        else None
        for n, p in engine.module.named_parameters()
    }
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def save_worker(rank: int, world: int, out_dir: str, runs: list[GPTRun]) -> dict[str, list[int]]:
    """Train each run a few steps with DeepSpeed's pipeline engine and save it; return each
    run's stage boundaries (``PipelineModule.parts``)."""
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    parts: dict[str, list[int]] = {}
    for run in runs:
        torch.manual_seed(0)
        topo = PipeModelDataParallelTopology(
            num_pp=run.pp, num_mp=run.tp, num_dp=world // (run.pp * run.tp)
        )
        group = _tp_group(topo)
        model = PipelineModule(
            layers=gpt_pipeline_layers(run.config(), group),
            topology=topo,
            loss_fn=VocabParallelLoss(group),
            partition_method="parameters",
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=run.ds_config())
        for step in range(run.steps):
            batches = []
            for i in range(run.grad_accum):
                gen = torch.Generator().manual_seed(100 * step + i)
                ids = torch.randint(0, run.vocab, (run.micro_batch, run.seq), generator=gen)
                batches.append((ids, ids))
            engine.train_batch(iter(batches))
        save_dir = os.path.join(out_dir, run.name)
        engine.save_checkpoint(save_dir, tag=TAG, client_state={"epoch": 1})
        splits = _splits(engine)
        if rank == 0:
            dp = world // (run.pp * run.tp)
            write_sidecar(os.path.join(save_dir, TAG), Sidecar(run.tp, run.pp, dp, 1, splits))
        parts[run.name] = [int(x) for x in engine.module.parts]
        dist.barrier()
        del engine, model, opt
        gc.collect()
    return parts
