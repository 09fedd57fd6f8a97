"""Shared check: planning one target rank's files alone gives exactly the full plan's files.

Why: a rank loading its own share directly plans only the files it loads
(``build_plan(files=rank_files(...))``); that plan must be the full plan filtered, bit for bit,
or the direct path and the copy path would diverge."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

from lightning_reshape.checkpoint.plan import Target, build_plan, rank_files, read_source_meta
from lightning_reshape.checkpoint.reader import read_manifest


def check_rank_plans(source: Path, targets: Iterable[Target]) -> int:
    """Assert, for every rank of every target, that its own plan equals the full plan filtered
    to its files, and that the ranks' files together are all the full plan's; the number of
    ranks checked."""
    manifest = read_manifest(source)
    meta = read_source_meta(manifest)
    checked = 0
    for t in targets:
        full = build_plan(manifest, meta, t)
        seen: set[str] = set()
        for tp, pp, dp in itertools.product(range(t.tp), range(t.pp), range(t.dp)):
            names = rank_files(manifest, meta, t, tp, pp, dp)
            own = build_plan(manifest, meta, t, files=names)
            assert own.files == tuple(f for f in full.files if f.name in names), (source, t)
            assert [f.name for f in own.files] == sorted(names), (source, t, names)
            assert own.sidecar == full.sidecar
            seen.update(names)
            checked += 1
        assert seen == {f.name for f in full.files}, (source, t)
    return checked
