"""Megatron-core as an oracle: its own ``initialize_model_parallel`` on a fake process group.

The fake backend lets one process play any rank of any world size, so we can ask Megatron
which layouts it refuses and which groups a given rank ends up in, without real processes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.distributed as dist

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state as ps
    from megatron.core.parallel_state import RankGenerator
from torch.testing._internal.distributed.fake_pg import FakeStore

__all__ = ["MegatronView", "RankGenerator", "megatron_view"]


@dataclass
class MegatronView:
    """The groups one rank holds after Megatron's initialize_model_parallel, or its refusal."""

    error: BaseException | None
    groups: dict[str, list[int]]


def _ranks(group: object) -> list[int]:
    return dist.get_process_group_ranks(group)


def megatron_view(
    world_size: int,
    rank: int,
    *,
    tp: int,
    pp: int,
    cp: int,
    ep: int,
    etp: int | None,
    vpp: int | None,
    order: str,
) -> MegatronView:
    # destroy_model_parallel leaves the embedding rank list behind; clear it ourselves.
    ps._EMBEDDING_GLOBAL_RANKS = None
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        try:
            ps.initialize_model_parallel(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                virtual_pipeline_model_parallel_size=vpp,
                context_parallel_size=cp,
                expert_model_parallel_size=ep,
                expert_tensor_parallel_size=etp,
                order=order,
                create_gloo_process_groups=False,
            )
        except (RuntimeError, AssertionError, KeyError, ValueError) as err:
            return MegatronView(err, {})
        groups = {
            "tp": _ranks(ps.get_tensor_model_parallel_group()),
            "pp": _ranks(ps.get_pipeline_model_parallel_group()),
            "dp": _ranks(ps.get_data_parallel_group()),
            "cp": _ranks(ps.get_context_parallel_group()),
            "dp-cp": _ranks(ps.get_data_parallel_group(with_context_parallel=True)),
            "tp-pp": _ranks(ps.get_model_parallel_group()),
            "ep": _ranks(ps.get_expert_model_parallel_group()),
            "etp": _ranks(ps.get_expert_tensor_parallel_group()),
            "tp-ep": _ranks(ps.get_expert_tensor_and_model_parallel_group()),
            "tp-ep-pp": _ranks(ps.get_expert_tensor_model_pipeline_parallel_group()),
            "edp": _ranks(ps.get_expert_data_parallel_group()),
        }
        if ps.is_rank_in_embedding_group():
            groups["embedding"] = list(ps._EMBEDDING_GLOBAL_RANKS)
        else:
            groups["embedding"] = []
        return MegatronView(None, groups)
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
