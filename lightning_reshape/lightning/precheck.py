"""Checks that run before Lightning starts the other processes: layout and ``ckpt_path``.

Why: a parallel layout that does not fit ``devices x num_nodes``, or a ``ckpt_path`` that is
missing or not a DeepSpeed checkpoint, would otherwise surface only after every rank has
started and built its DeepSpeed engine (up to a minute), as one traceback per rank. Checked
before the launch, it is one message, once, in seconds.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any

from lightning_reshape.errors import CheckpointError, TopologyError

__all__ = ["check_before_launch", "install_precheck"]

# ckpt_path values Lightning resolves itself (not paths)
_KEYWORDS = frozenset({"last", "best", "hpc", "registry"})


def _ckpt_path_of(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The ``ckpt_path`` argument of the trainer function about to be launched, if it has one."""
    try:
        bound = inspect.signature(function).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    return bound.arguments.get("ckpt_path")


def check_before_launch(strategy: Any, ckpt_path: Any) -> None:
    """Raise one clear error if the layout cannot fit the processes Lightning will start, or
    if ``ckpt_path`` (when given as a local path) is not a DeepSpeed checkpoint."""
    world = int(strategy.num_nodes) * int(strategy.num_processes)
    try:
        strategy.parallel.resolve(world)
    except TopologyError as exc:
        raise TopologyError(
            f"parallel layout {strategy.parallel} does not fit the {world} processes of "
            f"num_nodes={strategy.num_nodes} x devices={strategy.num_processes}: {exc}"
        ) from None
    if ckpt_path is None or getattr(strategy, "load_full_weights", False):
        return  # load_full_weights: a single consolidated file is what Lightning expects
    if not isinstance(ckpt_path, (str, os.PathLike)):
        return
    text = os.fspath(ckpt_path)
    if text in _KEYWORDS or "://" in text:
        return  # resolved by Lightning, or a remote path we cannot look at from here
    from lightning_reshape.checkpoint.reader import resolve_checkpoint

    try:
        resolve_checkpoint(text)
    except CheckpointError as exc:
        raise CheckpointError(f"ckpt_path={text!r} cannot be resumed: {exc}") from None


def install_precheck(strategy: Any) -> None:
    """Run :func:`check_before_launch` at the start of the strategy's launcher.

    The launcher object is kept (Lightning checks its type, e.g. to kill child processes on an
    error); only its ``launch`` is wrapped on this instance.
    """
    launcher = getattr(strategy, "_launcher", None)
    if launcher is None or getattr(launcher, "_lightning_reshape_precheck", False):
        return
    inner = launcher.launch

    @functools.wraps(inner)
    def launch(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        plain = {k: v for k, v in kwargs.items() if k != "trainer"}
        check_before_launch(strategy, _ckpt_path_of(function, args, plain))
        return inner(function, *args, **kwargs)

    launcher.launch = launch
    launcher._lightning_reshape_precheck = True
