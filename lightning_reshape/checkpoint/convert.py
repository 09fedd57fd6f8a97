"""The library entry point: reshape a DeepSpeed checkpoint to a new (tp, pp, dp, ZeRO stage).

Why: the Lightning strategy calls :func:`convert_checkpoint` on resume (or each rank runs its
share via :func:`plan_conversion` + :func:`execute_plan` + :func:`finalize_output`), and the CLI's
``convert`` is a thin wrapper around it. The output is an engine save dir (``latest`` + tag
folder) that stock ``engine.load_checkpoint(dst)`` loads, optimizer states included.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypedDict, Unpack

from lightning_reshape.checkpoint.entry_checks import check_rank
from lightning_reshape.checkpoint.execute import (
    check_output,
    check_tag,
    discard_partial,
    execute_plan,
    finalize_output,
    lock_output,
    output_errors,
    prepare_output,
    write_plan,
)
from lightning_reshape.checkpoint.manifest import Manifest
from lightning_reshape.checkpoint.plan import (
    Plan,
    Target,
    build_plan,
    plan_context,
    plan_from_context,
    rank_file_names,
    read_source_meta,
)
from lightning_reshape.checkpoint.reader import TPRule, read_manifest, refuse_elastic
from lightning_reshape.errors import CheckpointError

__all__ = [
    "convert_checkpoint",
    "copy_recovery_script",
    "plan_conversion",
    "plan_rank_load",
    "LayoutRequest",
    "execute_plan",
    "prepare_output",
    "finalize_output",
    "lock_output",
    "discard_partial",
    "check_output",
    "check_destination",
]

RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


class LayoutRequest(TypedDict, total=False):
    """The target layout and how to read the source, as keyword arguments of
    :func:`plan_conversion` and :func:`plan_rank_load`.

    ``tp``, ``pp``, ``dp``, ``zero_stage``: the target's; an axis or stage left out (or None)
    keeps the source's. ``source_tag``: the source's tag folder (default: its ``latest``).
    ``trust``: load pickles outside the allow-list. ``tp_rules``: tensor-parallel splits that
    override the sidecar. ``pp_partition``: the target PipelineModule's ``partition_method``.
    """

    tp: int | None
    pp: int | None
    dp: int | None
    zero_stage: int | None
    source_tag: str | None
    trust: bool
    tp_rules: Sequence[TPRule] | None
    pp_partition: str


def _source_and_target(
    src: str | os.PathLike[str],
    *,
    tp: int | None = None,
    pp: int | None = None,
    dp: int | None = None,
    zero_stage: int | None = None,
    source_tag: str | None = None,
    trust: bool = False,
    tp_rules: Sequence[TPRule] | None = None,
    pp_partition: str = "parameters",
) -> tuple[Manifest, Target, tuple[TPRule, ...]]:
    """``src``'s manifest (metadata only), the target and the tp rules; None axes keep the
    source's."""
    rules = tuple(tp_rules or ())
    manifest = read_manifest(src, tag=source_tag, trust_checkpoint=trust, tp_rules=rules)
    refuse_elastic(manifest)
    read_source_meta(manifest)  # carried by the manifest: planning does no IO
    src_topo = manifest.topology
    target = Target(
        src_topo.tp if tp is None else tp,
        src_topo.pp if pp is None else pp,
        src_topo.dp if dp is None else dp,
        src_topo.zero_stage if zero_stage is None else zero_stage,
        pp_partition,
    )
    return manifest, target, rules


def plan_conversion(src: str | os.PathLike[str], **request: Unpack[LayoutRequest]) -> Plan:
    """Read ``src``'s metadata and plan the reshape to ``request`` (:class:`LayoutRequest`; no
    data is read or written)."""
    manifest, target, rules = _source_and_target(src, **request)
    return build_plan(manifest, None, target, tp_rules=rules)


def plan_rank_load(
    src: str | os.PathLike[str], rank: tuple[int, int, int], **request: Unpack[LayoutRequest]
) -> tuple[Plan, Callable[[str], Plan]]:
    """One target rank's direct load: the plan of the files its engine loads (``rank`` =
    (tp rank, pp stage, dp rank), :func:`rank_files`), so its planning does not grow with the
    world size, and a planner of any other target file by name, for a file DeepSpeed asks for
    that ``rank_files`` did not predict (a pipeline engine without an mpu reads mp_rank_00)."""
    rank = check_rank(rank, "plan_rank_load")  # before any IO
    manifest, target, rules = _source_and_target(src, **request)
    ctx = plan_context(manifest, read_source_meta(manifest), target, rules)  # computed once
    own = rank_file_names(ctx, *rank)

    def plan_file(name: str) -> Plan:
        return plan_from_context(ctx, (name,))

    return plan_from_context(ctx, own), plan_file


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    tp: int | None = None,
    pp: int | None = None,
    dp: int | None = None,
    zero_stage: int | None = None,
    tag: str | None = None,
    trust: bool = False,
    progress: bool = False,
    workers: int = 1,
    tp_rules: Sequence[TPRule] | None = None,
    pp_partition: str = "parameters",
    check_crc: bool = True,
    on_done: Callable[[Plan, bool], object] | None = None,
) -> Path:
    """Write ``src`` reshaped to (tp, pp, dp, zero_stage) as an engine save dir at ``dst``.

    Axes and stage left as None keep the source's.

    ``pp_partition`` is the target PipelineModule's ``partition_method`` ("parameters",
    "uniform" or boundaries "0,3,6"). The tag is the source's unless ``tag`` is given;
    ``dst/latest`` points at it (unless ``dst`` is the source's own save dir, possible when
    ``src`` names the tag folder, whose ``latest`` is left alone). Returns the tag folder.
    ``check_crc=False`` skips the CRC-32 check of the source's tensor records (the output's
    CRC-32s are written either way). ``on_done(plan, reused)`` is called at the end, ``reused``
    True when a complete output of the same plan was already there (nothing was written).

    Refused (CheckpointError, before anything is written): a destination that is an existing
    file or lies under one, and a destination inside the source tree (the path given as ``src``
    or the source's tag folder): writing there would change what the source resolves to.
    """
    check_destination(dst)
    plan = plan_conversion(
        src,
        tp=tp,
        pp=pp,
        dp=dp,
        zero_stage=zero_stage,
        trust=trust,
        tp_rules=tp_rules,
        pp_partition=pp_partition,
    )
    out_tag = check_tag(tag or plan.source_tag)  # before anything is written
    check_destination(dst, source=(src, plan.source_root))
    src_save_dir = Path(plan.source_root).parent.resolve()
    latest = Path(dst).resolve() != src_save_dir
    with output_errors(dst):  # first: a full disk is reported before the reshape, not after
        Path(dst).mkdir(parents=True, exist_ok=True)
        copy_recovery_script(dst)
    reused: list[bool] = []
    out = write_plan(
        plan,
        dst,
        out_tag,
        workers=workers,
        progress=progress,
        latest=latest,
        check_crc=check_crc,
        on_reuse=lambda: reused.append(True),
    )
    if on_done is not None:
        on_done(plan, bool(reused))
    return out


def check_destination(
    dst: str | os.PathLike[str], *, source: Sequence[str | os.PathLike[str]] = ()
) -> None:
    """Refuse an output folder that cannot be one: an existing file, a path under a file, or a
    path inside any of the ``source`` folders (the original is read-only to us)."""
    path = Path(dst)
    for ancestor in [path, *path.parents]:
        try:
            st = os.stat(ancestor)
        except (FileNotFoundError, NotADirectoryError):  # not there yet, or under a file
            continue
        except OSError as exc:
            raise CheckpointError(
                f"{dst}: cannot use as the output folder: {ancestor}: {exc.strerror}"
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            what = "is an existing file" if ancestor == path else f"lies under the file {ancestor}"
            raise CheckpointError(
                f"{dst}: {what}, not a folder; give a folder (new or existing) for the output"
            )
        break
    resolved = path.resolve()
    for root in source:
        tree = Path(root).resolve()
        if resolved == tree or tree in resolved.parents:
            raise CheckpointError(
                f"{dst}: lies inside the source checkpoint {tree}; the source is never "
                "modified: write the reshaped copy outside it"
            )


def copy_recovery_script(save_dir: str | os.PathLike[str]) -> list[Path]:
    """Put DeepSpeed's ``zero_to_fp32.py`` (and ``zero_to_torch.py`` where the installed version
    has it) beside the output, as every stock ZeRO save does; returns the files written.

    Why: users expect it next to ``latest`` to consolidate weights without our package. Found
    through the installed package's location (DeepSpeed is not imported); existing files are
    left alone, and without DeepSpeed installed nothing is copied. Raises OSError (no partial
    file left) when the folder cannot be written.
    """
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return []
    utils = Path(next(iter(spec.submodule_search_locations))) / "utils"
    written = []
    for name in RECOVERY_SCRIPTS:
        script, dst = utils / name, Path(save_dir) / name
        if not script.is_file() or dst.exists():
            continue
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        try:
            tmp.unlink(missing_ok=True)  # a planted link there is removed, never written through
            shutil.copyfile(script, tmp)
            os.chmod(tmp, 0o755)  # stock saves make them executable too
            os.replace(tmp, dst)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OSError(exc.errno, exc.strerror, os.fspath(dst)) from None  # name the output
        written.append(dst)
    return written
