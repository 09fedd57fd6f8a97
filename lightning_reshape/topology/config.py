"""ParallelConfig: the parallel layout a user declares, validated against a world size.

Resolving explains every mistake in one message that names the values and the fix, and
refuses every layout Megatron-core's ``initialize_model_parallel`` refuses, so a bad
layout fails at start-up, not inside a collective an hour later.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lightning_reshape.errors import TopologyError
from lightning_reshape.topology.grid import Topology

#: The axes of the dense (attention) grid, in Megatron's token spelling.
DENSE_AXES = ("tp", "cp", "ep", "dp", "pp")
DEFAULT_ORDER = "tp-cp-ep-dp-pp"
# largest world size resolved: above any real job; bounds the memory of the rank grid
MAX_WORLD_SIZE = 2**20


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TopologyError(f"{name}={value!r} is not an integer; set a whole number >= 1.")
    if value < 1:
        raise TopologyError(f"{name}={value} is below 1; every parallel size must be >= 1.")
    return value


def parse_order(order: str) -> tuple[str, ...]:
    """Split a Megatron order string (``tp-cp-ep-dp-pp``) and check its tokens."""
    tokens = tuple(t.strip().lower() for t in order.split("-"))
    unknown = [t for t in tokens if t not in DENSE_AXES]
    if unknown:
        raise TopologyError(
            f"order={order!r} has unknown axis {unknown[0]!r}; use only {', '.join(DENSE_AXES)} "
            f"joined by '-', e.g. {DEFAULT_ORDER!r}."
        )
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        raise TopologyError(f"order={order!r} names {repeated[0]!r} twice; name each axis once.")
    return tokens


@dataclass(frozen=True)
class ParallelConfig:
    """The declared layout: tp, pp, dp ("auto" = whatever the world leaves), cp, ep, etp, vpp.

    ``etp`` (expert tensor parallel) defaults to ``tp``; ``order`` is Megatron's rank order,
    first axis varying fastest.
    """

    tp: int = 1
    pp: int = 1
    dp: int | str = "auto"
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    vpp: int | None = None
    order: str = DEFAULT_ORDER

    def resolve(self, world_size: int) -> ParallelLayout:
        """Check every size against ``world_size`` and return the concrete layout."""
        world_size = _check_size("world_size", world_size)
        if world_size > MAX_WORLD_SIZE:
            raise TopologyError(
                f"world_size={world_size} is above {MAX_WORLD_SIZE} (2**20) ranks; no job is that "
                "large, and listing its groups would take gigabytes. Check the value."
            )
        tp = _check_size("tp", self.tp)
        pp = _check_size("pp", self.pp)
        cp = _check_size("cp", self.cp)
        ep = _check_size("ep", self.ep)
        etp = tp if self.etp is None else _check_size("etp", self.etp)
        if self.vpp is not None:
            _check_size("vpp", self.vpp)
            if pp == 1:
                raise TopologyError(
                    f"vpp={self.vpp} needs pipeline parallelism, but pp=1; set pp > 1 or drop vpp."
                )
        if ep > 1 and cp > 1:
            raise TopologyError(
                f"ep={ep} and cp={cp} are both above 1; use expert parallelism or context "
                "parallelism, not both."
            )
        tokens = parse_order(self.order)
        sizes = {"tp": tp, "pp": pp, "cp": cp, "ep": ep}
        missing = [a for a in ("tp", "cp", "ep", "pp") if a not in tokens and sizes[a] > 1]
        if missing:
            a = missing[0]
            raise TopologyError(
                f"order={self.order!r} leaves out {a!r} but {a}={sizes[a]}; add {a!r} to the "
                f"order, e.g. {DEFAULT_ORDER!r}."
            )

        model = tp * cp * pp
        if world_size % model:
            raise TopologyError(
                f"world size {world_size} is not divisible by tp*cp*pp = {tp}*{cp}*{pp} = {model}; "
                f"use a world size that is a multiple of {model} or change tp, cp or pp."
            )
        dp = world_size // model
        if self.dp != "auto":
            if isinstance(self.dp, str):
                raise TopologyError(f"dp={self.dp!r} is neither an integer nor 'auto'.")
            declared = _check_size("dp", self.dp)
            if declared != dp:
                raise TopologyError(
                    f"dp={declared} does not fit: world size {world_size} / (tp*cp*pp = {model}) "
                    f"gives dp={dp}; set dp={dp} or dp=auto, or change the world size to "
                    f"{declared * model}."
                )
        if "dp" not in tokens and dp > 1:
            raise TopologyError(
                f"order={self.order!r} leaves out 'dp' but dp={dp}; add 'dp' to the order."
            )

        expert_model = etp * ep * pp
        if world_size % expert_model:
            raise TopologyError(
                f"world size {world_size} is not divisible by etp*ep*pp = {etp}*{ep}*{pp} = "
                f"{expert_model}; change etp or ep so that it divides {world_size // pp} "
                "(ranks per pipeline stage)."
            )
        edp = world_size // expert_model
        if "dp" not in tokens and edp > 1:
            raise TopologyError(
                f"order={self.order!r} leaves out 'dp' but the expert data-parallel size is "
                f"{edp}; add 'dp' to the order."
            )
        if "tp" not in tokens and etp > 1:
            raise TopologyError(
                f"order={self.order!r} leaves out 'tp' but etp={etp}; add 'tp' to the order."
            )

        order = _complete_order(tokens)
        dense = Topology.from_order(order, {"tp": tp, "cp": cp, "ep": 1, "dp": dp, "pp": pp})
        expert = Topology.from_order(order, {"tp": etp, "cp": 1, "ep": ep, "dp": edp, "pp": pp})
        if pp > 1 and tokens[-1] != "pp" and edp != dp:
            raise TopologyError(
                f"order={self.order!r} does not end in 'pp' while the dense data-parallel size "
                f"({dp}) differs from the expert one ({edp} = world {world_size} / etp*ep*pp); "
                "put 'pp' last in the order or choose etp*ep = tp*cp."
            )
        if pp > 1 and dense.stride("pp") != expert.stride("pp"):
            raise TopologyError(
                f"order={self.order!r} gives different pipeline groups for dense layers "
                f"(stride {dense.stride('pp')}) and expert layers (stride {expert.stride('pp')}); "
                "put 'pp' last in the order or choose etp*ep = tp*cp."
            )
        return ParallelLayout(
            config=self, world_size=world_size, dp=dp, etp=etp, edp=edp, dense=dense, expert=expert
        )


def _complete_order(tokens: tuple[str, ...]) -> tuple[str, ...]:
    """Append absent (size 1) axes at the end, as Megatron's RankGenerator does."""
    return tokens + tuple(a for a in ("tp", "pp", "dp", "ep", "cp") if a not in tokens)


#: Group kinds built on the expert grid; their names on that grid.
EXPERT_KINDS = {"ep": "ep", "etp": "tp", "tp-ep": "tp-ep", "tp-ep-pp": "tp-ep-pp", "edp": "dp"}
#: Every group kind the CLI and the distributed layer build, in Megatron's tokens.
GROUP_KINDS = (
    "tp", "pp", "dp", "cp", "dp-cp", "tp-pp", "ep", "etp", "tp-ep", "tp-ep-pp", "edp", "embedding",
)  # fmt: skip


@dataclass(frozen=True)
class ParallelLayout:
    """A resolved layout: concrete sizes plus the dense and expert rank grids."""

    config: ParallelConfig
    world_size: int
    dp: int
    etp: int
    edp: int
    dense: Topology
    expert: Topology

    @property
    def tp(self) -> int:
        return self.config.tp

    @property
    def pp(self) -> int:
        return self.config.pp

    @property
    def cp(self) -> int:
        return self.config.cp

    @property
    def ep(self) -> int:
        return self.config.ep

    @cached_property
    def order(self) -> str:
        return "-".join(self.dense.names)

    def _grid_and_token(self, kind: str) -> tuple[Topology, str]:
        if kind in EXPERT_KINDS:
            return self.expert, EXPERT_KINDS[kind]
        return self.dense, kind

    def group_array(self, kind: str) -> np.ndarray:
        """All groups of one kind as a (groups, group size) array, in Megatron's order."""
        if kind == "embedding":
            pp_groups = self.dense.group_array("pp")
            return pp_groups[:, [0, -1]] if self.pp > 1 else pp_groups
        grid, token = self._grid_and_token(kind)
        return grid.group_array(token)

    def groups(self, kind: str) -> list[list[int]]:
        """All groups of one kind for the whole world as lists, in Megatron's order."""
        return self.group_array(kind).tolist()

    def group_of(self, rank: int, kind: str) -> list[int]:
        """The one group of ``kind`` that ``rank`` belongs to, in O(group size).

        For ``embedding`` a rank on a middle pipeline stage belongs to no group: [].
        """
        if kind == "embedding":
            ranks = embedding_ranks(self.dense.group_of(rank, "pp"))
            return ranks if rank in ranks else []
        grid, token = self._grid_and_token(kind)
        return grid.group_of(rank, token)

    def all_group_arrays(self) -> dict[str, np.ndarray]:
        """Every group kind of ``GROUP_KINDS`` for the whole world, as arrays."""
        return {kind: self.group_array(kind) for kind in GROUP_KINDS}

    def all_groups(self) -> dict[str, list[list[int]]]:
        """Every group kind of ``GROUP_KINDS`` for the whole world, as lists."""
        return {kind: self.groups(kind) for kind in GROUP_KINDS}

    def describe(self) -> str:
        """One line naming only the axes above 1 (and the rank order once two axes interleave),
        e.g. ``world 2: dp=2`` or ``world 8: tp=2 pp=2 dp=2 order=tp-cp-ep-dp-pp``."""
        axes = [("tp", self.tp), ("pp", self.pp), ("dp", self.dp), ("cp", self.cp)]
        axes.append(("ep", self.ep))
        if self.ep > 1 or self.etp != self.tp:  # the expert grid differs from the dense one
            axes += [("etp", self.etp), ("edp", self.edp)]
        shown = [f"{name}={value}" for name, value in axes if value > 1]
        if not shown:
            return f"world {self.world_size}: a single rank, no parallel axis"
        if sum(1 for name, value in axes[:5] if value > 1) > 1:
            shown.append(f"order={self.order}")
        return f"world {self.world_size}: {' '.join(shown)}"


def embedding_ranks(pp_group: list[int]) -> list[int]:
    """Megatron's default embedding group of one pipeline group: first and last stage."""
    return [pp_group[0]] if len(pp_group) == 1 else [pp_group[0], pp_group[-1]]
