"""Pipeline glue without processes: topology translation both ways, micro-batch cutting."""

from __future__ import annotations

import pytest
import torch
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, ProcessTopology

from lightning_reshape.errors import TopologyError
from lightning_reshape.lightning.pipeline import (
    config_from_topology,
    deepspeed_topology,
    micro_batches_of,
)
from lightning_reshape.topology import ParallelConfig


@pytest.mark.parametrize(
    "topology",
    [
        PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=3),
        ProcessTopology(axes=["data", "pipe", "model"], dims=[3, 2, 2]),
        ProcessTopology(axes=["pipe", "model", "data"], dims=[2, 2, 3]),
    ],
)
def test_topology_round_trip_places_every_rank_alike(topology: ProcessTopology) -> None:
    """A DeepSpeed topology -> ParallelConfig -> our layout -> DeepSpeed topology: every rank
    keeps its (pipe, data, model) coordinate, and our groups hold the same ranks."""
    config = config_from_topology(topology)
    assert (config.tp, config.pp, config.dp) == (2, 2, 3)
    layout = config.resolve(12)
    ours = deepspeed_topology(layout)
    for rank in range(12):
        coord = topology.get_coord(rank)
        assert ours.get_coord(rank) == coord
        for axis, token in (("pipe", "pp"), ("data", "dp"), ("model", "tp")):
            peers = sorted(layout.group_of(rank, token))
            want = next(g for g in topology.get_axis_comm_lists(axis) if rank in g)
            assert peers == sorted(want), (rank, axis)


def test_default_order_is_deepspeeds_pipe_data_model() -> None:
    layout = ParallelConfig(tp=2, pp=2).resolve(8)
    assert deepspeed_topology(layout).get_axis_names() == ["pipe", "data", "model"]


def test_bad_topology_axes_are_named() -> None:
    with pytest.raises(TopologyError, match="'expert' is not one of"):
        config_from_topology(ProcessTopology(axes=["pipe", "expert"], dims=[2, 2]))


def test_micro_batches_cut_inputs_and_labels() -> None:
    x, y = torch.arange(12).view(6, 2), (torch.zeros(6), torch.ones(6))
    parts = micro_batches_of((x, y), 3)
    assert [p[0].tolist() for p in parts] == [
        [[0, 1], [2, 3]],
        [[4, 5], [6, 7]],
        [[8, 9], [10, 11]],
    ]
    assert all(isinstance(p[1], tuple) and p[1][1].shape == (2,) for p in parts)
    with pytest.raises(TopologyError, match="does not split into 4 micro-batches"):
        micro_batches_of((x, x), 4)


def test_pp_without_the_layer_list_is_refused_naming_the_hook() -> None:
    from lightning_reshape.lightning import ReshapeDeepSpeedStrategy

    strategy = ReshapeDeepSpeedStrategy(stage=1, parallel={"pp": 2})
    strategy.layout = strategy.parallel.resolve(2)
    with pytest.raises(TopologyError, match=r"implement configure_pipeline\(\)"):
        strategy._refuse_pipeline()


def test_topology_and_parallel_are_exclusive() -> None:
    from lightning_reshape.lightning import ReshapeDeepSpeedStrategy

    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=1, num_dp=2)
    assert ReshapeDeepSpeedStrategy(topology=topo).parallel.pp == 2
    with pytest.raises(TopologyError, match="not both"):
        ReshapeDeepSpeedStrategy(topology=topo, parallel={"pp": 2})
