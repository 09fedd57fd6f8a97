"""The main job: train at one layout, resume at another with auto-reshape, check the loss.

    python examples/resume_demo.py [--workdir DIR] [--steps N] [--first tp2] [--then dp_only]

1. trains the tiny GPT for N steps at ``--first`` (default tp=2, dp=1 on 2 CPU processes)
   and saves a DeepSpeed checkpoint;
2. resumes from it at ``--then`` (default tp=1, dp=2): the strategy sees the layout change,
   reshapes the checkpoint and loads it;
3. runs the same 2N steps without stopping, as the reference;
and prints the losses after the resume next to the reference's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

TRAIN = Path(__file__).with_name("train.py")


def run(workdir: Path, name: str, overrides: list[str]) -> dict:
    """One ``examples/train.py`` run; returns the summary rank 0 wrote."""
    summary = workdir / f"{name}.json"
    log = workdir / f"{name}.log"
    env = {**os.environ, "LIGHTNING_RESHAPE_SUMMARY": str(summary)}
    cmd = [sys.executable, str(TRAIN), *overrides, f"hydra.run.dir={workdir / name}"]
    print(f"$ python examples/train.py {' '.join(overrides)}", flush=True)
    with open(log, "w") as out:
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    lines = log.read_text().splitlines()
    for line in lines:
        if "lightning-reshape:" in line or " loss " in line:
            print("   ", line.split(" - ", 1)[-1])
    if done.returncode:
        print("\n".join(lines[-30:]), file=sys.stderr)
        raise SystemExit(f"{name} failed (exit {done.returncode}); full log: {log}")
    return json.loads(summary.read_text())


@contextlib.contextmanager
def workdir_for(given: Path | None) -> Iterator[Path]:
    """The folder the demo works in: ``given`` (created if needed, always kept), or a new
    temporary folder that is removed when the demo succeeds and kept, its path printed, when
    it fails, so its logs can be read."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    tmp = Path(tempfile.mkdtemp(prefix="lightning-reshape-demo-"))
    try:
        yield tmp
    except BaseException:
        print(f"kept the demo's folder for its logs: {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="kept afterwards (default: a temporary folder, removed when the demo succeeds)",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--first", default="tp2", help="parallel preset to train at")
    parser.add_argument("--then", default="dp_only", help="parallel preset to resume at")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    with workdir_for(args.workdir) as workdir:
        demo(workdir, args)


def demo(workdir: Path, args: argparse.Namespace) -> None:
    """Train, resume at the other layout, train the reference; exit 1 on a loss mismatch."""
    ckpt = workdir / f"{args.first}.ckpt"
    n = args.steps

    run(workdir, "first", [f"parallel={args.first}", f"trainer.max_steps={n}", f"save_path={ckpt}"])
    resumed = run(
        workdir,
        "resumed",
        [f"parallel={args.then}", f"trainer.max_steps={2 * n}", f"ckpt_path={ckpt}"],
    )
    reference = run(workdir, "reference", [f"parallel={args.first}", f"trainer.max_steps={2 * n}"])

    print(f"\nresumed at {resumed['layout']}\n{resumed['resume']}\n")
    ref = dict(reference["losses"])
    print(f"{'step':>5} {'resumed':>10} {'never stopped':>14} {'difference':>11}")
    worst = 0.0
    for step, loss in resumed["losses"]:
        diff = abs(loss - ref[step])
        worst = max(worst, diff)
        print(f"{step:>5} {loss:>10.5f} {ref[step]:>14.5f} {diff:>11.2e}")
    reshaped = bool(resumed.get("reshaped"))
    ok = reshaped and worst <= args.tolerance
    print(
        f"\ncheckpoint reshaped: {reshaped}; largest loss difference after resume {worst:.2e} "
        f"(tolerance {args.tolerance:g}: fp32 sums in another order across tp/dp): "
        f"{'loss carried on' if ok else 'MISMATCH'}"
    )
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
