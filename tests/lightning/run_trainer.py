"""One Trainer scenario in its own process: ``python run_trainer.py '<json spec>'``.

Why a script: Lightning's CPU launcher re-runs the script for the other ranks, which must not
happen inside pytest. Rank 0 writes a JSON result (per-step global losses, final fp32
parameters, the strategy's resume report, AutoReshape's history) to ``spec["out"]``.

Spec keys: devices, strategy (registry name), parallel (mapping or None), steps (max_steps),
global_batch, ckpt_dir + ckpt_every (ModelCheckpoint every N steps: ``step=N.ckpt``), resume,
stage, save (Trainer.save_checkpoint after fit), policy (AutoReshape arguments),
forbid_reshape (make the converter raise), model ("mlp" | "gpt" | "hf_gpt2" | "pipe" |
"tied_gpt"), out, seed, auto_reshape,
frozen_tied (mlp: a frozen input projection tied to a second use, saved with the strategy's
``exclude_frozen_parameters=True`` and resumed with ``strict_loading=False``, as LoRA-style
fine-tuning of GPT-2 does).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

import lightning_reshape  # noqa: F401  (registers the deepspeed_reshape* strategy names)


class Ticks(Dataset):
    """Only paces the loop: the real batch is drawn from the global step (see ``batch_for``)."""

    def __len__(self) -> int:
        return 4096

    def __getitem__(self, i: int) -> int:
        return i


def batch_for(step: int, global_batch: int, dp_rank: int, dp: int) -> tuple[torch.Tensor, ...]:
    """This dp rank's slice of the global batch of ``step``: identical data at any layout.

    Why: Lightning's resume of a non-stateful loader replays or skips batches, which would
    hide whether the model and optimizer state continued exactly.
    """
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(global_batch, 16, generator=g)
    y = (x**2).sum(-1, keepdim=True) / 16
    micro = global_batch // dp
    rows = slice(dp_rank * micro, (dp_rank + 1) * micro)
    return x[rows], y[rows]


def tokens_for(
    step: int, global_batch: int, dp_rank: int, dp: int, seq_len: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This dp rank's token slice of the global batch of ``step`` (next-token targets)."""
    g = torch.Generator().manual_seed(2000 + step)
    ids = torch.randint(0, vocab, (global_batch, seq_len + 1), generator=g)
    micro = global_batch // dp
    rows = ids[dp_rank * micro : (dp_rank + 1) * micro]
    return rows[:, :-1], rows[:, 1:]


def make_gpt(spec: dict[str, Any]) -> Any:
    """The tiny tensor-parallel GPT, built in configure_model once the groups exist."""
    import lightning.pytorch as pl

    from lightning_reshape.nn.gpt import GPTConfig, TinyGPT

    global_batch = int(spec.get("global_batch", 8))
    config = GPTConfig(vocab_size=64, hidden=32, layers=2, heads=4, seq_len=16, ffn_hidden=64)

    class GPTModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model: Any = None
            self.losses: dict[int, float] = {}

        def configure_model(self) -> None:
            if self.model is None:
                self.model = TinyGPT(config, self.trainer.strategy.parallel_state)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            sampler = self.trainer.strategy.distributed_sampler_kwargs
            ids, targets = tokens_for(
                self.global_step,
                global_batch,
                sampler["rank"],
                sampler["num_replicas"],
                config.seq_len,
                config.vocab_size,
            )
            loss = self.model.loss(ids, targets)
            self.losses[self.global_step] = float(self.all_gather(loss.detach()).mean())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)

    return GPTModule()


def full_params(engine: Any, state: Any) -> dict[str, list[float]]:
    """Every parameter's full fp32 value, tp shards joined along their partition dim."""
    import deepspeed
    import torch.distributed as dist

    out = {}
    tp_group = state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(tp_group) if state.layout.tp > 1 else 1
    for name, p in engine.module.named_parameters():
        value = deepspeed.utils.safe_get_full_fp32_param(p)
        if value is None:  # frozen: no master
            value = p.detach().float()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(value) for _ in range(tp)]
            dist.all_gather(parts, value.contiguous(), group=tp_group)
            value = torch.cat(parts, dim=p.partition_dim)
        out[name] = value.flatten().tolist()
    return out


# a tiny Hugging Face GPT-2 (config only, nothing downloaded): tests/lightning/test_hf_export.py
HF_GPT2 = {
    "vocab_size": 64,
    "n_positions": 16,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def make_hf_gpt2(spec: dict[str, Any]) -> Any:
    """transformers' GPT2LMHeadModel as ``self.model`` of a LightningModule, as users keep it
    (built in configure_model, so ZeRO 3 partitions it as it is built)."""
    import lightning.pytorch as pl
    from transformers import GPT2Config, GPT2LMHeadModel

    global_batch = int(spec.get("global_batch", 8))
    config = GPT2Config(**HF_GPT2)

    class HFModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model: Any = None
            self.losses: dict[int, float] = {}

        def configure_model(self) -> None:
            if self.model is None:
                torch.manual_seed(0)
                self.model = GPT2LMHeadModel(config)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            sampler = self.trainer.strategy.distributed_sampler_kwargs
            ids, _ = tokens_for(
                self.global_step,
                global_batch,
                sampler["rank"],
                sampler["num_replicas"],
                config.n_positions,
                config.vocab_size,
            )
            loss = self.model(input_ids=ids, labels=ids).loss
            self.losses[self.global_step] = float(self.all_gather(loss.detach()).mean())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)

    return HFModule()


PIPE_MODELS = ("pipe", "tied_gpt")


def make_pipe(spec: dict[str, Any]) -> Any:
    """A pipeline module (tests/lightning/pipe_models.py) fed from the global step."""
    from tests.lightning.pipe_models import SEQ, VOCAB, PipeNet, TiedGPT

    global_batch = int(spec.get("global_batch", 8))
    holder: dict[str, Any] = {}

    def step_batch(step: int) -> Any:
        sampler = holder["module"].trainer.strategy.distributed_sampler_kwargs
        rank, dp = sampler["rank"], sampler["num_replicas"]
        if spec["model"] == "tied_gpt":
            return tokens_for(step, global_batch, rank, dp, SEQ, VOCAB)
        return batch_for(step, global_batch, rank, dp)

    module = (TiedGPT if spec["model"] == "tied_gpt" else PipeNet)(step_batch)
    holder["module"] = module
    return module


def state_dump(spec: dict[str, Any]) -> Any:
    """Dump every parameter's fp32 value and optimizer states (all stages) to
    ``<out>.state<step>.pt`` at ``spec["dump_step"]`` and, on a resume, at the start."""
    import lightning.pytorch as pl

    from tests.lightning.pipe_models import pipeline_state

    class Dump(pl.Callback):
        def _dump(self, trainer: Any, label: str) -> None:
            strategy = trainer.strategy
            state = pipeline_state(strategy.deepspeed_engine, strategy.parallel_state)
            if trainer.is_global_zero:
                torch.save(state, f"{spec['out']}.state{label}.pt")

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if spec.get("resume"):
                self._dump(trainer, "start")

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == spec.get("dump_step"):
                self._dump(trainer, str(trainer.global_step))

    return Dump()


def make_module(spec: dict[str, Any]) -> Any:
    import lightning.pytorch as pl

    if spec.get("model") == "gpt":
        return make_gpt(spec)
    if spec.get("model") == "hf_gpt2":
        return make_hf_gpt2(spec)
    if spec.get("model") in PIPE_MODELS:
        return make_pipe(spec)
    global_batch = int(spec.get("global_batch", 8))
    frozen_tied = bool(spec.get("frozen_tied"))

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
            )
            self.losses: dict[int, float] = {}
            if frozen_tied:
                self.inp = torch.nn.Linear(16, 16, bias=False)
                self.mix = torch.nn.Linear(16, 16, bias=False)
                self.mix.weight = self.inp.weight
                self.inp.requires_grad_(False)
                self.strict_loading = False  # the frozen weight is not in the checkpoint

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if frozen_tied:
                x = self.mix(torch.tanh(self.inp(x)))
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            sampler = self.trainer.strategy.distributed_sampler_kwargs
            dp_rank, dp = sampler["rank"], sampler["num_replicas"]
            x, y = batch_for(self.global_step, global_batch, dp_rank, dp)
            loss = torch.nn.functional.mse_loss(self(x), y)
            # The global-batch loss: mean over all ranks (tp ranks repeat their dp replica's).
            self.losses[self.global_step] = float(self.all_gather(loss.detach()).mean())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)

    return Net()


def main() -> None:
    spec = json.loads(sys.argv[1])
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_reshape.lightning import AutoReshape, ReshapeDeepSpeedStrategy

    if spec.get("forbid_reshape"):
        from lightning_reshape.checkpoint import convert

        def _forbidden(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("reshape work attempted on an unchanged layout")

        convert.plan_conversion = _forbidden  # type: ignore[assignment]
        convert.convert_checkpoint = _forbidden  # type: ignore[assignment]

    devices = int(spec["devices"])
    parallel = spec.get("parallel")
    pipe = spec.get("model") in PIPE_MODELS
    if pipe:
        strategy: Any = ReshapeDeepSpeedStrategy(
            stage=1,
            parallel=parallel,
            partition_method=spec.get("partition", "parameters"),
            micro_batches=int(spec.get("micro_batches", 2)),
        )
    elif parallel is not None or spec.get("strategy") is None:
        strategy = ReshapeDeepSpeedStrategy(
            stage=int(spec.get("stage", 2)),
            parallel=parallel,
            exclude_frozen_parameters=bool(spec.get("frozen_tied")),
        )
    else:
        strategy = spec["strategy"]
    global_batch = int(spec.get("global_batch", 8))
    model_parallel = int((parallel or {}).get("tp", 1)) * int((parallel or {}).get("pp", 1))
    dp = max(1, devices // model_parallel)  # an impossible layout must fail in the Trainer
    callbacks: list[Any] = []
    if spec.get("auto_reshape", True):
        callbacks.append(AutoReshape(**spec.get("policy", {})))
    if pipe:
        callbacks.append(state_dump(spec))
    if spec.get("ckpt_dir"):
        callbacks.append(
            ModelCheckpoint(
                dirpath=spec["ckpt_dir"],
                filename="{step}",
                every_n_train_steps=int(spec.get("ckpt_every", 4)),
                save_top_k=-1,
            )
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=int(spec["steps"]),
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        gradient_clip_val=spec.get("clip"),
        **(
            {"val_check_interval": int(spec["val_every"]), "limit_val_batches": 1}
            if spec.get("val_every")
            else {}
        ),
    )
    module = make_module(spec)
    loader = DataLoader(Ticks(), batch_size=global_batch // dp)
    val_loader = None
    if spec.get("val_every"):
        val_loader = DataLoader(Ticks(), batch_size=global_batch // dp)
    trainer.fit(module, loader, val_loader, ckpt_path=spec.get("resume"))
    if spec.get("save"):
        trainer.save_checkpoint(spec["save"])

    if pipe:
        from tests.lightning.pipe_models import pipeline_state

        state = pipeline_state(trainer.strategy.deepspeed_engine, trainer.strategy.parallel_state)
        params = {k: v["param"].flatten().tolist() for k, v in state.items()}
    else:
        params = full_params(trainer.strategy.deepspeed_engine, trainer.strategy.parallel_state)
    if trainer.is_global_zero:
        report = getattr(trainer.strategy, "last_resume", None)
        history = next((cb.history for cb in trainer.callbacks if isinstance(cb, AutoReshape)), [])
        result = {
            "losses": {str(k): v for k, v in module.losses.items()},
            "val_losses": getattr(module, "val_losses", []),
            "params": params,
            "global_step": trainer.global_step,
            "strategy": type(trainer.strategy).__name__,
            "sampler": dict(trainer.strategy.distributed_sampler_kwargs),
            "resume": None
            if report is None
            else {
                "reshaped": report.reshaped,
                "loaded_from": report.loaded_from,
                "saved": [report.saved.tp, report.saved.pp, report.saved.dp],
                "seconds": report.seconds,
            },
            "history": history,
            "lr": [g["lr"] for g in trainer.optimizers[0].param_groups],
        }
        if pipe:
            result["parts"] = [int(x) for x in trainer.strategy.pipeline.parts]
            result["clip"] = trainer.strategy.deepspeed_engine.gradient_clipping()
            result["micro_batches"] = trainer.strategy.deepspeed_engine.micro_batches
            metric = trainer.callback_metrics.get("train_loss")
            result["logged_loss"] = None if metric is None else float(metric)
        with open(spec["out"], "w", encoding="utf-8") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
    # Leave without C++ static teardown: a worker thread of the communication stack
    # occasionally aborts it ("terminate called without an active exception", rc -6) after
    # all work is done and written; see examples/train.py.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
