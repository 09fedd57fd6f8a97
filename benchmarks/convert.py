"""Benchmark ``lightning-reshape convert`` against DeepSpeed's ``ds_to_universal`` and ``cat``.

Why: a reshape should cost about one copy of the bytes (the disk's limit), far less than
DeepSpeed's offline universal conversion, and need memory of about one shard, not of the whole
checkpoint. Writes (once, cached in --workdir) a ~1.3 GB ZeRO-1 dp-2 AdamW fp32 checkpoint of an
~85M-parameter model with stock DeepSpeed, then times each tool in its own subprocess
(``/usr/bin/time -v``: wall time and peak RSS of the process and its children) and prints ratios.

    python benchmarks/convert.py [--workdir DIR] [--repeat 3] [--cache warm|cold] [--workers N]

Fairness: before every timed run the previous outputs are removed and ``sync`` is run (so no tool
pays for another's write-back), then the source is either read into the page cache (``warm``) or
the cache is dropped (``cold``, root only). ``cat`` is shown with and without ``sync`` of its
output, since ``convert`` fsyncs what it writes. ``convert`` is timed as the whole CLI command
(interpreter start and imports included) and, separately, as the library call alone.
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
from collections.abc import Callable
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


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache (root only); False when not permitted."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def warm(files: list[Path]) -> None:
    """Read ``files`` once so every tool starts from the same (cached) source."""
    for p in files:
        with open(p, "rb") as fh:
            while fh.read(64 << 20):
                pass


def measure(cmd: list[str]) -> tuple[float, float, float | None]:
    """(wall seconds, peak RSS in GB, in-process library seconds or None) of ``cmd``.

    Wall time is the whole subprocess (interpreter start and imports included); peak RSS is
    that of the process and its children (``/usr/bin/time -v``).
    """
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    rss = int(m.group(1)) / 1e6 if m else float("nan")
    inner = re.search(r"convert-seconds: ([\d.]+)", proc.stdout)
    return wall, rss, float(inner.group(1)) if inner else None


# The library call alone, timed inside the process after the imports (torch, DeepSpeed).
_INNER = """
import sys, time
import deepspeed  # noqa: F401  (the load needs DeepSpeed's classes; imported before the clock)
from lightning_reshape.checkpoint.convert import convert_checkpoint
t0 = time.perf_counter()
convert_checkpoint(sys.argv[1], sys.argv[2], tp=1, dp=int(sys.argv[3]), workers=int(sys.argv[4]))
print(f"convert-seconds: {time.perf_counter() - t0:.3f}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/lightning_reshape_bench")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per tool (median shown)")
    ap.add_argument(
        "--cache",
        choices=("warm", "cold"),
        default="warm",
        help="warm: source files read into the page cache before every timed run; cold: sync "
        "and drop the page cache before every timed run (needs root)",
    )
    ap.add_argument("--skip-universal", action="store_true", help="do not run ds_to_universal")
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
    if args.cache == "cold" and not drop_caches():
        raise SystemExit("--cache cold needs permission to write /proc/sys/vm/drop_caches")
    print(
        f"cache: {args.cache}; before every timed run: old outputs removed, `sync`, "
        + (
            "page cache dropped (sources and Python/torch files read from disk)"
            if args.cache == "cold"
            else "source files read once (in the page cache)"
        )
        + f"; each tool runs once untimed, then {args.repeat} timed (ds_to_universal: timed only)"
    )

    def fresh(path: Path) -> Path:
        shutil.rmtree(path, ignore_errors=True)
        return path

    def prepare() -> None:
        if args.cache == "cold":
            drop_caches()
        else:
            subprocess.run(["sync"], check=True)
            warm(files)

    cat_all = " ".join(map(str, files))
    tools: dict[str, tuple[Path, Callable[[Path], list[str]]]] = {
        "cat": (work / "cat.out", lambda d: ["sh", "-c", f"mkdir {d} && cat {cat_all} > {d}/all"]),
        "cat + sync (durable)": (
            work / "cat.out",
            lambda d: ["sh", "-c", f"mkdir {d} && cat {cat_all} > {d}/all && sync {d}/all"],
        ),
        "python -c 'import torch, deepspeed'": (
            work / "none",
            lambda d: [sys.executable, "-c", "import torch, deepspeed"],
        ),
    }
    for dp in (1, 3):
        tools[f"convert dp 2->{dp} (CLI)"] = (
            work / f"dp{dp}",
            lambda d, dp=dp: [  # type: ignore[misc]
                sys.executable,
                "-m",
                "lightning_reshape.cli",
                "convert",
                str(src),
                str(d),
                "--tp",
                "1",
                "--dp",
                str(dp),
                "--quiet",
                "--workers",
                str(args.workers),
            ],
        )
        tools[f"convert dp 2->{dp} (library)"] = (
            work / f"dp{dp}_lib",
            lambda d, dp=dp: [  # type: ignore[misc]
                sys.executable,
                "-c",
                _INNER,
                str(src),
                str(d),
                str(dp),
                str(args.workers),
            ],
        )
    if not args.skip_universal:
        tools["ds_to_universal"] = (
            work / "universal",
            lambda d: [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(tag_dir),
                "--output_folder",
                str(d),
                "--inject_missing_state",
            ],
        )

    results: dict[str, tuple[float, float, float | None]] = {}
    for name, (out, cmd) in tools.items():
        runs = []
        for i in range(args.repeat + (0 if name == "ds_to_universal" else 1)):
            fresh(out)
            prepare()
            r = measure(cmd(out))
            if i > 0 or name == "ds_to_universal":  # the first run warms imports, untimed
                runs.append(r)
        runs.sort(key=lambda r: r[0])
        results[name] = runs[len(runs) // 2]
        walls = ", ".join(f"{r[0]:.2f}" for r in runs)
        print(f"  {name}: wall {walls} s", flush=True)
        fresh(out)
    subprocess.run(["sync"], check=True)

    print(f"\n{'tool (median)':<38} {'wall s':>8} {'library s':>10} {'peak RSS GB':>12}")
    for name, (wall, rss, inner) in results.items():
        lib = f"{inner:>10.2f}" if inner is not None else f"{'':>10}"
        print(f"{name:<38} {wall:>8.2f} {lib} {rss:>12.2f}")
    cat_w = results["cat"][0]
    cat_sync_w = results["cat + sync (durable)"][0]
    for dp in (1, 3):
        w, rss, _ = results[f"convert dp 2->{dp} (CLI)"]
        lib = results[f"convert dp 2->{dp} (library)"][2] or float("nan")
        line = (
            f"dp 2->{dp}: convert/cat (target <= 1.5x): CLI/cat = {w / cat_w:.2f}x, "
            f"CLI/(cat+sync) = {w / cat_sync_w:.2f}x, library/cat = {lib / cat_w:.2f}x, "
            f"library/(cat+sync) = {lib / cat_sync_w:.2f}x; "
        )
        if "ds_to_universal" in results:
            uni_w, uni_rss, _ = results["ds_to_universal"]
            line += (
                f"ds_to_universal/CLI = {uni_w / w:.2f}x (target >= 3x; its peak "
                f"{uni_rss:.2f} GB); "
            )
        line += f"CLI peak / largest shard = {rss * 1e9 / largest:.2f}x (target < 1.5x)"
        print(line)


if __name__ == "__main__":
    main()
