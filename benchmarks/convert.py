"""Benchmark ``lightning-reshape convert`` against DeepSpeed's ``ds_to_universal`` and ``cat``.

Why: a reshape should cost about one copy of the bytes (the disk's limit), far less than
DeepSpeed's offline universal conversion, and need memory of about one shard, not of the whole
checkpoint. Writes (once, cached in --workdir) two ZeRO-1 AdamW fp32 checkpoints with stock
DeepSpeed on 2 ranks: ~1.36 GB at dp 2 (an ~85M-parameter model) and ~1.2 GB at tp 2 (column and
row parallel layers, ~75M parameters, split recorded in DeepSpeed's ``universal_checkpoint_info``),
then times each tool in its own subprocess (``/usr/bin/time -v``: wall time and peak RSS of the
process and its children) and prints ratios for a dp change (2->1, 2->3) and a tp change (2->1).

    python benchmarks/convert.py [--workdir DIR] [--repeat 3] [--cache warm|cold] [--workers N]

Fairness: before every timed run the previous outputs are removed and ``sync`` is run (so no tool
pays for another's write-back), then the source is either read into the page cache (``warm``) or
the cache is dropped (``cold``, root only). ``cat`` is shown with and without ``sync`` of its
output, since ``convert`` fsyncs what it writes. ``convert`` is timed as the whole CLI command
(interpreter start and imports included) and, separately, as the library call alone; and with
``--no-crc-check`` (no CRC-32 check of the source records; output CRCs are written either way),
to show what the check costs.
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
LAYERS = 9  # dp source: 9 x (3072 x 3072 + 3072) = 84.9M parameters
TP_PAIRS = 4  # tp source: 4 x (column + row parallel 3072 x 3072) = 75.5M parameters

# How the tp source's parameters are split, in DeepSpeed's own vocabulary: ds_to_universal
# needs it, and lightning-reshape reads the same record (no sidecar, no --tp-rule).
TP_UC_INFO = {
    "universal_checkpoint_version": 0.2,
    "parameter_with_row_parallelism_patterns": [r"row\.\d+\.weight"],
    "tp_replicated_parameter_patterns": [r"row\.\d+\.bias"],
}


def _gen_rank(rank: int, world: int, port: int, out: str, tp: int) -> None:
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
    mpu, client = None, {}
    if tp == 1:
        model = torch.nn.Sequential(*[torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS)])
    else:
        from lightning_reshape.distributed import ParallelState
        from lightning_reshape.nn.layers import ColumnParallelLinear, RowParallelLinear
        from lightning_reshape.topology import ParallelConfig

        mpu = ParallelState.build(ParallelConfig(tp=tp).resolve(world))

        class TPStack(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.col = torch.nn.ModuleList(
                    ColumnParallelLinear(HIDDEN, HIDDEN, mpu, seed=i) for i in range(TP_PAIRS)
                )
                self.row = torch.nn.ModuleList(
                    RowParallelLinear(HIDDEN, HIDDEN, mpu, seed=100 + i) for i in range(TP_PAIRS)
                )

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                for col, row in zip(self.col, self.row, strict=True):
                    x = row(torch.relu(col(x)))
                return x

        model = TPStack()
        client = {"universal_checkpoint_info": TP_UC_INFO}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=mpu)
    loss = engine(torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(1)))
    loss = loss.pow(2).mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out, client_state=client)


def generate(src: Path, tp: int) -> None:
    """Write a source checkpoint with stock DeepSpeed on 2 ranks: dp 2 (``tp`` 1) or tp 2 (dp 1);
    skipped when cached."""
    if (src / "latest").is_file():
        return
    import multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_gen_rank, args=(r, 2, port, str(src), tp)) for r in range(2)]
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


# The library call alone, timed inside the process after its imports.
_INNER = """
import sys, time
from lightning_reshape.checkpoint.convert import convert_checkpoint
tp, dp, workers = (int(x) for x in sys.argv[3:6])
t0 = time.perf_counter()
convert_checkpoint(sys.argv[1], sys.argv[2], tp=tp, dp=dp, workers=workers)
print(f"convert-seconds: {time.perf_counter() - t0:.3f}")
"""

# (case, source, target tp, target dp)
CASES = (
    ("dp 2->1", "dp2", 1, 1),
    ("dp 2->3", "dp2", 1, 3),
    ("tp 2->1", "tp2", 1, 1),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/lightning_reshape_bench")
    ap.add_argument("--workers", type=int, default=2)
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
    work.mkdir(parents=True, exist_ok=True)
    sources: dict[str, tuple[Path, list[Path]]] = {}
    for key, tp in (("dp2", 1), ("tp2", 2)):
        t0 = time.perf_counter()
        src = work / ("src" if key == "dp2" else "src_tp2")
        generate(src, tp)
        tag_dir = src / (src / "latest").read_text().strip()
        files = sorted(p for p in tag_dir.iterdir() if p.suffix == ".pt")
        sources[key] = (src, files)
        total = sum(p.stat().st_size for p in files)
        largest = max(p.stat().st_size for p in files)
        print(
            f"source {key}: {tag_dir} ({len(files)} files, {total / 1e9:.2f} GB, largest shard "
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
        + f"; each tool runs once untimed, then {args.repeat} timed (ds_to_universal: timed "
        f"only); convert --workers {args.workers}"
    )

    def fresh(path: Path) -> Path:
        shutil.rmtree(path, ignore_errors=True)
        return path

    # (tool name) -> (output dir, command, source files to warm)
    tools: dict[str, tuple[Path, Callable[[Path], list[str]], list[Path]]] = {}
    for key, (_, files) in sources.items():
        cat_all = " ".join(map(str, files))
        tools[f"cat {key}"] = (
            work / "cat.out",
            lambda d, c=cat_all: ["sh", "-c", f"mkdir {d} && cat {c} > {d}/all"],  # type: ignore[misc]
            files,
        )
        tools[f"cat + sync {key} (durable)"] = (
            work / "cat.out",
            lambda d, c=cat_all: [  # type: ignore[misc]
                "sh",
                "-c",
                f"mkdir {d} && cat {c} > {d}/all && sync {d}/all",
            ],
            files,
        )
        if not args.skip_universal:
            tools[f"ds_to_universal {key}"] = (
                work / "universal",
                lambda d, t=files[0].parent: [  # type: ignore[misc]
                    sys.executable,
                    "-m",
                    "deepspeed.checkpoint.ds_to_universal",
                    "--input_folder",
                    str(t),
                    "--output_folder",
                    str(d),
                    "--inject_missing_state",
                ],
                files,
            )
    tools["python -c 'import torch, deepspeed'"] = (
        work / "none",
        lambda d: [sys.executable, "-c", "import torch, deepspeed"],
        [],
    )
    for case, key, tp, dp in CASES:
        src, files = sources[key]
        tools[f"convert {case} (CLI)"] = (
            work / "conv",
            lambda d, s=src, tp=tp, dp=dp: [  # type: ignore[misc]
                sys.executable,
                "-m",
                "lightning_reshape.cli",
                "convert",
                str(s),
                str(d),
                "--tp",
                str(tp),
                "--dp",
                str(dp),
                "--quiet",
                "--workers",
                str(args.workers),
            ],
            files,
        )
        tools[f"convert {case} (CLI, --no-crc-check)"] = (
            work / "conv",
            lambda d, s=src, tp=tp, dp=dp: [  # type: ignore[misc]
                sys.executable,
                "-m",
                "lightning_reshape.cli",
                "convert",
                str(s),
                str(d),
                "--tp",
                str(tp),
                "--dp",
                str(dp),
                "--quiet",
                "--workers",
                str(args.workers),
                "--no-crc-check",
            ],
            files,
        )
        tools[f"convert {case} (library)"] = (
            work / "conv",
            lambda d, s=src, tp=tp, dp=dp: [  # type: ignore[misc]
                sys.executable,
                "-c",
                _INNER,
                str(s),
                str(d),
                str(tp),
                str(dp),
                str(args.workers),
            ],
            files,
        )

    results: dict[str, tuple[float, float, float | None]] = {}
    for name, (out, cmd, files) in tools.items():
        runs = []
        universal = name.startswith("ds_to_universal")
        for i in range(args.repeat + (0 if universal else 1)):
            fresh(out)
            if args.cache == "cold":
                drop_caches()
            else:
                subprocess.run(["sync"], check=True)
                warm(files)
            r = measure(cmd(out))
            if i > 0 or universal:  # the first run warms imports, untimed
                runs.append(r)
        runs.sort(key=lambda r: r[0])
        results[name] = runs[len(runs) // 2]
        walls = ", ".join(f"{r[0]:.2f}" for r in runs)
        print(f"  {name}: wall {walls} s", flush=True)
        if "(CLI" in name:  # what was timed must be right: the last output, verified
            src = files[0].parent.parent
            check = subprocess.run(
                [sys.executable, "-m", "lightning_reshape.cli", "verify", str(src), str(out)],
                capture_output=True,
                text=True,
            )
            if check.returncode != 0:
                raise SystemExit(f"{name}: output differs from the source:\n{check.stdout}")
            verdict = check.stdout.strip().splitlines()[-1]
            print(f"    lightning-reshape verify {src.name} {out.name}: {verdict}", flush=True)
        fresh(out)
    subprocess.run(["sync"], check=True)

    print(f"\n{'tool (median)':<46} {'wall s':>8} {'library s':>10} {'peak RSS GB':>12}")
    for name, (wall, rss, inner) in results.items():
        lib = f"{inner:>10.2f}" if inner is not None else f"{'':>10}"
        print(f"{name:<46} {wall:>8.2f} {lib} {rss:>12.2f}")
    print()

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    for case, key, _, _ in CASES:
        largest = max(p.stat().st_size for p in sources[key][1])
        w, rss, _ = results[f"convert {case} (CLI)"]
        lib = results[f"convert {case} (library)"][2] or float("nan")
        cat_w = results[f"cat {key}"][0]
        durable = w / results[f"cat + sync {key} (durable)"][0]
        print(
            f"{case}: CLI {w:.2f} s (library call {lib:.2f} s)\n"
            f"  vs cat + sync, same durability as convert's fsynced output: {durable:.2f}x "
            f"(target <= 1.5x: {verdict(durable <= 1.5)}); vs cat left in the page cache: "
            f"{w / cat_w:.2f}x"
        )
        plain = results[f"convert {case} (CLI, --no-crc-check)"][0]
        print(
            f"  CRC-32 check of the source's records: CLI {w:.2f} s with, {plain:.2f} s without "
            f"(--no-crc-check): {w / plain:.2f}x ({100 * (w / plain - 1):+.0f}%)"
        )
        if f"ds_to_universal {key}" in results:
            uni_w, uni_rss, _ = results[f"ds_to_universal {key}"]
            print(
                f"  ds_to_universal / CLI: {uni_w / w:.2f}x (target >= 3x: "
                f"{verdict(uni_w / w >= 3)}); ds_to_universal peak {uni_rss:.2f} GB"
            )
        peak = rss * 1e9 / largest
        print(
            f"  CLI peak RSS {rss:.2f} GB = {peak:.2f}x the largest shard (target < 1.5x: "
            f"{verdict(peak < 1.5)})"
        )


if __name__ == "__main__":
    main()
