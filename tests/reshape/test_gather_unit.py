"""The executor's byte movers, against plain Python slicing: every range lands where planned and
no byte between ranges is touched, whatever the sizes, gaps, orders and window boundaries."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from lightning_reshape.checkpoint import execute


def _sources(tmp_path: Path, rng: random.Random) -> dict[str, bytes]:
    out = {}
    for name in ("a", "b"):
        data = rng.randbytes(3 << 20)
        (tmp_path / name).write_bytes(data)
        out[name] = data
    return out


@pytest.mark.parametrize("seed", range(6))
def test_gather_places_every_range(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    sources = _sources(tmp_path, rng)
    size = 4 << 20
    ranges, dst = [], 0
    while dst < size - (300 << 10):
        n = rng.choice([1, 4, 6144, rng.randrange(1, 200 << 10)])
        dst += rng.choice([0, 0, 0, rng.randrange(1, 5000)])  # untouched gaps in the target
        file = rng.choice("ab")
        src = rng.randrange(0, len(sources[file]) - n)
        if rng.random() < 0.3 and ranges:  # re-read bytes just read (overlapping sources)
            src = min(max(0, ranges[-1][1] - rng.randrange(0, 100)), len(sources[file]) - n)
        ranges.append((file, src, dst, n))
        dst += n
    rng.shuffle(ranges)
    target = tmp_path / "out"
    fill = bytes([0xAB]) * size
    target.write_bytes(fill)
    expected = bytearray(fill)
    for file, src, d, n in ranges:
        expected[d : d + n] = sources[file][src : src + n]
    fds = {f: os.open(tmp_path / f, os.O_RDONLY) for f in sources}
    fd = os.open(target, os.O_WRONLY)
    try:
        execute._gather(ranges, fds, fd)
    finally:
        os.close(fd)
        for f in fds.values():
            os.close(f)
    assert target.read_bytes() == bytes(expected)


def test_copy_range_and_coalesce(tmp_path: Path) -> None:
    data = random.Random(7).randbytes(1 << 20)
    (tmp_path / "s").write_bytes(data)
    ranges = [("s", 0, 10, 100), ("s", 100, 110, 50), ("s", 500, 160, 40), ("s", 540, 200, 1)]
    merged = execute._coalesce(ranges)
    assert merged == [("s", 0, 10, 150), ("s", 500, 160, 41)]
    (tmp_path / "t").write_bytes(b"\0" * 300)
    s_fd, t_fd = os.open(tmp_path / "s", os.O_RDONLY), os.open(tmp_path / "t", os.O_WRONLY)
    try:
        for _, src, dst, n in merged:
            execute._copy_range(s_fd, t_fd, n, src, dst)
    finally:
        os.close(s_fd)
        os.close(t_fd)
    out = (tmp_path / "t").read_bytes()
    assert out[10:160] == data[0:150] and out[160:201] == data[500:541]
    assert out[:10] == b"\0" * 10 and out[201:] == b"\0" * 99
