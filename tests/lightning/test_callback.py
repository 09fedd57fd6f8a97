"""AutoReshape's policy and record, and the strategy's argument checks (no Trainer needed)."""

from __future__ import annotations

import pytest

from lightning_reshape.errors import TopologyError
from lightning_reshape.lightning import AutoReshape, ReshapeDeepSpeedStrategy, ReshapePolicy
from lightning_reshape.lightning.callback import find_policy
from lightning_reshape.topology import ParallelConfig


def test_history_round_trips_through_state_dict() -> None:
    cb = AutoReshape()
    cb.history = [{"tp": 1, "pp": 1, "dp": 2, "world_size": 2, "zero_stage": 1, "global_step": 0}]
    restored = AutoReshape()
    restored.load_state_dict(cb.state_dict())
    assert restored.history == cb.history
    assert restored.history is not cb.history


def test_policy_defaults_without_callback() -> None:
    policy, cb = find_policy([])
    assert cb is None and policy == ReshapePolicy()
    assert policy.enabled and not policy.keep_old and not policy.verify
    assert policy.output_dir is None
    mine = AutoReshape(enabled=False, output_dir="/x", keep_old=False, verify=True)
    policy, cb = find_policy([mine])
    assert cb is mine and policy == ReshapePolicy(False, "/x", False, True)


def test_strategy_takes_parallel_config_or_mapping() -> None:
    assert ReshapeDeepSpeedStrategy(parallel={"tp": 2}).parallel == ParallelConfig(tp=2)
    assert ReshapeDeepSpeedStrategy().parallel == ParallelConfig()
    strategy = ReshapeDeepSpeedStrategy(stage=3, parallel=ParallelConfig(tp=2, dp="auto"))
    assert strategy.zero_stage_3 and strategy.parallel.tp == 2
    with pytest.raises(TopologyError, match="neither a ParallelConfig nor a mapping"):
        ReshapeDeepSpeedStrategy(parallel=[2, 1])  # type: ignore[arg-type]
