"""ParallelState: this rank's torch.distributed groups for a resolved layout, and the ``mpu``
DeepSpeed asks for.

Why this shape:

- The caller owns the object (no module-level globals, unlike Megatron's ``parallel_state``),
  so a strategy can build, hand to DeepSpeed, and destroy it like any other resource.
- Each rank creates only the groups it belongs to, with
  ``new_group(ranks, use_local_synchronization=True)``: set-up cost is O(its groups), not
  O(world), and a rank never joins a rendezvous of groups it is not in.
- Size-1 groups get no communicator: they share one :class:`SelfProcessGroup`.
- A group spanning the whole world is the default group.
- Kinds whose groups are the same rank sets (tp and tp-pp when pp=1, dp and dp-cp when cp=1,
  ...) share one communicator.

Creation order and why it cannot deadlock: every rank walks ``GROUP_KINDS`` in the same
fixed order and, per kind, creates (at most) the one group it belongs to. Whether a kind gets
a communicator, the self group, or an alias of an earlier kind is decided from the layout
alone (the same answer on every rank), so all members of a group reach its creation at the
same step, after the same number of earlier creations. That also matters because torch names
a locally synchronised group by hashing its ranks together with the number of groups the
process has registered so far; members must agree on that number, which :meth:`build` checks
across the world before creating anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from lightning_reshape.distributed.self_group import new_self_group
from lightning_reshape.errors import DistributedError
from lightning_reshape.topology import GROUP_KINDS, ParallelLayout

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

ProcessGroup = dist.ProcessGroup

#: Dimension names of :meth:`ParallelState.device_mesh`, outermost first.
MESH_DIMS = ("pp", "dp", "cp", "tp")


@dataclass(frozen=True)
class GroupPlan:
    """How one group kind is realised on every rank: decided from the layout alone.

    ``source`` is ``"comm"`` (a new communicator), ``"self"`` (size 1, the shared
    :class:`SelfProcessGroup`), ``"world"`` (every rank: the default group is reused),
    ``"alias"`` (same rank sets as the earlier kind ``alias_of``)
    or ``"none"`` (the kind has no group at this rank, e.g. embedding on a middle stage).
    """

    kind: str
    source: str
    alias_of: str | None = None


def plan_groups(layout: ParallelLayout, reuse_world: bool = True) -> tuple[GroupPlan, ...]:
    """The creation plan for every kind in ``GROUP_KINDS`` order, identical on every rank.

    ``reuse_world``: a group spanning the whole world is the default group (no new
    communicator); off when the groups must use another backend than the world's.

    Aliasing is decided on rank 0's groups: groups of one kind are translates of rank 0's
    group over the same mixed-radix grid, so equal rank-0 groups mean equal groups everywhere
    (:meth:`ParallelState.build` still checks this for its own rank).
    """
    plans: list[GroupPlan] = []
    first_seen: dict[tuple[int, ...], str] = {}
    for kind in GROUP_KINDS:
        ranks0 = tuple(layout.group_of(0, kind))
        if len(ranks0) == 1:
            plans.append(GroupPlan(kind, "self"))
        elif len(ranks0) == layout.world_size and reuse_world:
            plans.append(GroupPlan(kind, "world"))
        elif ranks0 in first_seen:
            plans.append(GroupPlan(kind, "alias", first_seen[ranks0]))
        else:
            first_seen[ranks0] = kind
            plans.append(GroupPlan(kind, "comm"))
    return tuple(plans)


def _registered_group_count() -> int:
    return len(dist.distributed_c10d._world.pg_names)


class ParallelState:
    """This rank's process groups for every kind of ``GROUP_KINDS``, plus the mpu interface.

    Build with :meth:`build` on every rank (it is collective); release with :meth:`destroy`.
    Group kinds use Megatron's tokens: ``tp``, ``pp``, ``dp``, ``cp``, ``dp-cp``, ``tp-pp``
    (DeepSpeed's "model parallel"), ``ep``, ``etp``, ``tp-ep``, ``tp-ep-pp``, ``edp``,
    ``embedding``.
    """

    def __init__(
        self,
        layout: ParallelLayout,
        rank: int,
        groups: dict[str, ProcessGroup | None],
        owned: Sequence[ProcessGroup],
        created: Sequence[tuple[int, ...]],
        plans: Sequence[GroupPlan],
    ) -> None:
        self.layout = layout
        self.rank = rank
        self._groups = groups
        self._owned = list(owned)
        self._created = tuple(created)
        self._plans = tuple(plans)
        self._mesh: DeviceMesh | None = None
        self._destroyed = False

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        layout: ParallelLayout,
        rank: int | None = None,
        backend: str | None = None,
        timeout: timedelta | None = None,
    ) -> ParallelState:
        """Create this rank's groups for ``layout``; every rank of the world must call it.

        ``torch.distributed`` must already be initialised with ``layout.world_size`` ranks.
        ``backend`` is the backend of the multi-rank groups (default: the world's);
        ``rank`` defaults to ``dist.get_rank()`` and, if given, must equal it.
        """
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError(
                "torch.distributed is not initialised; call torch.distributed.init_process_group "
                "(or deepspeed.init_distributed) on every rank before ParallelState.build."
            )
        world = dist.get_world_size()
        if world != layout.world_size:
            raise DistributedError(
                f"the layout was resolved for {layout.world_size} ranks but torch.distributed "
                f"has {world}; resolve the ParallelConfig with world_size={world}."
            )
        actual = dist.get_rank()
        if rank is None:
            rank = actual
        elif rank != actual:
            raise DistributedError(
                f"rank={rank} was passed but this process is rank {actual} of torch.distributed; "
                "pass rank=None or the process's own rank."
            )
        _check_uniform_group_count()
        owned: list[ProcessGroup] = _pad_for_fresh_names(rank)

        reuse_world = backend is None or dist.get_backend() == str(dist.Backend(backend))
        plans = plan_groups(layout, reuse_world=reuse_world)
        groups: dict[str, ProcessGroup | None] = {}
        created: list[tuple[int, ...]] = []
        self_group: ProcessGroup | None = None
        for plan in plans:
            ranks = tuple(layout.group_of(rank, plan.kind))
            if not ranks:
                groups[plan.kind] = None
            elif plan.source == "self":
                if self_group is None:
                    self_group = new_self_group(rank)
                    owned.append(self_group)
                groups[plan.kind] = self_group
            elif plan.source == "world":
                groups[plan.kind] = dist.group.WORLD
            elif plan.source == "alias":
                assert plan.alias_of is not None
                if tuple(layout.group_of(rank, plan.alias_of)) != ranks:
                    raise DistributedError(
                        f"internal: kind {plan.kind!r} was planned as an alias of "
                        f"{plan.alias_of!r} but differs at rank {rank} ({layout.describe()})."
                    )
                groups[plan.kind] = groups[plan.alias_of]
            else:
                group = dist.new_group(
                    list(ranks),
                    timeout=timeout,
                    backend=backend,
                    use_local_synchronization=True,
                    group_desc=f"lightning_reshape:{plan.kind}",
                )
                if group is None or group is dist.GroupMember.NON_GROUP_MEMBER:
                    raise DistributedError(
                        f"internal: rank {rank} got no {plan.kind!r} group for ranks {ranks}."
                    )
                groups[plan.kind] = group
                owned.append(group)
                created.append(ranks)
        return cls(layout, rank, groups, owned, created, plans)

    def destroy(self) -> None:
        """Destroy the communicators this object created (idempotent; local, not collective)."""
        if self._destroyed:
            return
        self._destroyed = True
        self._mesh = None
        for group in reversed(self._owned):
            if group in dist.distributed_c10d._world.pg_names:
                dist.destroy_process_group(group)
        self._owned.clear()
        self._groups = {}

    # ------------------------------------------------------------------ generic access
    @property
    def created_groups(self) -> tuple[tuple[int, ...], ...]:
        """Rank sets for which this rank created a communicator (excluding the self group)."""
        return self._created

    @property
    def plans(self) -> tuple[GroupPlan, ...]:
        return self._plans

    def group(self, kind: str) -> ProcessGroup | None:
        """The group of ``kind`` this rank is in; None only for ``embedding`` off the ends."""
        if self._destroyed:
            raise DistributedError(
                "this ParallelState was destroyed; build a new one before using its groups."
            )
        try:
            return self._groups[kind]
        except KeyError:
            raise DistributedError(
                f"unknown group kind {kind!r}; use one of {', '.join(GROUP_KINDS)}."
            ) from None

    def ranks(self, kind: str) -> list[int]:
        """Global ranks of this rank's group of ``kind`` (from the layout, no communication)."""
        return self.layout.group_of(self.rank, kind)

    def size(self, kind: str) -> int:
        return len(self.ranks(kind))

    def rank_in(self, kind: str) -> int:
        """This rank's index inside its group of ``kind`` (-1 if it has none)."""
        ranks = self.ranks(kind)
        return ranks.index(self.rank) if self.rank in ranks else -1

    def _required(self, kind: str) -> ProcessGroup:
        group = self.group(kind)
        if group is None:
            raise DistributedError(f"rank {self.rank} belongs to no {kind!r} group.")
        return group

    # ------------------------------------------------------------------ DeepSpeed mpu
    def get_data_parallel_group(self, with_context_parallel: bool = False) -> ProcessGroup:
        return self._required("dp-cp" if with_context_parallel else "dp")

    def get_data_parallel_rank(self, with_context_parallel: bool = False) -> int:
        return self.rank_in("dp-cp" if with_context_parallel else "dp")

    def get_data_parallel_world_size(self, with_context_parallel: bool = False) -> int:
        return self.size("dp-cp" if with_context_parallel else "dp")

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.ranks("dp")

    def get_model_parallel_group(self) -> ProcessGroup:
        """tp x pp, as DeepSpeed's ``mp_rank_XX`` checkpoint files and Megatron count it."""
        return self._required("tp-pp")

    def get_model_parallel_rank(self) -> int:
        return self.rank_in("tp-pp")

    def get_model_parallel_world_size(self) -> int:
        return self.size("tp-pp")

    def get_tensor_model_parallel_group(self) -> ProcessGroup:
        return self._required("tp")

    def get_tensor_model_parallel_rank(self) -> int:
        return self.rank_in("tp")

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.size("tp")

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tensor-parallel rank 0 in this rank's tp group."""
        return self.ranks("tp")[0]

    def get_pipeline_model_parallel_group(self) -> ProcessGroup:
        return self._required("pp")

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.rank_in("pp")

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.size("pp")

    def get_pipeline_model_parallel_first_rank(self) -> int:
        return self.ranks("pp")[0]

    def get_pipeline_model_parallel_last_rank(self) -> int:
        return self.ranks("pp")[-1]

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size

    def is_pipeline_first_stage(self) -> bool:
        return self.get_pipeline_model_parallel_rank() == 0

    def is_pipeline_last_stage(self) -> bool:
        return self.get_pipeline_model_parallel_rank() == self.layout.pp - 1

    def get_context_parallel_group(self) -> ProcessGroup:
        return self._required("cp")

    def get_context_parallel_rank(self) -> int:
        return self.rank_in("cp")

    def get_context_parallel_world_size(self) -> int:
        return self.size("cp")

    # DeepSpeed's "sequence parallel" hooks: with cp > 1 DeepSpeed then shards ZeRO and
    # averages gradients over dp x cp, as Megatron's distributed optimizer does.
    get_sequence_parallel_group = get_context_parallel_group
    get_sequence_parallel_rank = get_context_parallel_rank
    get_sequence_parallel_world_size = get_context_parallel_world_size

    def get_sequence_data_parallel_group(self) -> ProcessGroup:
        return self._required("dp-cp")

    def get_sequence_data_parallel_rank(self) -> int:
        return self.rank_in("dp-cp")

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.size("dp-cp")

    def get_expert_model_parallel_group(self) -> ProcessGroup:
        return self._required("ep")

    def get_expert_model_parallel_rank(self) -> int:
        return self.rank_in("ep")

    def get_expert_model_parallel_world_size(self) -> int:
        return self.size("ep")

    def get_expert_tensor_parallel_group(self) -> ProcessGroup:
        return self._required("etp")

    def get_expert_tensor_parallel_rank(self) -> int:
        return self.rank_in("etp")

    def get_expert_tensor_parallel_world_size(self) -> int:
        return self.size("etp")

    def get_expert_tensor_and_model_parallel_group(self) -> ProcessGroup:
        return self._required("tp-ep")

    def get_expert_tensor_model_pipeline_parallel_group(self) -> ProcessGroup:
        return self._required("tp-ep-pp")

    def get_expert_data_parallel_group(self) -> ProcessGroup:
        return self._required("edp")

    def get_expert_data_parallel_rank(self) -> int:
        return self.rank_in("edp")

    def get_expert_data_parallel_world_size(self) -> int:
        return self.size("edp")

    def get_embedding_group(self) -> ProcessGroup | None:
        """First and last pipeline stage (tied embeddings); None on a middle stage."""
        return self.group("embedding")

    def is_rank_in_embedding_group(self) -> bool:
        return bool(self.ranks("embedding"))

    # ------------------------------------------------------------------ DeviceMesh view
    def mesh_array(self) -> np.ndarray:
        """Global ranks as an array of shape (pp, dp, cp, tp) of the dense grid."""
        grid = self.layout.dense
        ranks = np.arange(grid.world_size).reshape(tuple(reversed(grid.sizes)))
        names = tuple(reversed(grid.names))
        ranks = ranks.transpose([names.index(d) for d in (*MESH_DIMS, "ep")])
        return ranks[..., 0]  # the dense grid's ep axis has size 1

    def device_mesh(self, device_type: str = "cpu") -> DeviceMesh:
        """A DeviceMesh with dims (pp, dp, cp, tp) over the groups already built.

        Built on first call from the existing groups (``DeviceMesh.from_group``), so no new
        communicator is created; the rank array is O(world) integers, not groups.
        """
        if self._mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            groups = [self._required(d) for d in MESH_DIMS]
            self._mesh = DeviceMesh.from_group(
                groups,
                device_type,
                mesh=torch.as_tensor(self.mesh_array(), dtype=torch.int),
                mesh_dim_names=MESH_DIMS,
            )
        return self._mesh

    def __repr__(self) -> str:
        return f"ParallelState(rank={self.rank}, {self.layout.describe()})"


def _pad_for_fresh_names(rank: int) -> list[ProcessGroup]:
    """Self groups that shift this build's group names away from every earlier build's.

    A locally synchronised gloo group rendezvouses under store keys prefixed with its name,
    and the name is a hash of (ranks, number of registered groups). After ``destroy`` that
    number drops back, so rebuilding would reuse a name, and a member could read the stale
    address of the destroyed group ("Connection refused"; seen here when a test built two
    layouts in a row). The n-th build on this rank (counted in the world's store, so every
    rank, building the same states in the same order, gets the same n, without any
    communication) first registers (n - 1) * (len(GROUP_KINDS) + 1) self groups, which cost
    no communicator; the first build registers none.
    """
    store = dist.distributed_c10d._get_default_store()
    builds = int(store.add(f"lightning_reshape/parallel_state_builds/rank{rank}", 1))
    return [new_self_group(rank) for _ in range((builds - 1) * (len(GROUP_KINDS) + 1))]


def _check_uniform_group_count() -> None:
    """Fail fast, instead of hanging, when ranks have registered different numbers of groups.

    torch names a locally synchronised group after its ranks and the count of groups already
    registered in the process; if that count differs between members, they rendezvous under
    different names and wait forever. One MAX all-reduce over the world group checks it.
    """
    count = _registered_group_count()
    probe = torch.tensor([count, -count], dtype=torch.int64)
    dist.all_reduce(probe, op=dist.ReduceOp.MAX)
    high, low = int(probe[0]), -int(probe[1])
    if high != low:
        raise DistributedError(
            f"ranks have registered between {low} and {high} process groups (this rank: "
            f"{count}), so locally synchronised groups cannot be named consistently; destroy "
            "any previous ParallelState (state.destroy()) on every rank before building another."
        )
