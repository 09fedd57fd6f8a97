"""Run a function in N real processes joined by torch.distributed (gloo), as DeepSpeed expects.

Why: the checkpoint, strategy and reshape tests need real DeepSpeed engines at several world
sizes on a CPU-only machine, never mocks. Each launch costs seconds (interpreter + torch +
DeepSpeed import per process), so tests should do as much as possible inside one launch.

Usage::

    def worker(rank: int, world_size: int, out_dir: str) -> None:  # module level, picklable
        ...

    results = run_distributed(worker, 2, str(tmp_path), timeout=300)

``fn`` runs in every rank after ``deepspeed.init_distributed(dist_backend="gloo")``; its return
values (which must be picklable) come back as a list indexed by rank. If any rank raises, the
others are terminated and :class:`DistributedTestError` carries every failing rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["DistributedTestError", "find_free_port", "run_distributed"]


class DistributedTestError(RuntimeError):
    """One or more ranks failed or timed out; the message holds their tracebacks."""


def find_free_port() -> int:
    """A TCP port free right now on localhost (each launch gets its own, so runs can overlap)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    env: dict[str, str],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    """Child process body: set the launcher environment, init gloo, run ``fn``, report back."""
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    try:
        import deepspeed
        import torch.distributed as dist

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        try:
            value = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:  # noqa: BLE001 - teardown must not hide the real error
                    pass
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes.

    Returns the per-rank return values.

    ``fn`` must be a module-level function (spawn pickles it by name). ``env`` adds environment
    variables in every rank. Raises DistributedTestError with the tracebacks of failing ranks, or
    naming the ranks still running when ``timeout`` seconds have passed.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    child_env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    procs = [
        ctx.Process(
            target=_entry,
            args=(fn, rank, world_size, port, child_env, args, results),
            name=f"rank{rank}",
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()

    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    failures: dict[int, str] = {}
    try:
        while len(values) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(values) - set(failures))
                failures.update({r: f"timed out after {timeout:.0f}s" for r in missing})
                break
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if not p.is_alive() and r not in values and r not in failures
                ]
                # A rank that died without reporting (segfault, os._exit): give its queue
                # message a moment to arrive, then record the exit code.
                if dead:
                    time.sleep(0.5)
                    while True:
                        try:
                            rank, ok, payload = results.get_nowait()
                        except queue.Empty:
                            break
                        (values if ok else failures)[rank] = payload
                    for r in dead:
                        if r not in values and r not in failures:
                            failures[r] = f"exited with code {procs[r].exitcode} without reporting"
                if failures:
                    break
                continue
            (values if ok else failures)[rank] = payload
            if failures:
                break
    finally:
        if failures:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
        for proc in procs:
            proc.join(timeout=10 if not failures else 5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()

    if failures:
        details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        raise DistributedTestError(
            f"{len(failures)} of {world_size} ranks failed running {fn.__name__}:\n{details}"
        )
    return [values[r] for r in range(world_size)]
