"""Hostile tensor metadata and pickles inside real DeepSpeed checkpoints: each is refused by
``inspect`` and ``convert`` with one line and exit 2 before anything is planned, or (an expanded
view carried as client state) written as the view it is, never expanded."""

from __future__ import annotations

import pickle
import re
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_reshape.checkpoint import torchfile
from lightning_reshape.checkpoint.torchfile import TensorRef
from lightning_reshape.errors import CheckpointError
from tests.checkpoint.damage import rewrite, run_cli, zip_with_pkl
from tests.checkpoint.helpers import copy_save

MODEL = "mp_rank_00_model_states.pt"


def _damaged(ckpt_root: Mapping[int, Path], tmp_path: Path, mutate: Callable[[Any], Any]) -> Path:
    save = copy_save(ckpt_root[2] / "z1", tmp_path / "z1")
    target = save / "global_step2" / MODEL
    rewrite(target, target, mutate)
    return save


def _refused(save: Path, tmp_path: Path, pattern: str) -> None:
    for args in (("inspect", str(save)), ("convert", str(save), str(tmp_path / "out"))):
        extra = ("--tp", "1", "--dp", "1", "--quiet") if args[0] == "convert" else ()
        code, err = run_cli(*args, *extra)
        assert code == 2, (args, err)
        assert len(err) == 1 and MODEL in err[0], err
        assert re.search(pattern, err[0]), err[0]
    assert not (tmp_path / "out" / "global_step2").exists()


def _regeom(offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> Callable[[Any], None]:
    def mutate(obj: Any) -> None:
        t = obj["module"]["running"]
        t.offset, t.shape, t._stride = offset, torchfile.Size(shape), stride

    return mutate


@pytest.mark.parametrize(
    ("geometry", "pattern"),
    [
        ((-8, (5,), (1,)), "negative offset"),  # 8 elements before its storage
        ((0, (-5,), (1,)), "negative offset, size or stride"),
        ((0, (5,), (-1,)), "negative offset, size or stride"),
        ((1, (5,), (1,)), r"reaches element 6 of storage data/\d+, which holds 5"),
        ((0, (3, 2), (2,)), "shape .* but strides"),
    ],
    ids=["offset-8", "negative-size", "negative-stride", "past-the-end", "rank-mismatch"],
)
def test_impossible_geometry_refused(
    ckpt_root: Mapping[int, Path], tmp_path: Path, geometry: tuple[Any, ...], pattern: str
) -> None:
    save = _damaged(ckpt_root, tmp_path, _regeom(*geometry))
    _refused(save, tmp_path, pattern)


def test_expanded_parameter_refused(ckpt_root: Mapping[int, Path], tmp_path: Path) -> None:
    """A stride-0 view as a buffer the plan would reshape: refused, naming it."""
    save = _damaged(ckpt_root, tmp_path, _regeom(0, (10**12,), (0,)))
    _refused(save, tmp_path, r"'running'.*expanded view")


def test_expanded_view_in_client_state_stays_a_view(
    ckpt_root: Mapping[int, Path], tmp_path: Path
) -> None:
    """10^12 elements over one float in a ~6 KB file: carried as a view, a few KB written."""

    def mutate(obj: Any) -> None:
        run = obj["module"]["running"]
        obj["big_view"] = TensorRef(run.storage, 1, (10**12,), (0,))
        obj["alias"] = [obj["big_view"]] * 1000  # 1000 references, one storage

    save = _damaged(ckpt_root, tmp_path, mutate)
    t0 = time.perf_counter()
    code, err = run_cli("convert", str(save), str(tmp_path / "out"), "--tp", "1", "--dp", "1")
    assert (code, err) == (0, [])
    assert time.perf_counter() - t0 < 30
    out = tmp_path / "out" / "global_step2"
    written = sum(p.stat().st_blocks * 512 for p in out.iterdir())
    assert written < 1 << 20, written
    sd = torch.load(out / MODEL, weights_only=False)
    view = sd["big_view"]
    assert view.shape == (10**12,) and view.stride() == (0,)
    assert view[123456789].item() == sd["module"]["running"][1].item() == 1.0
    assert all(a.data_ptr() == view.data_ptr() for a in sd["alias"])


def test_deep_pickle_refused(ckpt_root: Mapping[int, Path], tmp_path: Path) -> None:
    deep: list[Any] = []
    for _ in range(2000):
        deep = [deep]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # only to write it
    try:
        save = _damaged(ckpt_root, tmp_path, lambda obj: obj.__setitem__("deep", deep))
    finally:
        sys.setrecursionlimit(limit)
    _refused(save, tmp_path, "nests containers deeper than 100 levels")


class _Alloc:
    """Pickles as a call of an allowed callable that would allocate far more than the file."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


@pytest.mark.parametrize(
    "payload",
    [_Alloc(set, range(10**10)), _Alloc(bytearray, 1_500_000_000), _Alloc(frozenset, range(10**9))],
    ids=["set-range-1e10", "bytearray-1.5e9", "frozenset-range-1e9"],
)
def test_allocation_budget(ckpt_root: Mapping[int, Path], tmp_path: Path, payload: _Alloc) -> None:
    bare = tmp_path / "bare.pt"
    zip_with_pkl(bare, pickle.dumps({"x": payload}, protocol=2))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"bare\.pt: data\.pkl would allocate over"):
        torchfile.load(bare)
    assert time.perf_counter() - t0 < 5
    save = _damaged(ckpt_root, tmp_path, lambda obj: obj.__setitem__("boom", payload))
    _refused(save, tmp_path, "would allocate over")


@pytest.mark.parametrize(
    "pkl",
    [
        b"\x80\x02]r\x00\x00\x00\x40.",  # LONG_BINPUT 2^30: C's memo would grow to 2^31 slots
        b"\x80\x02]p99999999\n.",  # PUT, the same in text
        b"\x80\x02B\xff\xff\xff\x7fab.",  # BINBYTES claiming 2 GiB
    ],
    ids=["long-binput", "put", "binbytes"],
)
def test_opcode_numbers_bounded_by_the_pickle(tmp_path: Path, pkl: bytes) -> None:
    """Found by fuzzing: one flipped byte made a LONG_BINPUT index of ~10^9, and the C unpickler
    filled a memo array of twice that (16 GB resident, the process OOM-killed)."""
    path = tmp_path / "memo.pt"
    zip_with_pkl(path, pkl)
    with pytest.raises(CheckpointError, match=r"memo\.pt: data\.pkl opcode at byte [23] "):
        torchfile.load(path)


def test_self_containing_and_shared_trees(tmp_path: Path) -> None:
    """A list holding itself, and 60 levels of [x, x] (2^60 leaves walked as a tree)."""
    loop: list[Any] = []
    loop.append(loop)
    shared: Any = 0
    for _ in range(60):
        shared = [shared, shared]
    for name, obj, pattern in (
        ("loop", loop, "contains itself"),
        ("shared", shared, "object tree has over"),
    ):
        path = tmp_path / f"{name}.pt"
        zip_with_pkl(path, pickle.dumps(obj, protocol=2))
        with pytest.raises(CheckpointError, match=f"{name}\\.pt: data\\.pkl.*{pattern}"):
            torchfile.load(path)


def test_real_files_are_within_every_bound(ckpt_root: Mapping[int, Path]) -> None:
    """The bounds refuse none of what DeepSpeed wrote (every file of the dp-2 saves)."""
    files = [p for p in ckpt_root[2].rglob("*.pt") if "expected" not in p.name]
    assert len(files) > 20
    for f in files:
        torchfile.load(f)
