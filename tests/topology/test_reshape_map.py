"""Reshape maps: exact tiling for any old/new degrees, and agreement with DeepSpeed's map."""

from __future__ import annotations

import pytest
from deepspeed.checkpoint.reshape_meg_2d import reshape_meg_2d_parallel
from deepspeed.runtime.utils import partition_uniform
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_reshape.errors import TopologyError
from lightning_reshape.topology import Degrees, model_parallel_map, overlaps, shard_map
from lightning_reshape.topology.reshape_map import (
    even_boundaries,
    padded_boundaries,
    pp_map,
    tp_map,
    uniform_boundaries,
)

degrees = st.integers(1, 9)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 500), degrees, degrees)
def test_segments_tile_every_new_piece_and_use_every_old_element_once(
    extent: int, old_parts: int, new_parts: int
) -> None:
    old = padded_boundaries(extent, old_parts)
    new = padded_boundaries(extent, new_parts)
    source = list(range(extent))
    olds = [source[old[i] : old[i + 1]] for i in range(old_parts)]
    rebuilt = []
    for j, segments in enumerate(overlaps(old, new)):
        piece = []
        for s in segments:
            assert s.new_offset == len(piece)
            piece += olds[s.old_index][s.old_offset : s.old_offset + s.length]
        assert piece == source[new[j] : new[j + 1]]
        rebuilt += piece
    assert rebuilt == source


@pytest.mark.parametrize(
    "old,new,expected",
    [
        (3, 2, [[0, 1], [1, 2]]),  # dp 3 -> 2: the middle rank is shared
        (2, 3, [[0], [0, 1], [1]]),  # dp 2 -> 3
        (4, 2, [[0, 1], [2, 3]]),  # tp 4 -> 2
        (2, 4, [[0], [0], [1], [1]]),  # tp 2 -> 4
        (1, 3, [[0], [0], [0]]),
    ],
)
def test_non_dividing_and_growing_ratios(old: int, new: int, expected: list[list[int]]) -> None:
    assert tp_map(old, new) == expected


def test_pp_three_to_two_over_layers() -> None:
    # 6 layers: old stages own [0,2) [2,4) [4,6); new stages own [0,3) [3,6).
    assert pp_map(3, 2, 6) == [[0, 1], [1, 2]]
    # 7 layers, uneven: old [0,3) [3,5) [5,7); new [0,4) [4,7).
    assert pp_map(3, 2, 7) == [[0, 1], [1, 2]]
    assert pp_map(1, 3, 7) == [[0], [0], [0]]


@pytest.mark.parametrize("count,parts", [(7, 3), (8, 4), (2, 5), (13, 4), (1, 1), (96, 7)])
def test_uniform_boundaries_match_deepspeed_pipeline_partition(count: int, parts: int) -> None:
    assert uniform_boundaries(count, parts) == partition_uniform(count, parts)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@pytest.mark.parametrize("old_pp", [1, 2, 4, 6])
@pytest.mark.parametrize("old_tp", [1, 2, 4, 8])
def test_agrees_with_deepspeed_reshape_meg_2d_wherever_it_works(old_pp: int, old_tp: int) -> None:
    layers = 12 * old_pp
    for new_pp in _divisors(old_pp):
        for new_tp in _divisors(old_tp):
            theirs = reshape_meg_2d_parallel(old_pp, old_tp, new_pp, new_tp)
            ours = model_parallel_map(
                Degrees(tp=old_tp, pp=old_pp), Degrees(tp=new_tp, pp=new_pp), layers
            )
            for (p, t), olds in ours.items():
                assert [op * old_tp + ot for op, ot in olds] == theirs.get_data(p, t)


def test_shard_map_round_trip_covers_everything() -> None:
    """tp 4 -> 2 -> 4 with dp 3 -> 2: every old shard is read by some new shard and back."""
    a, b = Degrees(tp=4, pp=3, dp=3), Degrees(tp=2, pp=2, dp=2)
    forward = shard_map(a, b, num_layers=6)
    assert {s for olds in forward.values() for s in olds} == {
        (t, p, d) for t in range(4) for p in range(3) for d in range(3)
    }
    assert forward[(0, 0, 0)] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (0, 1, 0),
                                  (0, 1, 1), (1, 1, 0), (1, 1, 1)]  # fmt: skip
    back = shard_map(b, a, num_layers=6)
    assert back[(3, 2, 2)] == [(1, 1, 1)]


def test_bad_input_is_explained() -> None:
    with pytest.raises(TopologyError, match="does not split into 3"):
        even_boundaries(10, 3, "dim 0 of 'w'")
    with pytest.raises(TopologyError, match="same extent"):
        overlaps([0, 4], [0, 5])
    with pytest.raises(TopologyError, match="at least one layer"):
        pp_map(2, 1, 0)
    with pytest.raises(TopologyError, match="tp=0"):
        Degrees(tp=0)
