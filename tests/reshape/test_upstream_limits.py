"""DeepSpeed behaviour our grid works around, pinned so that we notice when it changes.

ZeRO 3 + Adagrad is left out of the reshape grid because stock DeepSpeed (0.19.8) cannot load
its *own* ZeRO-3 Adagrad checkpoint at the *same* dp: ``load_checkpoint`` fails with torch's
"parameter group that doesn't match" (Adagrad's eagerly created state meets ZeRO 3's per
sub-group optimizer groups). Adam on the same model loads. When this test fails, DeepSpeed has
fixed it: add ("z3", adagrad) to the reshape grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.checkpoint.ds_workers import make_optimizer
from tests.deepspeed_harness import run_distributed
from tests.reshape.workers import zero_config


def _self_reload_worker(rank: int, world: int, out: str) -> dict[str, str]:
    import deepspeed

    results: dict[str, str] = {}
    for kind in ("adagrad", "adam"):

        def build(kind: str = kind) -> Any:
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
            engine, *_ = deepspeed.initialize(
                model=model,
                optimizer=make_optimizer(kind, model.parameters()),
                config=zero_config(3),
            )
            return engine

        engine = build()
        for step in range(2):
            x = torch.randn(2, 8, generator=torch.Generator().manual_seed(step))
            engine.backward(engine(x).pow(2).mean())
            engine.step()
        engine.save_checkpoint(f"{out}/{kind}", tag="t")
        try:
            build().load_checkpoint(f"{out}/{kind}", tag="t", load_optimizer_states=True)
            results[kind] = "loaded"
        except ValueError as exc:
            results[kind] = str(exc)
    return results


def test_deepspeed_cannot_reload_its_own_zero3_adagrad(tmp_path: Path) -> None:
    got = run_distributed(_self_reload_worker, 2, str(tmp_path), timeout=300)[0]
    assert got["adam"] == "loaded"
    assert "parameter group that doesn't match" in got["adagrad"], got
