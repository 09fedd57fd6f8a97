"""``safe_load`` from many threads at once: never refuses an allow-listed DeepSpeed type.

Why: ``--workers N`` loads shards in threads. torch's ``safe_globals()`` context clears and
refills the one process-wide allow-list on exit, so a per-call context made other threads'
loads refuse DeepSpeed types now and then (about 2% of loads with 4 threads). The allow-list is
now only ever added to, once, under a lock.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum

from lightning_reshape.checkpoint.safe_load import safe_load


def test_concurrent_loads_never_refuse(tmp_path: Path) -> None:
    path = tmp_path / "ds.pt"
    torch.save(
        {"zero_stage": ZeroStageEnum(1), "loss_scaler": LossScaler(1.0), "t": torch.ones(4)},
        path,
    )
    errors: list[BaseException] = []

    def work() -> None:
        for _ in range(150):
            try:
                obj = safe_load(path)
                assert obj["zero_stage"] == ZeroStageEnum(1)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} of 600 loads failed, e.g. {errors[0]}"
