"""Train the tiny tensor-parallel GPT with lightning-reshape's strategy, from Hydra configs.

    python examples/train.py                                   # dp only, 2 CPU processes
    python examples/train.py parallel=tp2 save_path=runs/a.ckpt
    python examples/train.py parallel=dp_only ckpt_path=runs/a.ckpt trainer.max_steps=40
    python examples/train.py trainer.strategy=deepspeed_reshape  # the registered name
    python examples/train.py model=pipeline_gpt parallel=tp2_pp2 trainer.devices=4 \
        strategy.micro_batches=2 save_path=runs/p.ckpt            # DeepSpeed's pipeline engine
    python examples/train.py model=pipeline_gpt parallel=dp_only trainer.devices=4 \
        strategy.micro_batches=2 ckpt_path=runs/p.ckpt            # resumed at pp 1, dp 4

Resuming at another layout reshapes the checkpoint on the fly (see the log line
"lightning-reshape: ... reshaped ..."). The configs come from the installed package
(``lightning_reshape/configs``, also reachable from any Hydra app through our plugin).
"""

from __future__ import annotations

import json
import os
import sys

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

import lightning_reshape  # noqa: F401  (registers strategy="deepspeed_reshape")
from lightning_reshape.errors import ReshapeError


@hydra.main(config_path="pkg://lightning_reshape.configs", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ReshapeError as exc:  # a layout or checkpoint we refuse: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)


def run(cfg: DictConfig) -> None:
    pl.seed_everything(cfg.seed, workers=True)
    model = instantiate(cfg.model)
    data = instantiate(cfg.data)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[instantiate(cfg.callbacks)])
    trainer.fit(model, datamodule=data, ckpt_path=cfg.ckpt_path)
    if cfg.save_path:
        trainer.save_checkpoint(cfg.save_path)
    summary = {
        "layout": trainer.strategy.layout.describe() if trainer.strategy.layout else None,
        "resumed_from": cfg.ckpt_path,
        "resume": str(getattr(trainer.strategy, "last_resume", None) or "not resumed"),
        "reshaped": bool(getattr(getattr(trainer.strategy, "last_resume", None), "reshaped", 0)),
        "losses": model.losses,
    }
    if trainer.is_global_zero and os.environ.get("LIGHTNING_RESHAPE_SUMMARY"):
        with open(os.environ["LIGHTNING_RESHAPE_SUMMARY"], "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main()
    # Everything is saved and reported by now. Skip the interpreter's C++ teardown, where a
    # thread of the communication stack occasionally aborts the process ("terminate called
    # without an active exception", exit -6) on CPU/gloo; errors above still exit non-zero.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
