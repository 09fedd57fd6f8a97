"""A process group of one rank that owns no communicator.

Why: most parallel axes are size 1 in most runs (tp=1, pp=1, cp=1, ep=1), and Megatron or
DeepSpeed would create a gloo/nccl communicator (sockets, threads, GPU memory) for each of
those singleton groups on every rank. DeepSpeed nevertheless calls collectives on the mpu's
groups unconditionally (``all_reduce(..., group=mpu.get_model_parallel_group())`` in its
gradient-norm code, ZeRO's all-gathers over the data-parallel group when dp=1). A
:class:`SelfProcessGroup` is a real, registered ``torch.distributed`` group (so
``get_rank``, ``get_world_size``, ``get_process_group_ranks`` and every collective accept
it) whose collectives are the size-1 identities, done in place without any transport.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.futures import Future

#: Name under which the backend is registered with ``torch.distributed.Backend``.
SELF_BACKEND = "lr_self"


def _done(result: Any = None) -> Any:
    future: Future[Any] = Future()
    future.set_result(result)
    return _create_work_from_future(future)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.data_ptr() != src.data_ptr():
        dst.detach().copy_(src.detach().reshape(dst.shape))


class SelfProcessGroup(dist.ProcessGroup):
    """Collectives over a group of exactly one rank: reductions and broadcasts are no-ops,
    gathers and scatters copy the input to the output."""

    def __init__(self) -> None:
        super().__init__(0, 1)
        self._registered_name: str | None = None

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0

    def getBackendName(self) -> str:
        return SELF_BACKEND

    @property
    def group_name(self) -> str:
        """The name torch registered (DeviceMesh.from_group reads it from the object, and a
        Python backend object does not carry the C++ name)."""
        if self._registered_name is None:
            self._registered_name = dist.distributed_c10d._world.pg_names[self]
        return self._registered_name

    def __repr__(self) -> str:
        return "SelfProcessGroup(size=1)"

    # Reductions and broadcasts of one rank leave the data as it is.
    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        return _done(tensors)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        return _done(tensors)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        return _done(tensors)

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        return _done(tensors)

    def barrier(self, opts: Any = None) -> Any:
        return _done()

    # Gathers, scatters and all-to-all of one rank copy input to output.
    def allgather(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        for out, inp in zip(outputs, inputs, strict=True):
            _copy(out[0], inp)
        return _done(outputs)

    def allgather_coalesced(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        return self.allgather(outputs, inputs, opts)

    def all_gather_single(self, output: torch.Tensor, inp: torch.Tensor, opts: Any = None) -> Any:
        _copy(output, inp)
        return _done(output)

    def all_gather_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        for out, inp in zip(outputs, inputs, strict=True):
            _copy(out, inp)
        return _done(outputs)

    def gather(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        return self.allgather(outputs, inputs, opts)

    def scatter(
        self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None
    ) -> Any:
        for out, inp in zip(outputs, inputs, strict=True):
            _copy(out, inp[0])
        return _done(outputs)

    def reduce_scatter(
        self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None
    ) -> Any:
        return self.scatter(outputs, inputs, opts)

    def reduce_scatter_single(
        self, output: torch.Tensor, inp: torch.Tensor, opts: Any = None
    ) -> Any:
        _copy(output, inp)
        return _done(output)

    def reduce_scatter_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        return self.all_gather_single_coalesced(outputs, inputs, opts)

    def alltoall(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        for out, inp in zip(outputs, inputs, strict=True):
            _copy(out, inp)
        return _done(outputs)

    def all_to_all_single(
        self,
        output: torch.Tensor,
        inp: torch.Tensor,
        output_split_sizes: Any = None,
        input_split_sizes: Any = None,
        opts: Any = None,
    ) -> Any:
        _copy(output, inp)
        return _done(output)

    def _start_coalescing(self, device: Any = None) -> None:
        """Collectives here complete immediately, so there is nothing to batch."""

    def _end_coalescing(self, device: Any = None) -> Any:
        return _done()


def _create(store: Any, rank: int, size: int, timeout: timedelta) -> SelfProcessGroup:
    if size != 1:
        raise ValueError(f"the {SELF_BACKEND!r} backend only builds groups of one rank, not {size}")
    return SelfProcessGroup()


def register_self_backend() -> None:
    """Register the ``lr_self`` backend with torch.distributed (idempotent)."""
    if SELF_BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(SELF_BACKEND, _create, devices=["cpu", "cuda"])


def new_self_group(rank: int) -> dist.ProcessGroup:
    """A registered group holding only ``rank`` (the caller), without a communicator."""
    register_self_backend()
    group = dist.new_group([rank], backend=SELF_BACKEND, use_local_synchronization=True)
    assert isinstance(group, SelfProcessGroup)
    group.group_name  # noqa: B018 - caches the name, which destroy_process_group reads late
    return group
