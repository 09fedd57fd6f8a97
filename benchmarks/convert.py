"""Benchmark ``lightning-reshape convert`` against DeepSpeed's ``ds_to_universal`` and ``cat``.

Why: a reshape should cost about one copy of the bytes (the disk's limit), far less than
DeepSpeed's offline universal conversion, and need memory of about one shard, not of the whole
checkpoint. Writes (once, cached in --workdir) a ~1.3 GB ZeRO-1 dp-2 AdamW fp32 checkpoint of an
~85M-parameter model with stock DeepSpeed, then times each tool in its own subprocess
(``/usr/bin/time -v``: wall time and peak RSS of the process and its children) and prints ratios.

    python benchmarks/convert.py [--workdir /tmp/lightning_reshape_bench] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HIDDEN = 3072
LAYERS = 9  # 9 x (3072 x 3072 + 3072) = 84.9M parameters


def _gen_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    loss = engine(torch.randn(2, HIDDEN)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out)


def generate(src: Path) -> None:
    """Write the source checkpoint with stock DeepSpeed at dp 2 (skipped when cached)."""
    if (src / "latest").is_file():
        return
    import multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_gen_rank, args=(r, 2, port, str(src))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"generating the checkpoint failed (exit {p.exitcode})")


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of ``cmd`` and its children."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-v", *cmd],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    rss = int(m.group(1)) / 1e6 if m else float("nan")
    inner = re.search(r"convert-seconds: ([\d.]+)", proc.stdout)
    if inner:
        print(f"    (in-process conversion, imports excluded: {float(inner.group(1)):.2f} s)")
    return wall, rss


_INNER = """
import sys, time
from lightning_reshape.checkpoint.convert import convert_checkpoint
t0 = time.perf_counter()
convert_checkpoint(sys.argv[1], sys.argv[2], tp=1, dp=int(sys.argv[3]), workers=int(sys.argv[4]))
print(f"convert-seconds: {time.perf_counter() - t0:.3f}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/lightning_reshape_bench")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    work = Path(args.workdir)
    src = work / "src"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    generate(src)
    tag = (src / "latest").read_text().strip()
    tag_dir = src / tag
    files = sorted(p for p in tag_dir.iterdir() if p.suffix == ".pt")
    total = sum(p.stat().st_size for p in files)
    largest = max(p.stat().st_size for p in files)
    print(
        f"source: {tag_dir} ({len(files)} files, {total / 1e9:.2f} GB, largest shard "
        f"{largest / 1e9:.2f} GB; ready in {time.perf_counter() - t0:.1f} s, not timed)"
    )
    for p in files:  # warm the page cache equally for every tool
        with open(p, "rb") as fh:
            while fh.read(64 << 20):
                pass

    results: dict[str, tuple[float, float]] = {}

    def fresh(path: Path) -> Path:
        shutil.rmtree(path, ignore_errors=True)
        return path

    out = fresh(work / "cat.out")
    out.mkdir()
    results["cat"] = measure(["sh", "-c", f"cat {' '.join(map(str, files))} > {out / 'all'}"])
    for dp in (1, 3):
        dst = fresh(work / f"dp{dp}")
        results[f"convert dp 2->{dp} (CLI)"] = measure(
            [
                sys.executable,
                "-m",
                "lightning_reshape.cli",
                "convert",
                str(src),
                str(dst),
                "--tp",
                "1",
                "--dp",
                str(dp),
                "--quiet",
                "--workers",
                str(args.workers),
            ]
        )
        dst = fresh(work / f"dp{dp}_lib")
        results[f"convert dp 2->{dp} (library)"] = measure(
            [sys.executable, "-c", _INNER, str(src), str(dst), str(dp), str(args.workers)]
        )
    uni = fresh(work / "universal")
    results["ds_to_universal"] = measure(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(tag_dir),
            "--output_folder",
            str(uni),
            "--inject_missing_state",
        ]
    )
    print(f"{'tool':<32} {'wall s':>8} {'peak RSS GB':>12}")
    for name, (wall, rss) in results.items():
        print(f"{name:<32} {wall:>8.2f} {rss:>12.2f}")
    cat_w = results["cat"][0]
    uni_w, uni_rss = results["ds_to_universal"]
    for dp in (1, 3):
        w, rss = results[f"convert dp 2->{dp} (CLI)"]
        print(
            f"dp 2->{dp}: convert/cat = {w / cat_w:.2f}x (target <= 1.5x); "
            f"ds_to_universal/convert = {uni_w / w:.2f}x (target >= 3x); "
            f"convert peak / largest shard = {rss * 1e9 / largest:.2f}x (target < 1.5x); "
            f"ds_to_universal peak {uni_rss:.2f} GB"
        )


if __name__ == "__main__":
    main()
