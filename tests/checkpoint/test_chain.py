"""Nothing a later reshape needs is lost along a chain of reshapes.

The source is a real tp 2 ZeRO-1 save (column and row parallel layers, sidecar written by the
training job). After any chain of layouts, converting back to tp 2 must give the original's
shards bit for bit (each tp rank's module tensors, fp32 master partitions and optimizer
states) and its metadata; ``verify`` must call every step equal and must notice a lost split.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_reshape.checkpoint.convert import convert_checkpoint
from lightning_reshape.checkpoint.sidecar import read_sidecar, write_sidecar
from lightning_reshape.checkpoint.verify import verify

TAG = "global_step2"
ORIGIN = (2, 1, 1)  # tp, dp, ZeRO stage of the source
LAYOUTS = [(tp, dp, z) for tp, dp, z in itertools.product((1, 2), (1, 2, 3), (1, 2, 3))]
# DeepSpeed rewrites these per layout; everything else in a model file must come back equal
LAYOUT_KEYS = {"dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions"}


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (
            torch.is_tensor(a)
            and torch.is_tensor(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if type(a).__module__.startswith("deepspeed"):
        return type(a) is type(b) and vars(a) == vars(b)
    return bool(a == b)


def _shard_differences(src: Path, dst: Path) -> list[str]:
    """Files of two saves at the same layout, compared object by object."""
    a_dir, b_dir = src / TAG, dst / TAG
    names = sorted(p.name for p in a_dir.glob("*.pt"))
    out = []
    if names != sorted(p.name for p in b_dir.glob("*.pt")):
        return [f"files {names} vs {sorted(p.name for p in b_dir.glob('*.pt'))}"]
    for name in names:
        a = torch.load(a_dir / name, weights_only=False)
        b = torch.load(b_dir / name, weights_only=False)
        for key in a:
            if key in LAYOUT_KEYS or (key == "ds_config" and "optim" in name):
                continue
            if key not in b or not _same(a[key], b[key]):
                out.append(f"{name}: {key}")
    return out


def _splits(save: Path) -> dict[str, Any]:
    sidecar = read_sidecar(save / TAG)
    assert sidecar is not None
    return sidecar.tp_splits


def _chain(src: Path, root: Path, layouts: list[tuple[int, int, int]]) -> Path:
    cur = src
    for i, (tp, dp, z) in enumerate([*layouts, ORIGIN]):
        cur_next = root / f"step{i}_tp{tp}dp{dp}z{z}"
        convert_checkpoint(cur, cur_next, tp=tp, dp=dp, zero_stage=z)
        assert verify(src, cur_next) == [], (layouts, i)
        cur = cur_next
    return cur


def test_tp2_dp2_dp1_tp2_keeps_the_splits(ckpt_root: Mapping[int, Path], tmp_path: Path) -> None:
    """The reported chain: tp 2 -> (tp 1, dp 2) -> (tp 1, dp 1) -> tp 2 gave whole tensors per
    rank, because the (tp 1, dp 1) step marked every parameter replicated."""
    src = ckpt_root[2] / "tp_z1"
    back = _chain(src, tmp_path, [(1, 2, 1), (1, 1, 1)])
    mid = tmp_path / "step1_tp1dp1z1"
    original = _splits(src)
    assert {n: s for n, s in _splits(mid).items() if n in original} == original
    assert _shard_differences(src, back) == []
    # verify notices a reshape that loses the record: strip it to "replicated"
    sidecar = read_sidecar(mid / TAG)
    assert sidecar is not None
    lost = {n: None for n in sidecar.tp_splits}
    write_sidecar(mid / TAG, type(sidecar)(**{**sidecar.__dict__, "tp_splits": lost}))
    diffs = verify(src, mid)
    assert any("col.weight: tensor-parallel split dim 0 stride 1 vs replicated" in d for d in diffs)


@pytest.mark.parametrize("layouts", [[(1, 3, 3), (2, 2, 2)], [(1, 1, 2)]])
def test_named_chains(
    ckpt_root: Mapping[int, Path], tmp_path: Path, layouts: list[tuple[int, int, int]]
) -> None:
    back = _chain(ckpt_root[2] / "tp_z1", tmp_path, layouts)
    assert _shard_differences(ckpt_root[2] / "tp_z1", back) == []


@settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(layouts=st.lists(st.sampled_from(LAYOUTS), min_size=1, max_size=3))
def test_random_chains_end_equal(
    ckpt_root: Mapping[int, Path], tmp_path_factory: pytest.TempPathFactory, layouts: list
) -> None:
    root = tmp_path_factory.mktemp("chain")
    src = ckpt_root[2] / "tp_z1"
    back = _chain(src, root, layouts)
    assert _shard_differences(src, back) == [], layouts
    assert {n: s for n, s in _splits(back).items() if n in _splits(src)} == _splits(src)
