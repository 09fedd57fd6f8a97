"""Find a DeepSpeed checkpoint on disk and describe it as a :class:`Manifest`; read pieces lazily.

Why: DeepSpeed spreads one logical tensor over model files, ZeRO flat partitions, pipeline
layer files and tensor-parallel shards, with the layout hidden in string keys. This module
turns all of that into explicit geometry once, reading only metadata (files are memory-mapped,
so tensors are not paged in), and never writes anything. It finds, scans, loads and checks the
files; what each DeepSpeed format holds is read by its module in
:mod:`lightning_reshape.checkpoint.formats`, which :func:`_build` dispatches to.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from lightning_reshape.checkpoint import torchfile
from lightning_reshape.checkpoint.manifest import (
    ROLE_BUFFER,
    ROLE_FP32,
    ROLE_OPTIM,
    ROLE_PARAM,
    KeyPath,
    Manifest,
    Piece,
    ScalarState,
    SourceTopology,
    StateRef,
    TensorEntry,
)
from lightning_reshape.checkpoint.sidecar import SIDECAR_NAME, Sidecar, TPSplit, read_sidecar
from lightning_reshape.checkpoint.torchfile import TensorRef, is_tensor
from lightning_reshape.errors import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CheckpointLocation",
    "TPRule",
    "resolve_checkpoint",
    "read_manifest",
    "ShardReader",
    "load_entry",
    "entry_bytes",
    "consolidate_fp32",
    "consolidate_optimizer_states",
    "refuse_elastic",
]

MODEL_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
Z3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
OPTIM_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
# layer_XX-model_YY-model_states.pt; "-model_YY" is absent when the pipeline topology has no
# model-parallel axis (``PipelineModule(num_stages=N)``): then tp is 1
# parameters of pipeline TiedLayerSpec modules: tied_modules.<key>.<name in the module>
TIED_PREFIX = "tied_modules."
LAYER_RE = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
EXPERT_RE = re.compile(r"^(layer_\d+_)?expert_\d+_mp_rank_\d+_model_states\.pt$|^expp_rank_")
TAG_HINT = re.compile(r"^global_step(\d+)$")

# The keys every DeepSpeed 0.19 model-states file starts with, in its order (the engine's
# ``_common_checkpoint_state``; a pipeline engine's save holds exactly these).
DS_COMMON_KEYS = (
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "checkpoint_parallel_dimensions",
    "ds_config",
    "ds_version",
)
# Keys DeepSpeed itself writes into the model-states file; everything else is client state.
DS_MODEL_KEYS = frozenset(
    {
        *DS_COMMON_KEYS,
        "sparse_tensor_module_names",
        "num_experts",
        "ds_autoep_layers",
        "universal_checkpoint_info",
        "compiled_autograd",
    }
)
# Non-tensor DeepSpeed state a reshape must carry over verbatim.
DS_CARRIED_KEYS = (
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "sparse_tensor_module_names",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "ds_config",
    "ds_version",
)


@dataclass(frozen=True)
class CheckpointLocation:
    """Where a checkpoint's tag folder is and how it was found."""

    layout: str  # "lightning-deepspeed" | "deepspeed"
    tag_dir: str
    tag: str
    save_dir: str | None


@dataclass(frozen=True)
class TPRule:
    """User rule: parameters whose name matches ``pattern`` (re.search) split as ``split``.

    ``split=None`` means replicated across tensor-parallel ranks.
    """

    pattern: str
    split: TPSplit | None


# --------------------------------------------------------------------------------------------
# locating the tag folder


def _is_tag_dir(path: str) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(
        MODEL_RE.match(n) or Z3_MODEL_RE.match(n) or LAYER_RE.match(n) or OPTIM_RE.match(n)
        for n in names
    )


def resolve_checkpoint(path: str | os.PathLike[str], tag: str | None = None) -> CheckpointLocation:
    """Turn what the user passed into the tag folder to read, with a friendly error otherwise.

    Accepts a Lightning ``X.ckpt`` directory, a DeepSpeed save directory (``latest`` + tags,
    or ``tag=`` to choose one), or a tag folder itself.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        _refuse_single_file(path)
    latest = os.path.join(path, "latest")
    if tag is None and os.path.isfile(latest):
        try:
            with open(latest, encoding="utf-8") as fh:
                tag = fh.read().strip()
        except OSError as exc:
            raise CheckpointError(f"{latest}: cannot read ({exc})") from exc
        if not tag:
            raise CheckpointError(f"{latest}: is empty; pass the tag folder directly")
    if tag is not None:
        return _tag_location(path, tag, latest)
    if _is_tag_dir(path):
        parent = os.path.dirname(path)
        name = os.path.basename(path)
        layout = "deepspeed"
        if name == "checkpoint" and os.path.isfile(os.path.join(parent, "latest")):
            layout = "lightning-deepspeed"
        return CheckpointLocation(layout=layout, tag_dir=path, tag=name, save_dir=None)
    return _only_tag_inside(path)


def _refuse_single_file(path: str) -> NoReturn:
    """A file is never a DeepSpeed checkpoint: say which directory to pass, or what it is."""
    parent = os.path.dirname(path)
    hint = parent
    if os.path.basename(parent) == "checkpoint" and os.path.isfile(
        os.path.join(os.path.dirname(parent), "latest")
    ):
        hint = os.path.dirname(parent)
    if _is_tag_dir(parent):
        raise CheckpointError(
            f"{path}: is a single file; a DeepSpeed checkpoint is a directory. "
            f"Pass the checkpoint directory instead: {hint}"
        )
    raise CheckpointError(f"{path}: {_describe_single_file(path)}")


def _tag_location(path: str, tag: str, latest: str) -> CheckpointLocation:
    """The tag folder ``tag`` of the save directory ``path`` (named by ``latest`` or ``tag=``)."""
    tag_dir = os.path.join(path, tag)
    if not os.path.isdir(tag_dir):
        avail = sorted(d for d in os.listdir(path) if _is_tag_dir(os.path.join(path, d)))
        raise CheckpointError(
            f"{tag_dir}: tag folder {tag!r} "
            f"(from {latest if os.path.isfile(latest) else 'tag='}) "
            f"does not exist; tags present: {avail or 'none'}"
        )
    if not _is_tag_dir(tag_dir):
        raise CheckpointError(
            f"{tag_dir}: holds no DeepSpeed model-state files (*_model_states.pt); "
            "the save is incomplete or this is not a DeepSpeed checkpoint"
        )
    layout = "lightning-deepspeed" if tag == "checkpoint" else "deepspeed"
    return CheckpointLocation(layout=layout, tag_dir=tag_dir, tag=tag, save_dir=path)


def _only_tag_inside(path: str) -> CheckpointLocation:
    """A folder without ``latest``: its one tag folder, else an error naming what to pass."""
    try:
        entries = sorted(os.listdir(path))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot list directory ({exc})") from exc
    if not entries:
        raise CheckpointError(f"{path}: is an empty directory, not a DeepSpeed checkpoint")
    tags = [e for e in entries if _is_tag_dir(os.path.join(path, e))]
    if len(tags) == 1:
        # e.g. Hugging Face Trainer's checkpoint-N/global_stepN copied without `latest`
        return CheckpointLocation(
            layout="deepspeed", tag_dir=os.path.join(path, tags[0]), tag=tags[0], save_dir=path
        )
    if tags:
        raise CheckpointError(
            f"{path}: has no 'latest' file; pass one tag folder instead, e.g. "
            f"{os.path.join(path, tags[-1])} (tags present: {', '.join(tags)})"
        )
    # e.g. a Hugging Face Trainer output_dir holding checkpoint-N/global_stepN folders
    saves = [e for e in entries if _holds_tag_dir(os.path.join(path, e))]
    if saves:
        raise CheckpointError(
            f"{path}: is a folder of saves, not one checkpoint; pass one of them, e.g. "
            f"{os.path.join(path, saves[-1])} (saves present: {', '.join(saves)})"
        )
    raise CheckpointError(
        f"{path}: is not a DeepSpeed checkpoint (no 'latest' file, no *_model_states.pt files); "
        "pass a Lightning X.ckpt directory, a DeepSpeed save directory or a tag folder"
    )


def _holds_tag_dir(path: str) -> bool:
    try:
        return os.path.isdir(path) and any(
            _is_tag_dir(os.path.join(path, e)) for e in os.listdir(path)
        )
    except OSError:
        return False


def _describe_single_file(path: str) -> str:
    """What a single file passed as a DeepSpeed checkpoint is, and what to do instead.

    Why: a plain Lightning ``.ckpt`` (saved without DeepSpeed) is a common mistake; the pickle
    is scanned for Lightning's marker key, never unpickled.
    """
    import zipfile

    lightning = False
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl")), None)
            if pkl is not None:
                with zf.open(pkl) as fh:
                    lightning = b"pytorch-lightning_version" in fh.read(1 << 20)
            is_torch = pkl is not None
    except (OSError, zipfile.BadZipFile):
        is_torch = False
    if lightning:
        return (
            "is a plain Lightning checkpoint (one file, saved without DeepSpeed), not a DeepSpeed "
            "checkpoint directory, so there is no layout to reshape. To start a DeepSpeed run "
            "from its weights, load them into the model before fit "
            "(model.load_state_dict(torch.load(path)['state_dict'])) and leave ckpt_path unset, "
            "or resume it with the strategy it was saved with"
        )
    if is_torch:
        return (
            "is a single torch file, not a DeepSpeed checkpoint directory; pass the folder "
            "DeepSpeed saved (holding 'latest' and a tag folder with *_model_states.pt files)"
        )
    return (
        "is a single file, not a DeepSpeed checkpoint; pass the folder DeepSpeed saved "
        "(holding 'latest' and a tag folder with *_model_states.pt files)"
    )


# --------------------------------------------------------------------------------------------
# small helpers


def _get(obj: Any, key: KeyPath) -> Any:
    for k in key:
        obj = obj[k]
    return obj


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x)


def _prod(shape: Iterable[int]) -> int:
    return math.prod(int(s) for s in shape)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _summary(value: Any) -> str:
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:60])
    if isinstance(value, Mapping):
        return f"dict({len(value)} keys)"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}({len(value)})"
    return type(value).__name__


def _scalar(value: Any) -> float | int | bool | None:
    if is_tensor(value):
        return value.item() if value.numel() == 1 else None
    if isinstance(value, (bool, int, float)):
        return value
    return None


def _split_for(
    name: str,
    sidecar: Sidecar | None,
    rules: Sequence[TPRule],
    uc_info: Mapping[str, Any] | None,
) -> tuple[bool, TPSplit | None]:
    """(known, split) for one parameter; known=False means nobody told us."""
    for rule in rules:
        if re.search(rule.pattern, name):
            return True, rule.split
    if sidecar is not None and name in sidecar.tp_splits:
        return True, sidecar.tp_splits[name]
    if uc_info:

        def matches(key: str) -> bool:
            return any(re.match(p, name) for p in uc_info.get(key, []) or [])

        if matches("tp_replicated_parameter_patterns") or matches("parameter_to_average_patterns"):
            return True, None
        if matches("parameter_with_row_parallelism_patterns"):
            return True, TPSplit(dim=1)
        if matches("parameter_with_2_sub_params_cat_dim_0"):
            return True, TPSplit(dim=0, stride=2)
        return True, TPSplit(dim=0)
    return False, None


def _global_shape(
    local_shapes: Sequence[tuple[int, ...]], split: TPSplit | None
) -> tuple[int, ...]:
    if split is None or len(local_shapes) == 1:
        return local_shapes[0]
    base = list(local_shapes[0])
    if split.dim >= len(base):
        raise CheckpointError(f"split dim {split.dim} out of range for shape {tuple(base)}")
    base[split.dim] = sum(s[split.dim] for s in local_shapes)
    return tuple(base)


# --------------------------------------------------------------------------------------------
# lazy piece reading


class ShardReader:
    """Opens checkpoint files on demand (memory-mapped) and hands out flat slices.

    Why: a file is unpickled once and its tensors stay on disk until a slice is touched, so
    reading one parameter out of a large ZeRO partition costs that parameter's pages only.
    """

    def __init__(
        self,
        root: str,
        *,
        trust_checkpoint: bool = False,
        max_open: int = 8,
        check_crc: bool = False,
    ) -> None:
        self.root = root
        self.trust_checkpoint = trust_checkpoint
        self.max_open = max_open
        #: check each storage record read against its zip CRC-32 first (once per record)
        self.check_crc = check_crc
        self._checked: set[tuple[str, str]] = set()
        self._open: dict[str, Any] = {}
        self._fds: dict[str, int] = {}

    def load(self, file: str) -> Any:
        """The object tree of one file, tensors as :class:`TensorRef` (metadata only: no torch,
        no tensor bytes read), cached (a few at a time)."""
        if file not in self._open:
            if len(self._open) >= self.max_open:
                self._open.pop(next(iter(self._open)))
            self._open[file] = torchfile.load(
                os.path.join(self.root, file), trust_checkpoint=self.trust_checkpoint
            )
        return self._open[file]

    def read(self, piece: Piece) -> torch.Tensor:
        """The piece's elements as a flat view (no copy beyond the pages touched)."""
        obj = self.load(piece.file)
        try:
            tensor = _get(obj, piece.key)
        except (KeyError, IndexError, TypeError) as exc:
            raise CheckpointError(
                f"{os.path.join(self.root, piece.file)}: key {piece.key!r} missing"
            ) from exc
        if not is_tensor(tensor):
            raise CheckpointError(
                f"{os.path.join(self.root, piece.file)}: {piece.key!r} is not a tensor"
            )
        stored = tensor.storage.file
        if (
            self.check_crc
            and stored is not None
            and (piece.file, tensor.storage.key) not in self._checked
        ):
            fd = stored.open()
            try:
                stored.check_crc(fd, tensor.storage.key)
            finally:
                os.close(fd)
            self._checked.add((piece.file, tensor.storage.key))
        flat = tensor.to_torch().reshape(-1)
        if piece.src_offset + piece.numel > flat.numel():
            raise CheckpointError(
                f"{os.path.join(self.root, piece.file)}: {piece.key!r} holds {flat.numel()} "
                f"elements, the layout needs {piece.src_offset + piece.numel}; the file does not "
                "belong to this save"
            )
        return flat.narrow(0, piece.src_offset, piece.numel)

    def read_bytes(self, piece: Piece, start: int, count: int) -> bytes:
        """The raw bytes of ``count`` elements from element ``start`` of the piece's tensor
        (flat, logical order), read from the file without torch when the tensor is contiguous."""
        tensor = _get(self.load(piece.file), piece.key)
        if not is_tensor(tensor) or start + count > tensor.numel():
            raise CheckpointError(
                f"{os.path.join(self.root, piece.file)}: {piece.key!r} cannot supply elements "
                f"[{start}, {start + count}); the file does not belong to this save"
            )
        size = tensor.element_size()
        if tensor.is_contiguous() and tensor.file_offset is not None:
            if piece.file not in self._fds:
                self._fds[piece.file] = tensor.storage.file.open()
            data = os.pread(self._fds[piece.file], count * size, tensor.file_offset + start * size)
            if len(data) != count * size:
                raise CheckpointError(f"{os.path.join(self.root, piece.file)}: truncated")
            return data
        import torch

        flat = tensor.to_torch().reshape(-1).narrow(0, start, count).contiguous()
        return flat.view(torch.uint8).numpy().tobytes()

    def close(self) -> None:
        """Drop every mapping and file handle."""
        self._open.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _assemble_tp(shards: list[torch.Tensor], split: TPSplit | None) -> torch.Tensor:
    import torch

    if split is None or len(shards) == 1:
        return shards[0]
    if split.stride == 1:
        return torch.cat(shards, dim=split.dim)
    chunks = [s.chunk(split.stride, dim=split.dim) for s in shards]
    return torch.cat([c[i] for i in range(split.stride) for c in chunks], dim=split.dim)


def load_entry(entry: TensorEntry, reader: ShardReader) -> torch.Tensor:
    """Materialize one logical tensor (global shape, stored dtype) from its pieces."""
    import torch

    by_rank: dict[int, list[Piece]] = {}
    for p in entry.pieces:
        by_rank.setdefault(p.tp_rank, []).append(p)
    dtype = getattr(torch, entry.dtype)
    shards: list[torch.Tensor] = []
    ranks = sorted(by_rank) if entry.tp_split is not None else sorted(by_rank)[:1]
    for rank in ranks:
        pieces = by_rank[rank]
        local_shape = pieces[0].local_shape
        numel = _prod(local_shape)
        out = torch.empty(numel, dtype=dtype)
        covered = 0
        for p in pieces:
            out.narrow(0, p.dst_offset, p.numel).copy_(reader.read(p))
            covered += p.numel
        if covered != numel:
            raise CheckpointError(
                f"{entry.name} ({entry.role} {entry.state_key or ''}): pieces cover {covered} of "
                f"{numel} elements of tp rank {rank}"
            )
        shards.append(out.view(local_shape))
    return _assemble_tp(shards, entry.tp_split)


def _assemble_tp_bits(shards: list[Any], split: TPSplit | None) -> Any:
    """Join tp shards (numpy arrays of raw element bits) as the tensor's split describes."""
    import numpy as np

    if split is None or len(shards) == 1:
        return shards[0]
    if split.stride == 1:
        return np.concatenate(shards, axis=split.dim)
    chunks = [np.split(s, split.stride, axis=split.dim) for s in shards]
    return np.concatenate([c[i] for i in range(split.stride) for c in chunks], axis=split.dim)


def entry_bytes(entry: TensorEntry, reader: ShardReader) -> bytes | bytearray:
    """One logical tensor's bytes (global shape, C order), read with ``pread`` and joined
    without torch: every element moves as raw bits, and memory holds this tensor only (no
    mapped file pages stay resident, as they do through :func:`load_entry`)."""
    import numpy as np

    size = torchfile.dtype(entry.dtype).itemsize
    by_rank: dict[int, list[Any]] = {}
    for p in entry.pieces:
        by_rank.setdefault(p.tp_rank, []).append(p)
    ranks = sorted(by_rank) if entry.tp_split is not None else sorted(by_rank)[:1]
    shards = []
    for rank in ranks:
        pieces = by_rank[rank]
        local_shape = pieces[0].local_shape
        numel = 1
        for d in local_shape:
            numel *= d
        buf: bytes | bytearray
        if len(pieces) == 1 and pieces[0].dst_offset == 0 and pieces[0].numel == numel:
            buf = reader.read_bytes(pieces[0], pieces[0].src_offset, numel)  # no second copy
        else:
            buf = bytearray(numel * size)
            for p in pieces:
                buf[p.dst_offset * size : (p.dst_offset + p.numel) * size] = reader.read_bytes(
                    p, p.src_offset, p.numel
                )
        if len(ranks) == 1:
            return buf
        shards.append(np.frombuffer(buf, dtype=f"V{size}").reshape(local_shape))
    return np.ascontiguousarray(_assemble_tp_bits(shards, entry.tp_split)).tobytes()


def consolidate_fp32(
    manifest: Manifest, *, include_buffers: bool = True
) -> dict[str, torch.Tensor]:
    """Full fp32 weights (like zero_to_fp32): masters where the optimizer has them, else the
    stored weights upcast; buffers (floating ones upcast); tied aliases point to their source."""
    out: dict[str, torch.Tensor] = {}
    with ShardReader(manifest.root, trust_checkpoint=manifest.trusted) as reader:
        if include_buffers:
            for entry in manifest.entries(ROLE_BUFFER):
                t = load_entry(entry, reader)
                out[entry.name] = t.float() if t.is_floating_point() else t
        masters = {e.name: e for e in manifest.entries(ROLE_FP32)}
        for entry in manifest.entries(ROLE_PARAM):
            if entry.name not in masters:
                out[entry.name] = load_entry(entry, reader).float()
        for name, entry in masters.items():
            out[name] = load_entry(entry, reader).float()
    for alias, source in manifest.aliases:
        if source in out:
            out[alias] = out[source]
    return out


def consolidate_optimizer_states(manifest: Manifest) -> dict[str, dict[str, torch.Tensor]]:
    """Full optimizer state tensors per parameter: {param: {state_key: tensor}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    with ShardReader(manifest.root, trust_checkpoint=manifest.trusted) as reader:
        for entry in manifest.entries(ROLE_OPTIM):
            assert entry.state_key is not None
            out.setdefault(entry.name, {})[entry.state_key] = load_entry(entry, reader)
    return out


def refuse_elastic(manifest: Manifest) -> None:
    """One clear error for reshaping a ``zero_optimization.elastic_checkpoint`` save.

    Why: such files hold per-group optimizer states without the torch optimizer's
    ``param_groups`` (hyperparameters), which every target file needs; inspect and export read
    them, but a reshaped copy would have to invent those values.
    """
    if manifest.extra.get("elastic_checkpoint"):
        raise CheckpointError(
            f"{manifest.root}: saved with zero_optimization.elastic_checkpoint=true (optimizer "
            "state without param_groups), which cannot be reshaped; DeepSpeed itself loads it "
            "at another dp with elastic_checkpoint=true: do that, save again with "
            "elastic_checkpoint=false, then reshape (export reads it as it is)"
        )


# --------------------------------------------------------------------------------------------
# building the manifest


@dataclass
class _Files:
    model: dict[int, str]  # mp rank -> mp_rank_XX_model_states.pt
    z3_model: dict[tuple[int, int], str]  # (dp, mp) -> zero_pp_rank_D_mp_rank_XX_model_states.pt
    optim: dict[tuple[int, int], str]  # (dp, mp) -> optim file
    layers: dict[tuple[int, int], str]  # (layer, tp) -> layer file
    bf16_prefix: bool
    unknown: list[str]
    names: frozenset[str] = frozenset()  # every name in the tag folder


def _scan(tag_dir: str) -> _Files:
    listing = sorted(os.listdir(tag_dir))
    files = _Files({}, {}, {}, {}, False, [], frozenset(listing))
    for name in listing:
        if m := MODEL_RE.match(name):
            files.model[int(m.group(1))] = name
        elif m := Z3_MODEL_RE.match(name):
            files.z3_model[(int(m.group(1)), int(m.group(2)))] = name
        elif m := OPTIM_RE.match(name):
            files.optim[(int(m.group(2)), int(m.group(3)))] = name
            files.bf16_prefix = files.bf16_prefix or bool(m.group(1))
        elif m := LAYER_RE.match(name):
            key = (int(m.group(1)), int(m.group(2) or 0))
            if key in files.layers:
                raise CheckpointError(
                    f"{os.path.join(tag_dir, name)}: layer {key[0]} has two files "
                    f"({files.layers[key]} too); files from different saves?"
                )
            files.layers[key] = name
        elif EXPERT_RE.match(name):
            raise CheckpointError(
                f"{os.path.join(tag_dir, name)}: mixture-of-experts checkpoints are not "
                "supported yet"
            )
        elif name.endswith(".pt"):
            files.unknown.append(name)
    return files


class _Builder:
    """Accumulates manifest parts while walking the files of one tag (internal)."""

    def __init__(
        self,
        loc: CheckpointLocation,
        trust: bool,
        rules: Sequence[TPRule],
    ) -> None:
        self.loc = loc
        self.trust = trust
        self.rules = tuple(rules)
        self.tag_dir = loc.tag_dir
        self.reader = ShardReader(loc.tag_dir, trust_checkpoint=trust, max_open=4)
        self.files = _scan(loc.tag_dir)
        # (name, role, state_key) -> tp_rank -> list[Piece]
        self.pieces: dict[tuple[str, str, str | None], dict[int, list[Piece]]] = {}
        self.local_shapes: dict[tuple[str, str, str | None], dict[int, tuple[int, ...]]] = {}
        self.dtypes: dict[tuple[str, str, str | None], str] = {}
        self.order: list[tuple[str, str, str | None]] = []
        self.frozen: set[str] = set()
        self.scalars: list[ScalarState] = []
        self.refs: list[StateRef] = []
        self.aliases: dict[str, str] = {}
        self.next_layer = 0  # pipeline ZeRO 0: first layer not yet given to a stage
        # pipeline TiedLayerSpec keys -> {"layers", "module_layers"} (our sidecar), the source
        # stage boundaries, and which stage recorded each tied tensor first (its copy is kept)
        self.ties: dict[str, dict[str, list[int]]] = {}
        self.src_parts: list[int] = []
        self.tie_owner: dict[tuple[str, str, str | None], int | None] = {}
        self.validated: set[str] = set()
        self.ids: dict[str, tuple[int, ...]] = {}  # file -> identity when read
        self.last_file = ""  # the file read last: named when a malformed one slips through
        self.elastic = False  # ZeRO 1/2 saved with zero_optimization.elastic_checkpoint
        self.excluded_frozen = False  # saved with exclude_frozen_parameters=True
        # ZeRO 0: model file -> parameter names per optimizer param group
        self.zero0_groups: dict[str, tuple[tuple[str, ...], ...]] = {}

    def path(self, file: str) -> str:
        return os.path.join(self.tag_dir, file)

    def add(
        self,
        name: str,
        role: str,
        state_key: str | None,
        piece: Piece,
        dtype: Any,
    ) -> None:
        self._check_source(name, piece)
        key = (name, role, state_key)
        if name.startswith(TIED_PREFIX):
            # every stage using a tied module holds an identical copy (DeepSpeed all-reduces
            # tied gradients over the stages); keep the first stage's
            owner = self.tie_owner.setdefault(key, piece.pp_stage)
            if piece.pp_stage != owner:
                return
        if key not in self.pieces:
            self.pieces[key] = {}
            self.local_shapes[key] = {}
            self.order.append(key)
            self.dtypes[key] = _dtype_name(dtype)
        self.pieces[key].setdefault(piece.tp_rank, []).append(piece)
        prev = self.local_shapes[key].setdefault(piece.tp_rank, piece.local_shape)
        if prev != piece.local_shape:
            raise CheckpointError(
                f"{self.path(piece.file)}: {name} has shape {piece.local_shape} here but "
                f"{prev} in another file of tp rank {piece.tp_rank}; files from different saves?"
            )

    def load(self, file: str) -> Any:
        obj = self.reader.load(file)
        if file not in self.ids:
            st = os.stat(self.path(file))
            self.ids[file] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self.last_file = file
        if file not in self.validated:
            _validate_file(self.path(file), obj)
            self.validated.add(file)
        return obj

    def _check_source(self, name: str, piece: Piece) -> None:
        """A planned copy reads ``piece`` straight from its tensor's bytes: refuse, before any
        plan exists, a tensor that is not a tensor, that cannot supply the piece, or that is an
        expanded view (its elements are not distinct bytes: reshaping it would write far more
        than the file holds). The tensor's own geometry was checked against its storage and
        the file when it was read (torchfile)."""
        try:
            tensor = _get(self.load(piece.file), piece.key)
        except (KeyError, IndexError, TypeError):
            raise CheckpointError(
                f"{self.path(piece.file)}: key {piece.key!r} ({name}) missing"
            ) from None
        where = f"{self.path(piece.file)}: {piece.key!r} ({name})"
        if not is_tensor(tensor):
            raise CheckpointError(f"{where} is {type(tensor).__name__}, not a tensor")
        lo, hi = piece.src_offset, piece.src_offset + piece.numel
        if min(lo, piece.numel) < 0 or hi > tensor.numel():
            raise CheckpointError(
                f"{where} holds {tensor.numel()} elements, the layout needs elements "
                f"[{lo}, {hi}); the file is damaged or belongs to another save"
            )
        if tensor.overlaps():
            raise CheckpointError(
                f"{where} is an expanded view (shape {tuple(tensor.shape)}, stride "
                f"{tensor.stride()}): its elements share bytes, so it cannot be reshaped; save "
                "the parameter and optimizer state as ordinary tensors"
            )


def _require(path: str, obj: Any, keys: KeyPath, kind: Any, why: str) -> Any:
    """``obj[k0][k1]...``, which must exist and be a ``kind``; else one error naming the file
    and the key path."""
    cur = obj
    for i, k in enumerate(keys):
        if not isinstance(cur, Mapping) or k not in cur:
            where = ".".join(map(str, keys[: i + 1]))
            raise CheckpointError(f"{path}: key {where} is missing; {why}")
        cur = cur[k]
    if not isinstance(cur, kind):
        names = "/".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        raise CheckpointError(
            f"{path}: key {'.'.join(map(str, keys))} is {type(cur).__name__}, not {names}; {why}"
        )
    return cur


_DAMAGED = "the file is damaged, or was not written by DeepSpeed"


def _validate_file(path: str, sd: Any) -> None:
    """The keys and types every reader step relies on, checked once per file as it is first
    read: a damaged or foreign file is one error naming the file and key, never a KeyError."""
    name = os.path.basename(path)
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict; {_DAMAGED}")
    if name.endswith("_optim_states.pt"):
        osd = _require(path, sd, ("optimizer_state_dict",), Mapping, _DAMAGED)
        stage = osd.get("zero_stage")
        try:
            stage = None if stage is None else int(stage)
        except (TypeError, ValueError):
            raise CheckpointError(
                f"{path}: key optimizer_state_dict.zero_stage is {str(stage)[:40]!r}, not a ZeRO "
                f"stage; {_DAMAGED}"
            ) from None
        if stage in (1, 2):
            inner = _require(
                path,
                sd,
                ("optimizer_state_dict", "base_optimizer_state"),
                (Mapping, list),  # a list of per-group states: zero_optimization.elastic_checkpoint
                _DAMAGED,
            )
            if isinstance(inner, Mapping):
                _require(path, inner, ("state",), Mapping, _DAMAGED)
                _require(path, inner, ("param_groups",), (list, tuple), _DAMAGED)
            for key in ("single_partition_of_fp32_groups", "partition_count"):
                _require(path, osd, (key,), (list, tuple, int), _DAMAGED)
        elif stage == 3:
            _require(path, osd, ("fp32_flat_groups",), (list, tuple), _DAMAGED)
            _require(path, osd, ("optimizer_state_dict",), Mapping, _DAMAGED)
    elif name.endswith("model_states.pt") and not name.startswith("layer_"):
        for key, kind in (
            ("module", (Mapping, type(None))),
            ("buffer_names", (list, tuple)),
            ("dp_world_size", int),
        ):
            if key in sd:
                _require(path, sd, (key,), kind, _DAMAGED)
        if sd.get("param_shapes") is not None:
            shapes = _require(path, sd, ("param_shapes",), (list, tuple), _DAMAGED)
            if not all(isinstance(g, Mapping) for g in shapes):
                raise CheckpointError(f"{path}: key param_shapes holds a non-mapping; {_DAMAGED}")


def _whole(
    b: _Builder,
    name: str,
    role: str,
    state_key: str | None,
    file: str,
    key: KeyPath,
    tensor: TensorRef,
    tp_rank: int,
    pp_stage: int,
    layer: int | None = None,
) -> None:
    b.add(
        name,
        role,
        state_key,
        Piece(
            file=file,
            key=key,
            tp_rank=tp_rank,
            numel=tensor.numel(),
            local_shape=_shape(tensor.shape),
            pp_stage=pp_stage,
            layer=layer,
        ),
        tensor.dtype,
    )


def read_manifest(
    path: str | os.PathLike[str],
    *,
    tag: str | None = None,
    trust_checkpoint: bool = False,
    tp_rules: Sequence[TPRule] = (),
) -> Manifest:
    """Read the metadata of a checkpoint and describe every tensor in it. Writes nothing.

    ``tp_rules`` overrides the sidecar / ``universal_checkpoint_info`` for matching names.
    """
    loc = resolve_checkpoint(path, tag)
    b = _Builder(loc, trust_checkpoint, tp_rules)
    try:
        return _build(b)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, OverflowError) as exc:
        # a malformation no check above foresaw: still one error, naming what we know
        what = f"key {exc.args[0]!r} missing" if isinstance(exc, KeyError) else str(exc)[:200]
        raise CheckpointError(
            f"{b.path(b.last_file) if b.last_file else b.tag_dir}: malformed checkpoint "
            f"({type(exc).__name__}: {what}); {_DAMAGED}"
        ) from exc
    finally:
        b.reader.close()


def _build(b: _Builder) -> Manifest:
    # the formats build on this module (its builder and helpers): imported when used
    from lightning_reshape.checkpoint.formats import model_states

    f = b.files
    if not f.model and not f.z3_model:
        raise CheckpointError(
            f"{b.tag_dir}: no mp_rank_*_model_states.pt or zero_pp_rank_*_model_states.pt files; "
            "the save is incomplete"
        )
    main_files = _main_files(b)
    mp_ranks = sorted(main_files)
    first = b.load(main_files[mp_ranks[0]])
    if not isinstance(first, Mapping) or "buffer_names" not in first:
        raise CheckpointError(
            f"{b.path(main_files[mp_ranks[0]])}: not a DeepSpeed model-states file "
            "(no 'buffer_names')"
        )
    topo, wrapper, sidecar = _topology(b, first, mp_ranks)
    _check_one_save(b, main_files, topo, first)
    model_dtype = None
    for mp in mp_ranks:
        model_dtype = _read_mp_rank(b, main_files[mp], mp, topo, wrapper, model_dtype)
    tensors = _finish(b, sidecar, first.get("universal_checkpoint_info"), topo)
    client_keys = tuple(k for k in first if k not in DS_MODEL_KEYS)
    is_pipeline = bool(f.layers)
    all_files = sorted(
        [*f.model.values(), *f.z3_model.values(), *f.optim.values(), *f.layers.values()]
    )
    global_steps = first.get("global_steps")
    return Manifest(
        root=b.tag_dir,
        layout=b.loc.layout if not is_pipeline else f"{b.loc.layout}-pipeline",
        tag=b.loc.tag,
        topology=topo,
        model_dtype=model_dtype or "unknown",
        optimizer_wrapper=wrapper,
        tensors=tensors,
        scalars=tuple(b.scalars),
        state_refs=tuple(b.refs),
        aliases=tuple(sorted(b.aliases.items())),
        files=tuple(all_files),
        client_state_keys=client_keys,
        global_steps=int(global_steps) if global_steps is not None else None,
        ds_version=first.get("ds_version"),
        trusted=b.trust,
        extra=_extra(b, first, topo, client_keys, sidecar),
        source_meta=model_states.read_source_meta(b, topo.mp, sidecar),
        file_ids=dict(b.ids),
    )


def _extra(
    b: _Builder,
    first: Mapping[str, Any],
    topo: SourceTopology,
    client_keys: Sequence[str],
    sidecar: Sidecar | None,
) -> dict[str, Any]:
    """The manifest's facts beyond tensors: frozen names, ZeRO 0 groups, flags of the save, a
    summary of the client state, the pipeline's layer record."""
    from lightning_reshape.checkpoint.formats import pipeline

    f = b.files
    return {
        "bf16_prefixed_files": f.bf16_prefix,
        "elastic_checkpoint": b.elastic,
        "frozen": tuple(sorted(b.frozen)),
        "zero0_groups": dict(b.zero0_groups),
        "excluded_frozen": b.excluded_frozen,
        "frozen_recorded": topo.zero_stage >= 2 and first.get("frozen_param_shapes") is not None,
        "client_summary": {k: _summary(first[k]) for k in client_keys},
        "client_scalars": {
            k: first[k] for k in client_keys if isinstance(first[k], (int, float, str, bool))
        },
        **({"pipeline_layers": pipeline.pipeline_layers(f, sidecar)} if f.layers else {}),
    }


def _main_files(b: _Builder) -> dict[int, str]:
    """mp rank -> its main model-states file (ZeRO 3: the dp-0 one)."""
    f = b.files
    zero3 = bool(f.z3_model)
    mp_ranks = sorted({mp for _, mp in f.z3_model} if zero3 else f.model)
    main_files = {mp: (f.z3_model.get((0, mp)) if zero3 else f.model[mp]) for mp in mp_ranks}
    for mp, name in main_files.items():
        if name is None:
            raise CheckpointError(
                f"{b.path(f'zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt')}: missing shard"
            )
    return {mp: name for mp, name in main_files.items() if name is not None}


def _degrees(b: _Builder, first: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """(dp, mp, tp, pp) as DeepSpeed recorded them; tp and pp inferred from the file names when
    an older DeepSpeed did not record them."""
    f = b.files
    dims = first.get("checkpoint_parallel_dimensions") or {}
    meta_dp = int(first.get("dp_world_size", 1) or 1)
    meta_mp = int(first.get("mp_world_size", 1) or 1)
    meta_tp = int(dims.get("tp_degree", 0) or 0)
    meta_pp = int(dims.get("pp_degree", 0) or 0)
    pipeline = bool(f.layers)
    tp_from_layers = len({tp for _, tp in f.layers}) if pipeline else 0
    if not meta_tp or not meta_pp:  # older DeepSpeed: infer from names
        meta_tp = tp_from_layers or (meta_mp if not pipeline else 1)
        meta_pp = meta_mp // meta_tp if meta_tp else 1
    return meta_dp, meta_mp, meta_tp, meta_pp


def _zero_stage(b: _Builder, first: Mapping[str, Any]) -> tuple[int, str]:
    """(ZeRO stage, optimizer wrapper) from the first optimizer file, else ZeRO 0 (its
    optimizer in the model file)."""
    from lightning_reshape.checkpoint.formats import bf16_optimizer

    f = b.files
    if not f.optim:
        opt = first.get("optimizer")
        wrapper = "none"
        if isinstance(opt, Mapping) and "fp32_groups" in opt:
            wrapper = "fp16_optimizer"
        return 0, wrapper
    ofile = f.optim[min(f.optim)]
    optim_sd0 = b.load(ofile)
    osd = optim_sd0.get("optimizer_state_dict") if isinstance(optim_sd0, Mapping) else None
    if not isinstance(osd, Mapping):
        raise CheckpointError(
            f"{b.path(ofile)}: key 'optimizer_state_dict' is "
            f"{'missing' if osd is None else type(osd).__name__}; an optimizer shard holds "
            "it (the file is damaged or not a DeepSpeed optimizer shard)"
        )
    stage_val = osd.get("zero_stage")
    if stage_val is None and not ofile.startswith("bf16_"):
        raise CheckpointError(
            f"{b.path(ofile)}: key optimizer_state_dict.zero_stage is missing; a ZeRO "
            "optimizer shard records it (only DeepSpeed's bf16 optimizer, whose files start "
            "with bf16_, does not): the file is damaged"
        )
    if stage_val is None:
        # DeepSpeed's BF16_Optimizer (bf16 + ZeRO 1 + fp32 gradient accumulation, or the
        # pipeline engine's bf16 at ZeRO 0) does not record the stage: the config does
        return bf16_optimizer.configured_stage(optim_sd0, first), "bf16_optimizer"
    try:
        zero_stage = int(stage_val)
    except (TypeError, ValueError):
        zero_stage = -1
    if zero_stage not in (0, 1, 2, 3):
        raise CheckpointError(
            f"{b.path(ofile)}: key optimizer_state_dict.zero_stage is "
            f"{str(stage_val)[:40]!r}, not a ZeRO stage 0-3; the file is damaged"
        )
    return zero_stage, "zero"


def _topology(
    b: _Builder, first: Mapping[str, Any], mp_ranks: Sequence[int]
) -> tuple[SourceTopology, str, Sidecar | None]:
    """The saved layout, checked against the files present and our sidecar; (topology,
    optimizer wrapper, sidecar)."""
    from lightning_reshape.checkpoint.formats import pipeline

    f = b.files
    dp, mp, tp, pp = _degrees(b, first)
    zero_stage, wrapper = _zero_stage(b, first)
    if f.z3_model and zero_stage != 3:
        raise CheckpointError(
            f"{b.tag_dir}: has ZeRO-3 model files but optimizer files say stage {zero_stage}; "
            "files from different saves?"
        )
    _check_shards(b, dp, mp, tp, pp, len(mp_ranks))
    sidecar = read_sidecar(b.tag_dir)
    if f.layers:
        pipeline.read_ties(b, sidecar)
    if sidecar is not None:
        _check_sidecar(b, sidecar, (tp, pp, dp, zero_stage))
    topo = SourceTopology(
        tp=tp,
        pp=pp,
        dp=dp,
        zero_stage=zero_stage,
        source="sidecar" if sidecar is not None else "deepspeed",
    )
    _check_expected(b, topo, wrapper)
    return topo, wrapper, sidecar


def _check_shards(b: _Builder, dp: int, mp: int, tp: int, pp: int, mp_on_disk: int) -> None:
    """Every shard DeepSpeed's metadata expects is present, and the degrees agree."""
    f = b.files
    zero3 = bool(f.z3_model)
    file_dp = (
        len({d for d, _ in f.optim})
        if f.optim
        else (len({d for d, _ in f.z3_model}) if zero3 else None)
    )
    missing = []
    for m in range(mp):
        for d in range(dp):
            if zero3 and (d, m) not in f.z3_model:
                missing.append(f"zero_pp_rank_{d}_mp_rank_{m:02d}_model_states.pt")
            if f.optim and (d, m) not in f.optim:
                prefix = "bf16_" if f.bf16_prefix else ""
                missing.append(f"{prefix}zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt")
        if not zero3 and m not in f.model:
            missing.append(f"mp_rank_{m:02d}_model_states.pt")
    if missing:
        raise CheckpointError(
            f"{b.path(missing[0])}: missing shard"
            + (f" (and {len(missing) - 1} more: {', '.join(missing[1:4])})" if missing[1:] else "")
            + f"; DeepSpeed's metadata (dp_world_size={dp}, mp_world_size={mp}) "
            "expects it. Re-copy the checkpoint from its original location"
        )
    tp_from_layers = len({t for _, t in f.layers}) if f.layers else 0
    problems = []
    if tp * pp != mp:
        problems.append(f"mp_world_size={mp} but tp_degree*pp_degree={tp * pp}")
    if mp_on_disk != mp:
        problems.append(f"mp_world_size={mp} but {mp_on_disk} model-parallel ranks on disk")
    if f.layers and tp_from_layers != tp:
        problems.append(f"tp_degree={tp} but layer files for {tp_from_layers} tp ranks")
    if file_dp is not None and file_dp != dp:
        problems.append(f"dp_world_size={dp} but ZeRO files for {file_dp} dp ranks")
    if problems:
        raise CheckpointError(
            f"{b.tag_dir}: DeepSpeed's metadata disagrees with the files present: "
            + "; ".join(problems)
            + " (a shard is missing or files from different saves are mixed)"
        )


def _check_sidecar(b: _Builder, sidecar: Sidecar, degrees: tuple[int, int, int, int]) -> None:
    """Our sidecar must describe this save: (tp, pp, dp, zero_stage) as DeepSpeed says."""
    tp, pp, dp, zero_stage = degrees
    mism = [
        f"{k}: sidecar {a} vs deepspeed {c}"
        for k, a, c in (
            ("tp", sidecar.tp, tp),
            ("pp", sidecar.pp, pp),
            ("dp", sidecar.dp, dp),
            ("zero_stage", sidecar.zero_stage, zero_stage),
        )
        if a != c
    ]
    if mism:
        raise CheckpointError(
            f"{b.path(SIDECAR_NAME)}: disagrees with DeepSpeed's own metadata "
            f"({'; '.join(mism)}); "
            "the sidecar belongs to another save: delete it or rewrite it"
        )


def _check_expected(b: _Builder, topo: SourceTopology, wrapper: str) -> None:
    """Every file the layout needs is present (ZeRO 3 model files, optimizer files)."""
    f = b.files
    zero3 = bool(f.z3_model)
    for mp in range(topo.mp):
        for dp in range(topo.dp):
            if zero3 and (dp, mp) not in f.z3_model:
                raise CheckpointError(
                    f"{b.path(f'zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt')}: "
                    "missing shard "
                    f"(expected {topo.dp} dp x {topo.mp} mp model files)"
                )
            if topo.zero_stage >= 1 or wrapper == "bf16_optimizer":
                if (dp, mp) not in f.optim:
                    prefix = "bf16_" if f.bf16_prefix else ""
                    raise CheckpointError(
                        f"{b.path(f'{prefix}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt')}: "
                        f"missing shard (expected {topo.dp} dp x {topo.mp} mp optimizer files)"
                    )
        if not zero3 and mp not in f.model:
            raise CheckpointError(f"{b.path(f'mp_rank_{mp:02d}_model_states.pt')}: missing shard")


def _check_one_save(
    b: _Builder, main_files: Mapping[int, str], topo: SourceTopology, first: Mapping[str, Any]
) -> None:
    """All model files come from one save (same steps, samples and DeepSpeed version), and the
    tag's step, if it names one, is theirs."""
    f = b.files
    steps: dict[str, Any] = {}
    for mp, main in sorted(main_files.items()):
        names = [main] + ([f.z3_model[(dp, mp)] for dp in range(1, topo.dp)] if f.z3_model else [])
        for name in names:
            sd = b.load(name)
            if not isinstance(sd, Mapping) or "buffer_names" not in sd:
                raise CheckpointError(f"{b.path(name)}: not a DeepSpeed model-states file")
            steps[name] = (sd.get("global_steps"), sd.get("global_samples"), sd.get("ds_version"))
    if len(set(steps.values())) > 1:
        detail = ", ".join(f"{n}: global_steps={v[0]}" for n, v in steps.items())
        raise CheckpointError(
            f"{b.tag_dir}: files come from different saves ({detail}); "
            "re-copy the tag from one save"
        )
    global_steps = first.get("global_steps")
    m = TAG_HINT.match(b.loc.tag)
    if m and global_steps is not None and int(m.group(1)) != int(global_steps):
        raise CheckpointError(
            f"{b.path(main_files[min(main_files)])}: says global_steps={global_steps} but lies in "
            f"tag {b.loc.tag!r}; files from different saves?"
        )


def _read_mp_rank(
    b: _Builder,
    file: str,
    mp: int,
    topo: SourceTopology,
    wrapper: str,
    model_dtype: str | None,
) -> str | None:
    """One source mp rank: its module weights, buffers, frozen names, fp32 masters, optimizer
    states and non-tensor state, each format reading its part; the model dtype so far."""
    from lightning_reshape.checkpoint.formats import model_states, pipeline, zero0, zero3, zero12

    f, zero_stage = b.files, topo.zero_stage
    pp_stage, tp_rank = divmod(mp, topo.tp)
    sd = b.load(file)
    buffer_names = list(sd.get("buffer_names") or [])
    for alias, source in (sd.get("shared_params") or {}).items():
        b.aliases.setdefault(alias, source)
    param_shapes = sd.get("param_shapes")
    if f.layers and not b.ties:
        pipeline.refuse_tied_modules(b, file, param_shapes)
    frozen_shapes = sd.get("frozen_param_shapes") or {}
    b.frozen.update(frozen_shapes)
    if f.layers:
        params = pipeline.layer_params(b, sd, tp_rank, pp_stage, buffer_names)
    else:
        params = model_states.module_params(b, sd, file, tp_rank, pp_stage, buffer_names)
        model_states.drop_excluded_aliases(b, sd)
    if zero_stage >= 2 and sd.get("frozen_param_shapes") is None:
        b.excluded_frozen = True  # DeepSpeed writes {} when there is nothing to exclude
    if zero_stage == 3:
        zero3.read_frozen(b, f, mp, topo, tp_rank, pp_stage, frozen_shapes)
        model_dtype = model_dtype or zero3.model_dtype(b, f, mp)
    else:
        model_dtype = model_states.record_weights(b, params, tp_rank, pp_stage, model_dtype)
    model_states.record_frozen(b, param_shapes, params)
    if f.optim and zero_stage in (1, 2) or wrapper == "bf16_optimizer":
        zero12.read_optimizer(b, f, mp, topo, tp_rank, pp_stage, param_shapes, sd.get("ds_config"))
    elif zero_stage == 3:
        zero3.read_optimizer(b, f, mp, topo, tp_rank, pp_stage, param_shapes)
    else:
        zero0.read_optimizer(b, sd, file, tp_rank, pp_stage, params)
    model_states.record_state_refs(b, sd, file)
    return model_dtype


def _finish(
    b: _Builder,
    sidecar: Sidecar | None,
    uc_info: Mapping[str, Any] | None,
    topo: SourceTopology,
) -> tuple[TensorEntry, ...]:
    """Attach tensor-parallel split info and global shapes; refuse to guess."""
    splits: dict[str, TPSplit | None] = {}
    for key in b.order:
        name = key[0]
        if name in splits:
            continue
        ranks = b.local_shapes[key]
        if topo.tp == 1 or len(ranks) == 1:
            splits[name] = None
            continue
        known, split = _split_for(name, sidecar, b.rules, uc_info)
        if not known:
            split = _prove_replicated(b, name)
        splits[name] = split
    if sidecar is not None:
        _check_declared_splits(b, sidecar, topo.tp)
    out = []
    for key in b.order:
        name, role, state_key = key
        split = splits[name]
        by_rank = b.pieces[key]
        if topo.tp > 1 and len(by_rank) not in (1, topo.tp):
            raise CheckpointError(
                f"{b.tag_dir}: {name} ({role}) found on {len(by_rank)} of {topo.tp} tp ranks"
            )
        local = [b.local_shapes[key][r] for r in sorted(by_rank)]
        if split is None and len(set(local)) > 1:
            raise CheckpointError(
                f"{b.tag_dir}: {name} is marked replicated but its shards differ in shape "
                f"across tp ranks ({local}); fix its tensor-parallel rule"
            )
        if split is None and len(by_rank) > 1:
            _check_replicated(b, key)
        pieces = tuple(
            Piece(**{**p.__dict__, "tp_split": split})
            for r in sorted(by_rank)
            for p in sorted(by_rank[r], key=lambda p: p.dst_offset)
        )
        out.append(
            TensorEntry(
                name=name,
                role=role,
                state_key=state_key,
                shape=_global_shape(local, split),
                dtype=b.dtypes[key],
                pieces=pieces,
                tp_split=split,
                frozen=name in b.frozen,
            )
        )
    return tuple(out)


_Key = tuple[str, str, "str | None"]


def _check_declared_splits(b: _Builder, sidecar: Sidecar, tp: int) -> None:
    """Each sidecar split against what the files confirm: the tp shards of a split tensor are
    the full shape cut evenly along the declared dim (so all equal), that dim exists, and it
    holds ``stride`` whole chunks per shard. Why: a hand-edited sidecar with another dim or
    stride otherwise fails inside torch's load (size mismatch) or loads scrambled weights.
    A split our rules override is not the sidecar's to answer for."""
    seen: set[str] = set()
    for key in b.order:
        name = key[0]
        split = sidecar.tp_splits.get(name)
        if name in seen or split is None or any(re.search(r.pattern, name) for r in b.rules):
            continue
        seen.add(name)
        by_rank = b.local_shapes[key]
        shapes = [by_rank[r] for r in sorted(by_rank)]
        full = list(shapes[0])
        why = None
        if split.dim >= len(full):
            why = f"they have no dim {split.dim}"
        elif tp > 1 and len(set(shapes)) > 1:
            why = "an even tensor-parallel split gives every tp rank the same shape"
        elif full[split.dim] % split.stride:
            why = f"dim {split.dim} ({full[split.dim]}) does not hold {split.stride} whole chunks"
        if why is None:
            continue
        what = "tp shards" if tp > 1 and len(shapes) > 1 else "saved tensor (tp=1)"
        raise CheckpointError(
            f"{os.path.join(b.tag_dir, SIDECAR_NAME)}: tp_splits[{name!r}] declares "
            f"dim={split.dim} stride={split.stride}, but the {what} of {name!r} have shapes "
            f"{sorted({tuple(x) for x in shapes})}: {why}. The sidecar does not describe these "
            f"files: correct or remove that entry (or delete the sidecar to fall back to "
            f"DeepSpeed's own metadata), or pass TPRule({name!r}, TPSplit(dim=...)) "
            "(CLI: --tp-rule)"
        )


def _local_bytes(b: _Builder, key: _Key, rank: int, lo: int, hi: int) -> bytes:
    """Bytes of elements [lo, hi) of one tp rank's (flat) local tensor, from its pieces."""
    size = torchfile.dtype(b.dtypes[key]).itemsize
    out = bytearray((hi - lo) * size)
    covered = 0
    for p in b.pieces[key][rank]:
        a, z = max(lo, p.dst_offset), min(hi, p.dst_offset + p.numel)
        if a < z:
            data = b.reader.read_bytes(p, p.src_offset + a - p.dst_offset, z - a)
            out[(a - lo) * size : (z - lo) * size] = data
            covered += z - a
    if covered != hi - lo:
        raise CheckpointError(
            f"{b.tag_dir}: {key[0]}: pieces cover {covered} of elements [{lo}, {hi}) on tp rank "
            f"{rank}; the checkpoint is incomplete"
        )
    return bytes(out)


def _differing_rank(b: _Builder, key: tuple[str, str, str | None]) -> int | None:
    """The first tp rank whose copy of ``key`` is not byte-identical to tp rank 0's, or None.
    Compared a window at a time, from the files (no torch, memory bounded)."""
    ranks = sorted(b.pieces[key])
    shapes = {b.local_shapes[key][r] for r in ranks}
    if len(shapes) > 1:
        return next(r for r in ranks if b.local_shapes[key][r] != b.local_shapes[key][ranks[0]])
    numel = _prod(shapes.pop())
    step = max(1, (16 << 20) // torchfile.dtype(b.dtypes[key]).itemsize)
    for lo in range(0, numel, step):
        hi = min(numel, lo + step)
        ref = _local_bytes(b, key, ranks[0], lo, hi)
        for rank in ranks[1:]:
            if _local_bytes(b, key, rank, lo, hi) != ref:
                return rank
    return None


def _check_replicated(b: _Builder, key: tuple[str, str, str | None]) -> None:
    """A replicated tensor must be bit-identical on every tp rank: a reshape keeps one copy, so
    a wrong "replicated" in the sidecar or a rule would otherwise lose the other ranks' data."""
    name, role, state_key = key
    rank = _differing_rank(b, key)
    if rank is not None:
        what = f"{role} {state_key}" if state_key else role
        raise CheckpointError(
            f"{b.tag_dir}: {name} ({what}) is recorded as replicated across tensor-parallel "
            f"ranks but tp rank {rank} differs from tp rank 0; it is split, not replicated: "
            f"fix its entry in {SIDECAR_NAME} or pass TPRule({name!r}, TPSplit(dim=...))"
        )


def _prove_replicated(b: _Builder, name: str) -> None:
    """With no split info, a parameter is accepted only if every tp shard is identical."""
    key = (
        (name, ROLE_PARAM, None)
        if (name, ROLE_PARAM, None) in b.pieces
        else (name, ROLE_FP32, None)
    )
    if key not in b.pieces:
        key = next(k for k in b.order if k[0] == name)
    shapes = b.local_shapes[key]
    hint = (
        f"tensor-parallel split of {name!r} is unknown and its shards differ across tp ranks; "
        "record it in the lightning_reshape.json sidecar (written by the strategy), or pass a "
        f"rule such as TPRule({name!r}, TPSplit(dim=0)) (CLI: --tp-rule) or "
        f"TPRule({name!r}, None) if it is replicated"
    )
    if len(set(shapes.values())) > 1:
        raise CheckpointError(f"{b.tag_dir}: {hint} (shapes {sorted(shapes.items())})")
    rank = _differing_rank(b, key)
    if rank is not None:
        raise CheckpointError(f"{b.tag_dir}: {hint} (tp rank {rank} differs from tp rank 0)")
