"""Topology: named axes over a world of ranks, the first axis varying fastest.

Rank <-> coordinates is mixed-radix arithmetic, O(number of axes). One rank's group is
built from its coordinates in O(group size). The whole world's groups come from one
numpy transpose, so building every group list at a million ranks takes milliseconds,
where DeepSpeed's ``ProcessTopology`` scans the world per lookup.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lightning_reshape.errors import TopologyError


@dataclass(frozen=True)
class Topology:
    """A rank grid: ``names[i]`` has ``sizes[i]`` positions; ``names[0]`` varies fastest."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.sizes):
            raise TopologyError(f"{len(self.names)} axis names for {len(self.sizes)} sizes.")
        if len(set(self.names)) != len(self.names):
            raise TopologyError(f"axis names {self.names} repeat a name; name each axis once.")
        for name, size in zip(self.names, self.sizes, strict=True):
            if size < 1:
                raise TopologyError(f"axis {name!r} has size {size}; sizes must be >= 1.")

    @classmethod
    def from_order(cls, order: Sequence[str], sizes: Mapping[str, int]) -> Topology:
        """Build from an order (fastest axis first) and a name -> size mapping."""
        return cls(tuple(order), tuple(int(sizes[name]) for name in order))

    @classmethod
    def from_deepspeed_axes(cls, axes: Sequence[str], dims: Sequence[int]) -> Topology:
        """Build from DeepSpeed's ``ProcessTopology(axes, dims)``, whose LAST axis is fastest."""
        return cls(tuple(reversed(axes)), tuple(int(d) for d in reversed(dims)))

    @cached_property
    def world_size(self) -> int:
        return math.prod(self.sizes)

    @cached_property
    def _strides(self) -> dict[str, int]:
        strides, stride = {}, 1
        for name, size in zip(self.names, self.sizes, strict=True):
            strides[name] = stride
            stride *= size
        return strides

    def size(self, name: str) -> int:
        return self.sizes[self._index(name)]

    def stride(self, name: str) -> int:
        """How far apart in rank two neighbours along axis ``name`` are."""
        self._index(name)
        return self._strides[name]

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise TopologyError(
                f"unknown axis {name!r}; this topology has axes {', '.join(self.names)}."
            ) from None

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} is outside the world of {self.world_size} ranks.")

    def coords(self, rank: int) -> dict[str, int]:
        """The coordinate of ``rank`` on every axis."""
        self._check_rank(rank)
        out = {}
        for name, size in zip(self.names, self.sizes, strict=True):
            rank, out[name] = divmod(rank, size)
        return out

    def rank(self, **coords: int) -> int:
        """The rank at the given coordinates; every axis must be given."""
        if set(coords) != set(self.names):
            raise TopologyError(
                f"rank() needs a coordinate for each of {', '.join(self.names)}, got "
                f"{', '.join(sorted(coords)) or 'none'}."
            )
        rank = 0
        for name, size in zip(self.names, self.sizes, strict=True):
            c = coords[name]
            if not 0 <= c < size:
                raise TopologyError(f"coordinate {name}={c} is outside 0..{size - 1}.")
            rank += c * self._strides[name]
        return rank

    def parse_token(self, token: str) -> tuple[str, ...]:
        """Split a group token such as ``tp-pp`` into axis names, in this grid's order."""
        parts = [p.strip().lower() for p in token.split("-")]
        for p in parts:
            self._index(p)
        if len(set(parts)) != len(parts):
            raise TopologyError(f"group token {token!r} names an axis twice.")
        return tuple(n for n in self.names if n in parts)

    def group_of(self, rank: int, token: str) -> list[int]:
        """The ranks of ``rank``'s group along the axes of ``token``, in O(group size)."""
        coords = self.coords(rank)
        axes = self.parse_token(token)
        base = rank - sum(coords[a] * self._strides[a] for a in axes)
        members = [base]
        for a in axes:  # the first axis varies fastest, as in Megatron's lists
            stride = self._strides[a]
            members = [m + k * stride for k in range(self.size(a)) for m in members]
        return members

    def group_array(self, token: str) -> np.ndarray:
        """All groups along ``token``'s axes as a (groups, group size) array.

        Groups are ordered by the remaining axes (first varying fastest) and ranks inside a
        group by the token's axes (first varying fastest): Megatron's ``RankGenerator`` order.
        """
        axes = set(self.parse_token(token))
        # C order makes the last array axis fastest, so the grid is laid out reversed.
        grid = np.arange(self.world_size, dtype=np.int64).reshape(self.sizes[::-1])
        reversed_names = self.names[::-1]
        outer = [i for i, n in enumerate(reversed_names) if n not in axes]
        inner = [i for i, n in enumerate(reversed_names) if n in axes]
        group_size = math.prod(self.size(n) for n in axes)
        return grid.transpose(outer + inner).reshape(-1, group_size)

    def groups(self, token: str) -> list[list[int]]:
        """All groups along ``token``'s axes as lists of ranks (see ``group_array``)."""
        return self.group_array(token).tolist()
