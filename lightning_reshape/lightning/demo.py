"""The example's model and data: a tiny tensor-parallel GPT on tokens generated at run time.

Why in the package: the shipped Hydra configs (``model/tiny_gpt``, ``data/synthetic``) name
these classes by ``_target_``, so they must import from an installed wheel, and the tests
train them. The data is a fixed seeded Markov chain over the vocabulary, so a loss that
falls means the model learns something, and the same seed gives the same tokens anywhere.
The global batch stays fixed whatever the data-parallel size, so a run resumed at another
layout sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset

from lightning_reshape.errors import TopologyError
from lightning_reshape.lightning.pipeline import (
    PipelineLayers,
    PipelineLightningModule,
    pipeline_step,
)


def markov_tokens(num_sequences: int, length: int, vocab_size: int, seed: int) -> torch.Tensor:
    """``num_sequences`` token sequences from a fixed random sparse transition table."""
    gen = torch.Generator().manual_seed(seed)
    # Each token has 4 likely successors: learnable, but not trivially.
    successors = torch.randint(0, vocab_size, (vocab_size, 4), generator=gen)
    tokens = torch.empty(num_sequences, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab_size, (num_sequences,), generator=gen)
    for t in range(1, length):
        choice = torch.randint(0, 4, (num_sequences,), generator=gen)
        tokens[:, t] = successors[tokens[:, t - 1], choice]
    return tokens


class StepBatches(IterableDataset):
    """This rank's sequences, step by step: step ``s`` is rows ``[s*G, s*G + G)`` (mod the
    number of sequences) and data-parallel rank ``r`` of ``dp`` takes its ``G/dp`` of them;
    batch them with ``DataLoader(batch_size=G/dp)``.

    Why not a sampler: the batch a step sees then depends only on the step, never on how
    the loader was iterated before, so a run resumed at step ``s`` (at any layout) sees
    exactly the batches a run that never stopped would have seen.
    """

    def __init__(
        self, tokens: torch.Tensor, global_batch: int, start_step: int, rank: int, dp: int
    ) -> None:
        self.tokens = tokens
        self.global_batch = global_batch
        self.start_step = start_step
        self.micro = global_batch // dp
        self.offset = rank * self.micro

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = len(self.tokens)
        step = self.start_step
        while True:
            first = step * self.global_batch + self.offset
            for row in range(first, first + self.micro):
                yield self.tokens[row % n]
            step += 1


class SyntheticTokens(pl.LightningDataModule):
    """Sequences of ``seq_len + 1`` tokens; each data-parallel rank loads its share of a
    fixed global batch (``global_batch_size / dp``), chosen by global step."""

    def __init__(
        self,
        num_sequences: int = 256,
        seq_len: int = 32,
        vocab_size: int = 128,
        global_batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_sequences = num_sequences
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.tokens: torch.Tensor | None = None

    def setup(self, stage: str) -> None:
        self.tokens = markov_tokens(
            self.num_sequences, self.seq_len + 1, self.vocab_size, self.seed
        )

    def train_dataloader(self) -> DataLoader:
        assert self.tokens is not None
        trainer = self.trainer
        assert trainer is not None, "SyntheticTokens is meant to be used by a Trainer"
        shard = trainer.strategy.distributed_sampler_kwargs or {}
        dp, rank = shard.get("num_replicas", 1), shard.get("rank", 0)
        if self.global_batch_size % dp:
            raise TopologyError(
                f"data.global_batch_size={self.global_batch_size} does not split over dp={dp} "
                f"ranks; choose a multiple of {dp}."
            )
        # The trainer has restored global_step from the checkpoint before asking for data.
        batches = StepBatches(self.tokens, self.global_batch_size, trainer.global_step, rank, dp)
        return DataLoader(batches, batch_size=batches.micro)


class TinyGPTModule(pl.LightningModule):
    """Trains ``lightning_reshape.nn``'s tiny GPT; the model is built in ``configure_model``
    on the strategy's tensor-parallel group, so one config serves every layout."""

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        seq_len: int = 32,
        lr: float = 3e-3,
        optimizer: str = "adamw",
        seed: int = 0,
        log_every_n_steps: int = 5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: torch.nn.Module | None = None
        self.losses: list[tuple[int, float]] = []

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from lightning_reshape.nn.gpt import GPTConfig, TinyGPT

        h = self.hparams
        state = getattr(self.trainer.strategy, "parallel_state", None)
        if state is None:
            raise TopologyError(
                "TinyGPTModule needs the tensor-parallel group of lightning-reshape's strategy; "
                "train it with strategy=deepspeed_reshape (or ReshapeDeepSpeedStrategy)."
            )
        config = GPTConfig(
            vocab_size=h.vocab_size,
            hidden=h.hidden_size,
            layers=h.num_layers,
            heads=h.num_heads,
            seq_len=h.seq_len,
            seed=h.seed,
        )
        self.model = TinyGPT(config, state)

    def training_step(self, tokens: torch.Tensor, batch_idx: int) -> torch.Tensor:
        assert self.model is not None
        loss = self.model.loss(tokens[:, :-1], tokens[:, 1:])
        # The loss is the same on every rank of a tp group; average it over dp for the log.
        global_loss = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")
        step = self.global_step + 1
        self.losses.append((step, float(global_loss)))
        every = self.hparams.log_every_n_steps
        if every and step % every == 0:
            rank_zero_info(f"step {step:>4}  loss {float(global_loss):.4f}")
        self.log("train_loss", global_loss, prog_bar=True, rank_zero_only=True)
        return loss

    def configure_optimizers(self) -> Any:
        kinds = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
        if self.hparams.optimizer not in kinds:
            raise ValueError(
                f"model.optimizer={self.hparams.optimizer!r}; choose one of {', '.join(kinds)}"
            )
        return kinds[self.hparams.optimizer](self.parameters(), lr=self.hparams.lr)


class PipelineGPTModule(PipelineLightningModule):
    """The same tiny GPT as DeepSpeed pipeline layers (untied head), trained by the pipeline
    engine at any (tp, pp, dp): ``model=pipeline_gpt parallel=tp2_pp2`` in the example."""

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        seq_len: int = 32,
        lr: float = 3e-3,
        optimizer: str = "adamw",
        seed: int = 0,
        log_every_n_steps: int = 5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.losses: list[tuple[int, float]] = []

    def configure_pipeline(self) -> PipelineLayers:
        from lightning_reshape.nn.gpt import GPTConfig, VocabParallelLoss, gpt_pipeline_layers

        h = self.hparams
        state = getattr(self.trainer.strategy, "parallel_state", None)
        if state is None:
            raise TopologyError(
                "PipelineGPTModule needs lightning-reshape's strategy; train it with "
                "strategy=deepspeed_reshape_stage_1 (or ReshapeDeepSpeedStrategy(stage=1))."
            )
        config = GPTConfig(
            vocab_size=h.vocab_size,
            hidden=h.hidden_size,
            layers=h.num_layers,
            heads=h.num_heads,
            seq_len=h.seq_len,
            tie_embeddings=False,
            seed=h.seed,
        )
        return PipelineLayers(
            gpt_pipeline_layers(config, state),
            VocabParallelLoss(state),
            split_batch=_next_token_pair,
        )

    def training_step(self, tokens: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = pipeline_step(self, tokens)  # the same on every rank: dp-averaged
        step = self.global_step + 1
        self.losses.append((step, float(loss)))
        every = self.hparams.log_every_n_steps
        if every and step % every == 0:
            rank_zero_info(f"step {step:>4}  loss {float(loss):.4f}")
        self.log("train_loss", loss, prog_bar=True, rank_zero_only=True)
        return loss

    configure_optimizers = TinyGPTModule.configure_optimizers


def _next_token_pair(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tokens[:, :-1], tokens[:, 1:]
