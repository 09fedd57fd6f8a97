"""The multi-process harness reports a failing rank's traceback and stops the others."""

from __future__ import annotations

import time

import pytest

from tests.deepspeed_harness import DistributedTestError, run_distributed


def failing_worker(rank: int, world_size: int, token: str) -> str:
    import torch.distributed as dist

    assert dist.get_world_size() == world_size
    if rank == 0:
        raise ValueError(f"boom {token}")
    time.sleep(120)  # must be terminated by the parent
    return "unreachable"


def test_failure_propagates_with_traceback() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as err:
        run_distributed(failing_worker, 2, "xyz", timeout=100)
    msg = str(err.value)
    assert "rank 0" in msg and "ValueError: boom xyz" in msg and "failing_worker" in msg
    assert time.monotonic() - start < 60
