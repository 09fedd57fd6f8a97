"""AutoReshape: the user's say over reshaping on resume, and the run's topology history.

Why a callback and not strategy arguments: the policy belongs to the run (where copies go,
whether to keep them), the strategy to the hardware; and a callback's ``state_dict`` is the
natural place for a record that must travel inside every checkpoint. The reshape itself is
triggered by the strategy's ``load_checkpoint`` (a callback's hooks run too early or too late).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

__all__ = ["ReshapePolicy", "AutoReshape"]


@dataclass(frozen=True)
class ReshapePolicy:
    """What the strategy may do when a checkpoint was saved at another layout.

    - ``enabled``: reshape at all; when False a changed layout stops with an error.
    - ``output_dir``: where reshaped copies go (default: inside the checkpoint directory,
      ``X.ckpt/reshaped-tp1-pp1-dp2-zero2/``); the original files are never touched.
    - ``keep_old``: keep earlier reshaped copies of the same checkpoint. By default (False)
      only the newest stays: older ones (only finished folders named ``reshaped-*`` that we
      wrote) are deleted once the new copy is loaded, except copies another job is loading or
      writing at that moment (every rank holds a shared lock on a copy while it loads it; see
      ``checkpoint/copies.py``). The log says where copies go and their size on disk.
    - ``verify``: compare the fresh reshaped copy with the original, tensor by tensor, bit for
      bit, before loading it (reads both checkpoints once more; off by default).
    - ``trust_checkpoint``: allow arbitrary pickled types when reading the source.
    - ``workers``: reader/writer threads per rank for the reshape.
    - ``tp_rules``: passed to the converter for parameters without recorded split info.
    - ``direct``: load straight into the engine and write no copy (the default): DeepSpeed's
      own load runs on the reshape plan, each rank reading only the source slices it needs,
      bit for bit what loading a reshaped copy gives, for every change the copy covers (tp,
      pp, dp, ZeRO stage). False: always write a reshaped copy and load it. Engines whose load
      reads files itself (universal checkpoints, NVMe optimizer offload, MoE, ZeRO 3 outside
      fitting) take the copy, with a log line saying why.
    """

    enabled: bool = True
    output_dir: str | None = None
    keep_old: bool = False
    verify: bool = False
    trust_checkpoint: bool = False
    workers: int = 1
    tp_rules: Sequence[Any] | None = None
    direct: bool = True


@dataclass
class _Entry:
    tp: int
    pp: int
    dp: int
    world_size: int
    zero_stage: int
    global_step: int


class AutoReshape(Callback):
    """Policy for resuming at a different layout plus the run's topology history.

    The history (``self.history``, saved in the checkpoint) gains one entry
    ``{tp, pp, dp, world_size, zero_stage, global_step}`` each time training starts.
    """

    def __init__(
        self,
        enabled: bool = True,
        output_dir: str | os.PathLike[str] | None = None,
        keep_old: bool = False,
        verify: bool = False,
        trust_checkpoint: bool = False,
        workers: int = 1,
        tp_rules: Sequence[Any] | None = None,
        direct: bool = True,
    ) -> None:
        self.policy = ReshapePolicy(
            enabled=enabled,
            output_dir=None if output_dir is None else os.fspath(output_dir),
            keep_old=keep_old,
            verify=verify,
            trust_checkpoint=trust_checkpoint,
            workers=workers,
            tp_rules=tp_rules,
            direct=direct,
        )
        self.history: list[dict[str, int]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the layout this (possibly resumed) run starts at; history is restored by now."""
        layout = getattr(trainer.strategy, "layout", None)
        zero_stage = getattr(trainer.strategy, "current_zero_stage", None)
        if layout is None:
            return
        entry = asdict(
            _Entry(
                tp=layout.tp,
                pp=layout.pp,
                dp=layout.dp,
                world_size=layout.world_size,
                zero_stage=int(zero_stage or 0),
                global_step=trainer.global_step,
            )
        )
        if not self.history or self.history[-1] != entry:
            self.history.append(entry)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(e) for e in self.history]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.history = [dict(e) for e in state_dict.get("history", [])]

    def __repr__(self) -> str:
        return f"AutoReshape({self.policy})"


def find_policy(callbacks: Sequence[Callback]) -> tuple[ReshapePolicy, AutoReshape | None]:
    """The policy of the first AutoReshape in ``callbacks``, or the default one."""
    for cb in callbacks:
        if isinstance(cb, AutoReshape):
            return cb.policy, cb
    return ReshapePolicy(), None
