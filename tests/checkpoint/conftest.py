"""Session fixtures: real DeepSpeed checkpoints at dp 1, 2 and 4 (one launch per world size)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.checkpoint.ds_workers import RunSpec, combo_worker
from tests.deepspeed_harness import run_distributed
from tests.reshape.workers import Spec, train_worker

ZERO_SPECS = {
    1: [
        RunSpec("z0", 0, "adam"),
        RunSpec("z1", 1, "adamw"),
        RunSpec("z2", 2, "sgd"),
        RunSpec("z3", 3, "adagrad"),
        RunSpec("z0bf16", 0, "adam", "bf16"),
        RunSpec("z1bf16", 1, "adam", "bf16"),
    ],
    2: [
        RunSpec("z0", 0, "sgd"),
        RunSpec("z1", 1, "adamw", extra={"save_each_step": True}),
        RunSpec("z2", 2, "adagrad"),
        RunSpec("z3", 3, "adam"),
        RunSpec("z2bf16", 2, "sgd", "bf16"),
        RunSpec("z3bf16", 3, "adamw", "bf16"),
    ],
    4: [
        RunSpec("z0", 0, "adagrad"),
        RunSpec("z1", 1, "adam"),
        RunSpec("z2", 2, "adamw"),
        RunSpec("z3", 3, "sgd"),
    ],
}
TP_SPECS = {
    2: [RunSpec("tp_z1", 1, "adam"), RunSpec("tp_z0", 0, "sgd")],
    4: [RunSpec("tp_z2", 2, "adamw")],
}
PP_SPECS = {
    2: [RunSpec("pp_z1", 1, "adam"), RunSpec("pp_z0", 0, "sgd")],
    4: [RunSpec("pp_z1", 1, "adagrad")],
}

# Shapes real users bring (issue 12): elastic_checkpoint saves, Hugging Face Trainer-style
# checkpoint-N/global_stepN folders without `latest` (bf16 files), custom tags.
USER_SPECS = [
    RunSpec("elastic_z1", 1, "adam", extra={"elastic": True}),
    RunSpec("elastic_z2", 2, "adamw", extra={"elastic": True}),
    RunSpec(
        "hf",
        2,
        "adamw",
        "bf16",
        steps=3,
        extra={"subdir": "checkpoint-3", "tag": "global_step3", "save_latest": False},
    ),
    RunSpec("custom_tag", 3, "adam", extra={"tag": "my-run_final", "save_latest": False}),
]


def _generate(root: Path, world: int) -> Path:
    out = root / f"w{world}"
    run_distributed(
        combo_worker,
        world,
        str(out),
        ZERO_SPECS[world],
        TP_SPECS.get(world, []),
        PP_SPECS.get(world, []),
        timeout=400,
    )
    return out


class _LazyWorlds(Mapping[int, Path]):
    """{world size: save folder}, each world launched on first use only: a test that needs the
    dp-2 checkpoints does not pay for the dp-1 and dp-4 launches."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._done: dict[int, Path] = {}

    def __getitem__(self, world: int) -> Path:
        if world not in ZERO_SPECS:
            raise KeyError(world)
        if world not in self._done:
            self._done[world] = _generate(self._root, world)
        return self._done[world]

    def __iter__(self) -> Iterator[int]:
        return iter(ZERO_SPECS)

    def __len__(self) -> int:
        return len(ZERO_SPECS)


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Mapping[int, Path]:
    """{world size: folder holding one save directory per RunSpec name}."""
    root = tmp_path_factory.mktemp("ds_ckpts")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return _LazyWorlds(root)


@pytest.fixture(scope="session")
def user_ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding one save per USER_SPECS name, written by DeepSpeed at dp 2 (one launch)."""
    out = tmp_path_factory.mktemp("user_ckpts")
    run_distributed(combo_worker, 2, str(out), USER_SPECS, [], [], timeout=400)
    return out


@pytest.fixture(scope="session")
def zero1_dp2_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stock DeepSpeed ZeRO-1 (AdamW) checkpoint saved by 2 data-parallel ranks (one launch,
    shared by the output tests, which only read it and check that it stays unchanged)."""
    root = tmp_path_factory.mktemp("zero1_dp2")
    run_distributed(train_worker, 2, str(root), [Spec("z1", 1, "adamw")], 0, timeout=300)
    return root / "z1"
