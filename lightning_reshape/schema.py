"""Structured-config schemas for Hydra: typos and wrong types in YAML fail at start-up.

Each YAML file of ``configs/parallel`` and ``configs/callbacks`` extends one of these
schemas through its defaults list, so ``parallel.tpp=2`` or ``parallel.tp=two`` is refused
by Hydra with its own message before any process is launched. Imports nothing heavy: the
Hydra plugin imports this module in every Hydra app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ParallelSchema:
    """Fields of ``lightning_reshape.topology.ParallelConfig`` (dp: an int or "auto")."""

    _target_: str = "lightning_reshape.topology.ParallelConfig"
    tp: int = 1
    pp: int = 1
    dp: Any = "auto"
    cp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # noqa: UP045 - OmegaConf needs typing.Optional
    vpp: Optional[int] = None  # noqa: UP045
    order: str = "tp-cp-ep-dp-pp"


@dataclass
class AutoReshapeSchema:
    """Fields of the ``AutoReshape`` callback: the reshape policy."""

    _target_: str = "lightning_reshape.lightning.AutoReshape"
    enabled: bool = True
    output_dir: Optional[str] = None  # noqa: UP045 - default: beside the checkpoint
    keep_old: bool = False  # only the newest reshaped copy stays
    verify: bool = False
    trust_checkpoint: bool = False
    workers: int = 1
    direct: bool = True  # load straight into the engine, no copy (False: write a reshaped copy)


def register_schemas(store: ConfigStore | None = None) -> None:
    """Register the schemas as ``parallel/schema`` and ``callbacks/auto_reshape_schema``."""
    store = store or ConfigStore.instance()
    store.store(group="parallel", name="schema", node=ParallelSchema)
    store.store(group="callbacks", name="auto_reshape_schema", node=AutoReshapeSchema)
