"""ParallelConfig explains every mistake: each message names the value and the fix."""

from __future__ import annotations

import pytest

from lightning_reshape.errors import ReshapeError, TopologyError
from lightning_reshape.topology import ParallelConfig


@pytest.mark.parametrize(
    "config,world,message",
    [
        (ParallelConfig(tp=4), 6, "world size 6 is not divisible by tp\\*cp\\*pp"),
        (ParallelConfig(tp=2, dp=3), 8, "dp=3 does not fit.*set dp=4 or dp=auto"),
        (ParallelConfig(ep=2, cp=2), 8, "ep=2 and cp=2 are both above 1"),
        (ParallelConfig(pp=2, order="tp-dp"), 4, "leaves out 'pp' but pp=2"),
        (ParallelConfig(order="tp-dq-pp"), 4, "unknown axis 'dq'"),
        (ParallelConfig(order="tp-tp-dp"), 4, "names 'tp' twice"),
        (ParallelConfig(vpp=2), 4, "vpp=2 needs pipeline parallelism"),
        (ParallelConfig(tp=0), 4, "tp=0 is below 1"),
        (ParallelConfig(tp="2"), 4, "tp='2' is not an integer"),  # type: ignore[arg-type]
        (ParallelConfig(dp="many"), 4, "neither an integer nor 'auto'"),
        (ParallelConfig(tp=2, ep=3), 8, "not divisible by etp\\*ep\\*pp"),
        (
            ParallelConfig(tp=2, pp=2, ep=4, etp=1, order="tp-pp-ep-dp"),
            16,
            "does not end in 'pp'",
        ),
        (
            ParallelConfig(tp=2, pp=2, ep=2, etp=1, order="tp-pp-ep-dp"),
            16,
            "different pipeline groups",
        ),
    ],
)
def test_each_mistake_is_named(config: ParallelConfig, world: int, message: str) -> None:
    with pytest.raises(TopologyError, match=message) as info:
        config.resolve(world)
    assert isinstance(info.value, ReshapeError) and isinstance(info.value, ValueError)


def test_auto_and_explicit_dp_agree() -> None:
    auto = ParallelConfig(tp=2, pp=2).resolve(16)
    explicit = ParallelConfig(tp=2, pp=2, dp=4).resolve(16)
    assert auto.dp == explicit.dp == 4
    assert auto.all_groups() == explicit.all_groups()
    assert auto.etp == 2 and auto.edp == 4


def test_expert_grid_sizes() -> None:
    layout = ParallelConfig(tp=2, pp=2, ep=4, etp=1).resolve(32)
    assert (layout.dp, layout.edp) == (8, 4)
    assert len(layout.group_of(0, "ep")) == 4
    assert len(layout.group_of(0, "edp")) == 4
    assert layout.group_of(0, "etp") == [0]


def test_describe_names_only_axes_above_one() -> None:
    assert ParallelConfig().resolve(2).describe() == "world 2: dp=2"
    assert ParallelConfig().resolve(1).describe() == "world 1: a single rank, no parallel axis"
    assert ParallelConfig(tp=2).resolve(2).describe() == "world 2: tp=2"
    assert (
        ParallelConfig(tp=2, pp=2).resolve(8).describe()
        == "world 8: tp=2 pp=2 dp=2 order=tp-cp-ep-dp-pp"
    )
    assert ParallelConfig(ep=2).resolve(4).describe().startswith("world 4: dp=4 ep=2 edp=2")
