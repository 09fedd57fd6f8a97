"""Our rank grids against the installed peers: Megatron-core and DeepSpeed."""

from __future__ import annotations

import itertools
import os

import pytest
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, ProcessTopology
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_reshape.errors import TopologyError
from lightning_reshape.topology import ParallelConfig, Topology

from .megatron_oracle import RankGenerator, megatron_view

AXES = ("tp", "cp", "ep", "dp", "pp")
small = st.sampled_from([1, 1, 2, 3, 4])
#: Raise for a deeper search, e.g. TOPOLOGY_EXAMPLES=5000.
EXAMPLES = int(os.environ.get("TOPOLOGY_EXAMPLES", "150"))


def _tokens(names: tuple[str, ...]) -> list[str]:
    """Every non-empty combination of axes, spelled in the grid's order."""
    return ["-".join(c) for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


@st.composite
def dense_layouts(draw: st.DrawFn) -> tuple[dict[str, int], str]:
    sizes = {a: draw(small) for a in AXES}
    if sizes["ep"] > 1 and sizes["cp"] > 1:
        sizes[draw(st.sampled_from(["ep", "cp"]))] = 1
    order = "-".join(draw(st.permutations(AXES)))
    return sizes, order


@settings(max_examples=EXAMPLES, deadline=None)
@given(dense_layouts())
def test_every_token_matches_megatron_rank_generator(layout: tuple[dict[str, int], str]) -> None:
    sizes, order = layout
    ours = Topology.from_order(order.split("-"), sizes)
    theirs = RankGenerator(order=order, **sizes)
    for token in _tokens(tuple(order.split("-"))):
        expected = theirs.get_ranks(token)
        assert ours.groups(token) == expected, token
        for group in expected[:: max(1, len(expected) // 3)]:
            for rank in group:
                assert ours.group_of(rank, token) == group


@settings(max_examples=100, deadline=None)
@given(dense_layouts(), st.data())
def test_rank_and_coordinates_round_trip(layout: tuple[dict[str, int], str], data) -> None:
    sizes, order = layout
    grid = Topology.from_order(order.split("-"), sizes)
    rank = data.draw(st.integers(0, grid.world_size - 1))
    coords = grid.coords(rank)
    assert grid.rank(**coords) == rank
    assert all(0 <= coords[a] < sizes[a] for a in AXES)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([1, 2, 3, 4]), min_size=1, max_size=4),
    st.data(),
)
def test_matches_deepspeed_process_topology(dims: list[int], data) -> None:
    axes = [f"a{i}" for i in range(len(dims))]
    theirs = ProcessTopology(axes=axes, dims=dims)
    ours = Topology.from_deepspeed_axes(axes, dims)
    for axis in axes:
        assert ours.groups(axis) == theirs.get_axis_comm_lists(axis)
    rank = data.draw(st.integers(0, ours.world_size - 1))
    assert ours.coords(rank) == theirs.get_coord(rank)._asdict()
    assert theirs.get_rank(**ours.coords(rank)) == rank


@pytest.mark.parametrize("pp,tp,dp", [(2, 2, 2), (4, 2, 1), (1, 4, 2), (3, 2, 2)])
def test_megatron_default_order_is_deepspeed_pipe_model_data(pp: int, tp: int, dp: int) -> None:
    """DeepSpeed's (pipe, data, model) is Megatron's tp-dp-pp read backwards."""
    ds = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    layout = ParallelConfig(tp=tp, pp=pp).resolve(pp * tp * dp)
    assert layout.groups("pp") == ds.get_axis_comm_lists("pipe")
    assert layout.groups("dp") == ds.get_axis_comm_lists("data")
    assert layout.groups("tp") == ds.get_axis_comm_lists("model")


@st.composite
def any_config(draw: st.DrawFn) -> tuple[int, int, ParallelConfig]:
    tp, pp, cp, ep = (draw(st.sampled_from([1, 1, 2, 3, 4])) for _ in range(4))
    etp = draw(st.sampled_from([None, None, 1, 2, 4]))
    vpp = draw(st.sampled_from([None, None, 2]))
    axes = list(draw(st.permutations(AXES)))
    # Sometimes leave an axis out of the order: Megatron must then refuse sizes above 1.
    if draw(st.booleans()):
        axes.remove(draw(st.sampled_from(axes)))
    world = draw(st.sampled_from([1, 2, 4, 6, 8, 12, 16, 24, 32, 48]))
    rank = draw(st.integers(0, world - 1))
    config = ParallelConfig(tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, vpp=vpp, order="-".join(axes))
    return world, rank, config


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(any_config())
def test_refuses_exactly_what_megatron_refuses_and_builds_the_same_groups(case) -> None:
    world, rank, config = case
    view = megatron_view(
        world,
        rank,
        tp=config.tp,
        pp=config.pp,
        cp=config.cp,
        ep=config.ep,
        etp=config.etp,
        vpp=config.vpp,
        order=config.order,
    )
    try:
        layout = config.resolve(world)
    except TopologyError as err:
        ours: TopologyError | None = err
    else:
        ours = None
    if config.ep > 1 and config.cp > 1:
        # Our one extra rule (Megatron's RankGenerator forbids it too, inside one grid).
        assert ours is not None
        return
    assert (ours is None) == (view.error is None), (ours, view.error)
    if ours is not None:
        return
    for kind, expected in view.groups.items():
        mine = layout.group_of(rank, kind)
        # Megatron's process groups list their ranks sorted; its embedding list is exact.
        assert (mine if kind == "embedding" else sorted(mine)) == expected, kind


def test_group_of_does_not_enumerate_the_world() -> None:
    """A rank's own groups at a million ranks come back at once, without building lists."""
    layout = ParallelConfig(tp=8, pp=8, cp=2).resolve(1 << 20)
    group = layout.group_of(123_457, "dp")
    assert len(group) == (1 << 20) // 128
    assert 123_457 in group
    assert layout.dense.coords(group[1])["dp"] == layout.dense.coords(group[0])["dp"] + 1
