"""Find a DeepSpeed checkpoint on disk and describe it as a :class:`Manifest`; read pieces lazily.

Why: DeepSpeed spreads one logical tensor over model files, ZeRO flat partitions, pipeline
layer files and tensor-parallel shards, with the layout hidden in string keys. This module
turns all of that into explicit geometry once, reading only metadata (files are memory-mapped,
so tensors are not paged in), and never writes anything.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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

# Keys DeepSpeed itself writes into the model-states file; everything else is client state.
DS_MODEL_KEYS = frozenset(
    {
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
        "sparse_tensor_module_names",
        "skipped_steps",
        "global_steps",
        "global_samples",
        "dp_world_size",
        "mp_world_size",
        "checkpoint_parallel_dimensions",
        "ds_config",
        "ds_version",
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
OPTIM_CARRIED_KEYS = (
    "loss_scaler",
    "dynamic_loss_scale",
    "overflow",
    "clip_grad",
    "cur_scale",
    "cur_iter",
    "last_overflow_iter",
    "scale_factor",
    "scale_window",
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
    if _is_tag_dir(path):
        parent = os.path.dirname(path)
        name = os.path.basename(path)
        layout = "deepspeed"
        if name == "checkpoint" and os.path.isfile(os.path.join(parent, "latest")):
            layout = "lightning-deepspeed"
        return CheckpointLocation(layout=layout, tag_dir=path, tag=name, save_dir=None)
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


def _scan(tag_dir: str) -> _Files:
    files = _Files({}, {}, {}, {}, False, [])
    for name in sorted(os.listdir(tag_dir)):
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
    f = b.files
    if not f.model and not f.z3_model:
        raise CheckpointError(
            f"{b.tag_dir}: no mp_rank_*_model_states.pt or zero_pp_rank_*_model_states.pt files; "
            "the save is incomplete"
        )
    # ---- metadata from the first model file of each mp rank ----
    zero3 = bool(f.z3_model)
    mp_ranks = sorted({mp for _, mp in f.z3_model} if zero3 else f.model)
    main_files = {mp: (f.z3_model.get((0, mp)) if zero3 else f.model[mp]) for mp in mp_ranks}
    for mp, name in main_files.items():
        if name is None:
            raise CheckpointError(
                f"{b.path(f'zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt')}: missing shard"
            )
    first = b.load(main_files[mp_ranks[0]])
    if not isinstance(first, Mapping) or "buffer_names" not in first:
        raise CheckpointError(
            f"{b.path(main_files[mp_ranks[0]])}: not a DeepSpeed model-states file "
            "(no 'buffer_names')"
        )
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
    # zero stage
    optim_sd0 = None
    if f.optim:
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
            zero_stage, wrapper = _configured_stage(optim_sd0, first), "bf16_optimizer"
        else:
            try:
                zero_stage, wrapper = int(stage_val), "zero"
            except (TypeError, ValueError):
                zero_stage = -1
            if zero_stage not in (0, 1, 2, 3):
                raise CheckpointError(
                    f"{b.path(ofile)}: key optimizer_state_dict.zero_stage is "
                    f"{str(stage_val)[:40]!r}, not a ZeRO stage 0-3; the file is damaged"
                )
    else:
        zero_stage = 0
        opt = first.get("optimizer")
        wrapper = "none"
        if isinstance(opt, Mapping) and "fp32_groups" in opt:
            wrapper = "fp16_optimizer"
    if zero3 and zero_stage != 3:
        raise CheckpointError(
            f"{b.tag_dir}: has ZeRO-3 model files but optimizer files say stage {zero_stage}; "
            "files from different saves?"
        )
    file_dp = (
        len({dp for dp, _ in f.optim})
        if f.optim
        else (len({dp for dp, _ in f.z3_model}) if zero3 else None)
    )
    missing = []
    for mp in range(meta_mp):
        for dp in range(meta_dp):
            if zero3 and (dp, mp) not in f.z3_model:
                missing.append(f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt")
            if f.optim and (dp, mp) not in f.optim:
                prefix = "bf16_" if f.bf16_prefix else ""
                missing.append(f"{prefix}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt")
        if not zero3 and mp not in f.model:
            missing.append(f"mp_rank_{mp:02d}_model_states.pt")
    if missing:
        raise CheckpointError(
            f"{b.path(missing[0])}: missing shard"
            + (f" (and {len(missing) - 1} more: {', '.join(missing[1:4])})" if missing[1:] else "")
            + f"; DeepSpeed's metadata (dp_world_size={meta_dp}, mp_world_size={meta_mp}) "
            "expects it. Re-copy the checkpoint from its original location"
        )
    problems = []
    if meta_tp * meta_pp != meta_mp:
        problems.append(f"mp_world_size={meta_mp} but tp_degree*pp_degree={meta_tp * meta_pp}")
    if len(mp_ranks) != meta_mp:
        problems.append(f"mp_world_size={meta_mp} but {len(mp_ranks)} model-parallel ranks on disk")
    if pipeline and tp_from_layers != meta_tp:
        problems.append(f"tp_degree={meta_tp} but layer files for {tp_from_layers} tp ranks")
    if file_dp is not None and file_dp != meta_dp:
        problems.append(f"dp_world_size={meta_dp} but ZeRO files for {file_dp} dp ranks")
    if problems:
        raise CheckpointError(
            f"{b.tag_dir}: DeepSpeed's metadata disagrees with the files present: "
            + "; ".join(problems)
            + " (a shard is missing or files from different saves are mixed)"
        )
    sidecar = read_sidecar(b.tag_dir)
    record = (sidecar.extra.get("pipeline") if sidecar is not None else None) or {}
    if pipeline and record.get("ties") and record.get("parts"):
        b.ties = {str(k): dict(v) for k, v in record["ties"].items()}
        b.src_parts = [int(x) for x in record["parts"]]
    if sidecar is not None:
        mism = [
            f"{k}: sidecar {a} vs deepspeed {c}"
            for k, a, c in (
                ("tp", sidecar.tp, meta_tp),
                ("pp", sidecar.pp, meta_pp),
                ("dp", sidecar.dp, meta_dp),
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
    topo = SourceTopology(
        tp=meta_tp,
        pp=meta_pp,
        dp=meta_dp,
        zero_stage=zero_stage,
        source="sidecar" if sidecar is not None else "deepspeed",
    )
    # expected files present?
    for mp in range(topo.mp):
        for dp in range(topo.dp):
            if zero3 and (dp, mp) not in f.z3_model:
                raise CheckpointError(
                    f"{b.path(f'zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt')}: "
                    "missing shard "
                    f"(expected {topo.dp} dp x {topo.mp} mp model files)"
                )
            if zero_stage >= 1 or wrapper == "bf16_optimizer":
                if (dp, mp) not in f.optim:
                    prefix = "bf16_" if f.bf16_prefix else ""
                    raise CheckpointError(
                        f"{b.path(f'{prefix}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt')}: "
                        f"missing shard (expected {topo.dp} dp x {topo.mp} mp optimizer files)"
                    )
        if not zero3 and mp not in f.model:
            raise CheckpointError(f"{b.path(f'mp_rank_{mp:02d}_model_states.pt')}: missing shard")
    # consistency across saves
    steps: dict[str, Any] = {}
    for mp in mp_ranks:
        names = [main_files[mp]] + (
            [f.z3_model[(dp, mp)] for dp in range(1, topo.dp)] if zero3 else []
        )
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
            f"{b.path(main_files[mp_ranks[0]])}: says global_steps={global_steps} but lies in tag "
            f"{b.loc.tag!r}; files from different saves?"
        )
    uc_info = first.get("universal_checkpoint_info")

    # ---- per mp rank: parameters, buffers, masters, optimizer states ----
    model_dtype = None
    for mp in mp_ranks:
        pp_stage, tp_rank = divmod(mp, topo.tp)
        sd = b.load(main_files[mp])
        buffer_names = list(sd.get("buffer_names") or [])
        shared = sd.get("shared_params") or {}
        for alias, source in shared.items():
            b.aliases.setdefault(alias, source)
        param_shapes = sd.get("param_shapes")
        if pipeline and not b.ties:
            _refuse_tied_modules(b, main_files[mp], param_shapes)
        frozen_shapes = sd.get("frozen_param_shapes") or {}
        b.frozen.update(frozen_shapes)
        trainable: list[tuple[int, str, tuple[int, ...]]] = []  # (group, name, shape)
        if param_shapes:
            for g, group in enumerate(param_shapes):
                for name, shape in group.items():
                    trainable.append((g, name, _shape(shape)))
        module_params = _module_params(
            b, sd, main_files[mp], tp_rank, pp_stage, pipeline, buffer_names
        )
        if not pipeline:
            module_keys = set(sd.get("module") or ())
            for alias, source in list(b.aliases.items()):
                if alias in module_keys and source not in module_keys:
                    # saved with exclude_frozen_parameters=True: the frozen parameter's first
                    # name was dropped from the module, its tied second name kept the data
                    del b.aliases[alias]
                    b.excluded_frozen = True
        if zero_stage >= 2 and sd.get("frozen_param_shapes") is None:
            b.excluded_frozen = True  # DeepSpeed writes {} when there is nothing to exclude
        if zero_stage == 3:
            _zero3_frozen(b, f, mp, topo, tp_rank, pp_stage, frozen_shapes)
        else:
            for name, (file, key, tensor, layer) in module_params.items():
                if name in b.aliases:
                    continue
                _whole(b, name, ROLE_PARAM, None, file, key, tensor, tp_rank, pp_stage, layer)
                if model_dtype is None or tensor.is_floating_point():
                    model_dtype = _dtype_name(tensor.dtype)
        if zero_stage == 3:
            model_dtype = model_dtype or _z3_model_dtype(b, f, mp)
        trainable_names = {n for _, n, _ in trainable}
        if param_shapes:
            for name in module_params:
                if name not in trainable_names and name not in b.aliases:
                    b.frozen.add(name)
        # optimizer
        if f.optim and zero_stage in (1, 2) or wrapper == "bf16_optimizer":
            _zero12_optim(b, f, mp, topo, tp_rank, pp_stage, param_shapes)
        elif zero_stage == 3:
            _zero3_optim(b, f, mp, topo, tp_rank, pp_stage, param_shapes)
        else:
            _zero0_optim(b, sd, main_files[mp], tp_rank, pp_stage, module_params)
        # non-tensor state (first tp rank of each stage is enough; record all for copying)
        for key in DS_CARRIED_KEYS:
            if key in sd:
                b.refs.append(
                    StateRef(name=key, file=main_files[mp], key=(key,), summary=_summary(sd[key]))
                )
        for key in sd:
            if key not in DS_MODEL_KEYS:
                b.refs.append(
                    StateRef(
                        name=f"client:{key}",
                        file=main_files[mp],
                        key=(key,),
                        summary=_summary(sd[key]),
                    )
                )

    tensors = _finish(b, sidecar, uc_info, topo)
    client_keys = tuple(k for k in first if k not in DS_MODEL_KEYS)
    layout = b.loc.layout if not pipeline else f"{b.loc.layout}-pipeline"
    all_files = sorted(
        [*f.model.values(), *f.z3_model.values(), *f.optim.values(), *f.layers.values()]
    )
    return Manifest(
        root=b.tag_dir,
        layout=layout,
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
        extra={
            "bf16_prefixed_files": f.bf16_prefix,
            "elastic_checkpoint": b.elastic,
            "frozen": tuple(sorted(b.frozen)),
            "zero0_groups": dict(b.zero0_groups),
            "excluded_frozen": b.excluded_frozen,
            "frozen_recorded": zero_stage >= 2 and first.get("frozen_param_shapes") is not None,
            "client_summary": {k: _summary(first[k]) for k in client_keys},
            "client_scalars": {
                k: first[k] for k in client_keys if isinstance(first[k], (int, float, str, bool))
            },
            **({"pipeline_layers": _pipeline_layers(f, sidecar)} if pipeline else {}),
        },
    )


def _pipeline_layers(f: _Files, sidecar: Sidecar | None) -> dict[str, Any]:
    """Which pipeline layers are modules (DeepSpeed writes a layer file for each, parameters or
    not, and expects each at load) and how many layers the list holds (functions after the
    last module are only known from our sidecar)."""
    modules = {layer for layer, _ in f.layers}
    record = (sidecar.extra.get("pipeline") if sidecar is not None else None) or {}
    modules.update(int(x) for x in record.get("module_layers", ()))
    count = max(modules) + 1 if modules else 0
    count = max(count, int(record.get("num_layers", 0) or 0))
    ties = {
        str(k): {"layers": tuple(v.get("layers", ())), "module_layers": tuple(v["module_layers"])}
        for k, v in (record.get("ties") or {}).items()
    }
    return {"module_layers": tuple(sorted(modules)), "num_layers": count, "ties": ties}


def _configured_stage(optim_sd: Any, model_sd: Mapping[str, Any]) -> int:
    """``zero_optimization.stage`` of the config saved with the files (0 when absent)."""
    for sd in (optim_sd, model_sd):
        cfg = sd.get("ds_config") if isinstance(sd, Mapping) else None
        if isinstance(cfg, Mapping):
            zcfg = cfg.get("zero_optimization") or {}
            if isinstance(zcfg, Mapping):
                return int(zcfg.get("stage", 0) or 0)
    return 0


def _refuse_tied_modules(b: _Builder, file: str, param_shapes: Any) -> None:
    """Pipeline ``TiedLayerSpec`` modules are saved once, in the layer file of their first use,
    but held (and optimized) by every stage that uses them; which stages those are is not in the
    checkpoint, so no target layout can be derived: refuse rather than guess."""
    tied = sorted({n for g in param_shapes or [] for n in g if str(n).startswith("tied_modules.")})
    if tied:
        raise CheckpointError(
            f"{b.path(file)}: pipeline parameters {tied[:3]} belong to TiedLayerSpec modules; "
            "the checkpoint does not record which stages use a tied module, so it cannot be "
            "reshaped (pipeline models without tied layers can; checkpoints saved by "
            "ReshapeDeepSpeedStrategy record the ties in their sidecar)"
        )


def _z3_model_dtype(b: _Builder, f: _Files, mp: int) -> str:
    sd = b.load(f.z3_model[(0, mp)])
    buffers = set(sd.get("buffer_names") or [])
    for name, t in (sd.get("module") or {}).items():
        if name not in buffers and is_tensor(t) and t.is_floating_point():
            return _dtype_name(t.dtype)
    return "unknown"


def _module_params(
    b: _Builder,
    sd: Mapping[str, Any],
    file: str,
    tp_rank: int,
    pp_stage: int,
    pipeline: bool,
    buffer_names: list[str],
) -> dict[str, tuple[str, KeyPath, TensorRef, int | None]]:
    """name -> (file, key path, tensor, layer) for every module parameter; records buffers."""
    out: dict[str, tuple[str, KeyPath, TensorRef, int | None]] = {}
    buffers = set(buffer_names)
    if not pipeline:
        module = sd.get("module")
        if not isinstance(module, Mapping):
            raise CheckpointError(f"{b.path(file)}: 'module' is missing")
        seen: dict[Any, str] = {}
        for name, tensor in module.items():
            if not is_tensor(tensor):
                continue
            if name in buffers:
                _whole(
                    b, name, ROLE_BUFFER, None, file, ("module", name), tensor, tp_rank, pp_stage
                )
                continue
            if tensor.numel() > 0:
                skey = torchfile.storage_key(tensor)
                if skey in seen and name not in b.aliases:
                    b.aliases[name] = seen[skey]  # tied weight saved twice (ZeRO 0 has no list)
                seen.setdefault(skey, name)
            out[name] = (file, ("module", name), tensor, None)
        return out
    # pipeline: this stage's layers are the layer files named by its params / buffers
    layer_ids = sorted({layer for layer, _ in b.files.layers})
    stage_layers = _stage_layers(b, sd, layer_ids, buffer_names)
    for layer in stage_layers:
        if (layer, tp_rank) not in b.files.layers:
            raise CheckpointError(
                f"{b.path(f'layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt')}: "
                "missing shard "
                f"(pipeline stage {pp_stage} holds layer {layer})"
            )
        lfile = b.files.layers[(layer, tp_rank)]
        lsd = b.load(lfile)
        tie = next((k for k, t in b.ties.items() if layer in t.get("module_layers", ())), None)
        for local, tensor in lsd.items():
            if not is_tensor(tensor):
                continue
            name = f"{layer}.{local}" if tie is None else f"{TIED_PREFIX}{tie}.{local}"
            if name in buffers:
                _whole(
                    b, name, ROLE_BUFFER, None, lfile, (local,), tensor, tp_rank, pp_stage, layer
                )
            else:
                out[name] = (lfile, (local,), tensor, layer)
    return out


def _stage_layers(
    b: _Builder, sd: Mapping[str, Any], layer_ids: list[int], buffer_names: list[str]
) -> list[int]:
    """Which pipeline layers a stage holds, from its param_shapes / buffers / optimizer."""
    owned: set[int] = set()
    for group in sd.get("param_shapes") or []:
        owned.update(int(n.split(".", 1)[0]) for n in group if not n.startswith(TIED_PREFIX))
        tied = {n.split(".", 2)[1] for n in group if n.startswith(TIED_PREFIX)}
        if tied and owned:
            # the tie's module layers inside this stage's range (our sidecar's record)
            stage = next(i for i in range(len(b.src_parts) - 1) if b.src_parts[i + 1] > min(owned))
            lo, hi = b.src_parts[stage], b.src_parts[stage + 1]
            for key in tied:
                owned.update(x for x in b.ties[key].get("module_layers", ()) if lo <= x < hi)
    owned.update(int(n.split(".", 1)[0]) for n in buffer_names if n.split(".", 1)[0].isdigit())
    opt = sd.get("optimizer")
    if not owned and not opt:
        raise CheckpointError(
            f"{b.tag_dir}: cannot tell which pipeline layers each stage holds (no param_shapes, "
            "buffers or optimizer state); add a lightning_reshape.json sidecar"
        )
    if opt and not sd.get("param_shapes"):
        # ZeRO 0: stages hold contiguous runs of layers in order and the stage's optimizer
        # lists its parameters; take the run after the previous stage's whose count matches.
        inner = opt.get("optimizer_state_dict", opt)
        n_params = sum(len(g["params"]) for g in inner.get("param_groups") or [])
        start = b.next_layer
        buffers = set(buffer_names)
        run, total = [], 0
        for layer in (x for x in layer_ids if x >= start):
            if total == n_params and run:
                break
            if (layer, 0) not in b.files.layers:
                raise CheckpointError(
                    f"{b.path(f'layer_{layer:02d}-model_00-model_states.pt')}: missing shard"
                )
            lsd = b.load(b.files.layers[(layer, 0)])
            run.append(layer)
            total += sum(
                1 for k, v in lsd.items() if is_tensor(v) and f"{layer}.{k}" not in buffers
            )
        if total != n_params:
            raise CheckpointError(
                f"{b.tag_dir}: cannot match pipeline layers to stages from the optimizer state; "
                "add a lightning_reshape.json sidecar"
            )
        b.next_layer = run[-1] + 1 if run else start
        return run
    return sorted(owned)


def _zero3_frozen(
    b: _Builder,
    f: _Files,
    mp: int,
    topo: SourceTopology,
    tp_rank: int,
    pp_stage: int,
    frozen_shapes: Mapping[str, Any],
) -> None:
    for name, shape in frozen_shapes.items():
        shape_t = _shape(shape)
        numel = _prod(shape_t)
        part = math.ceil(numel / topo.dp)
        for dp in range(topo.dp):
            file = f.z3_model[(dp, mp)]
            frag = b.load(file).get("frozen_param_fragments", {}).get(name)
            if frag is None:
                raise CheckpointError(f"{b.path(file)}: frozen parameter {name} fragment missing")
            take = max(0, min(part, numel - dp * part))
            if take:
                b.add(
                    name,
                    ROLE_PARAM,
                    None,
                    Piece(
                        file=file,
                        key=("frozen_param_fragments", name),
                        tp_rank=tp_rank,
                        numel=take,
                        src_offset=0,
                        dst_offset=dp * part,
                        local_shape=shape_t,
                        pp_stage=pp_stage,
                        dp_rank=dp,
                    ),
                    frag.dtype,
                )


def _flat_state_keys(state: Mapping[Any, Any], g: int, numel: int) -> tuple[list[str], list[str]]:
    """(flat tensor keys, scalar keys) of a flat group's optimizer state.

    The last rank's fp32 partition has its padding stripped but its optimizer states do not,
    so a flat state may be longer than ``numel``.
    """
    st = state.get(g, {})
    flat, scalar = [], []
    for k, v in st.items():
        if is_tensor(v) and v.dim() >= 1 and v.numel() >= numel:
            flat.append(k)
        else:
            scalar.append(k)
    return flat, scalar


def _zero12_optim(
    b: _Builder,
    f: _Files,
    mp: int,
    topo: SourceTopology,
    tp_rank: int,
    pp_stage: int,
    param_shapes: Sequence[Mapping[str, Any]] | None,
) -> None:
    if not param_shapes:
        raise CheckpointError(
            f"{b.path(f'mp_rank_{mp:02d}_model_states.pt')}: ZeRO optimizer files present but no "
            "param_shapes in the model file; files from different saves?"
        )
    sds = {dp: b.load(f.optim[(dp, mp)]) for dp in range(topo.dp)}
    osd0 = sds[0]["optimizer_state_dict"]
    n_groups = len(osd0["single_partition_of_fp32_groups"])
    if n_groups != len(param_shapes):
        raise CheckpointError(
            f"{b.path(f.optim[(0, mp)])}: {n_groups} flat groups but the model file lists "
            f"{len(param_shapes)}; files from different saves?"
        )
    align_pads = osd0.get("param_alignment_paddings")
    steps_seen: dict[str, Any] = {}
    for g, group in enumerate(param_shapes):
        # partition size: every rank's partition is the same length before padding is stripped
        parts = {}
        for dp, sd in sds.items():
            osd = sd["optimizer_state_dict"]
            t = osd["single_partition_of_fp32_groups"][g]
            pad = (osd.get("group_paddings") or [0] * n_groups)[g]
            parts[dp] = (t, pad)
        # ZeRO 1/2 strip the tail padding from the saved partition; BF16_Optimizer keeps it
        keeps_padding = "zero_stage" not in osd0
        psize = parts[0][0].numel() + (0 if keeps_padding else parts[0][1])
        if any(t.numel() + (0 if keeps_padding else pad) != psize for t, pad in parts.values()):
            raise CheckpointError(
                f"{b.path(f.optim[(0, mp)])}: ZeRO partitions of group {g} have different sizes "
                "across dp ranks; files from different saves?"
            )
        offsets: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        off = 0
        for i, (name, shape) in enumerate(group.items()):
            shape_t = _shape(shape)
            n = _prod(shape_t)
            offsets[name] = (off, n, shape_t)
            off += n
            if align_pads is not None:
                off += align_pads[g][i]
        if off > psize * topo.dp:
            raise CheckpointError(
                f"{b.path(f.optim[(0, mp)])}: group {g} needs {off} elements but the partitions "
                f"hold {psize * topo.dp}; files from different saves?"
            )
        for dp, sd in sds.items():
            file = f.optim[(dp, mp)]
            osd = sd["optimizer_state_dict"]
            flat = parts[dp][0]
            base = osd["base_optimizer_state"]
            if isinstance(base, Mapping):
                base_state = base["state"]
                state_prefix: KeyPath = ("optimizer_state_dict", "base_optimizer_state", "state")
            else:
                # zero_optimization.elastic_checkpoint: a list of per-group states (padding
                # stripped, no param_groups) instead of the torch optimizer's state_dict
                b.elastic = True
                base_state = dict(enumerate(base))
                state_prefix = ("optimizer_state_dict", "base_optimizer_state")
            flat_keys, scalar_keys = _flat_state_keys(base_state, g, flat.numel())
            _record_scalars(
                b, base_state[g], scalar_keys, mp, g, file, (*state_prefix, g), steps_seen,
            )  # fmt: skip
            lo, hi = dp * psize, dp * psize + flat.numel()
            for name, (poff, n, shape_t) in offsets.items():
                s, e = max(poff, lo), min(poff + n, hi)
                if s >= e:
                    continue
                common = {
                    "tp_rank": tp_rank,
                    "numel": e - s,
                    "src_offset": s - lo,
                    "dst_offset": s - poff,
                    "local_shape": shape_t,
                    "pp_stage": pp_stage,
                    "dp_rank": dp,
                    "flat_group": g,
                }
                b.add(
                    name,
                    ROLE_FP32,
                    None,
                    Piece(
                        file=file,
                        key=("optimizer_state_dict", "single_partition_of_fp32_groups", g),
                        **common,
                    ),
                    flat.dtype,
                )
                for k in flat_keys:
                    b.add(
                        name,
                        ROLE_OPTIM,
                        k,
                        Piece(
                            file=file,
                            key=(*state_prefix, g, k),
                            **common,
                        ),
                        base_state[g][k].dtype,
                    )
    _check_steps(b, steps_seen)
    for dp, sd in sds.items():
        _optim_refs(b, f.optim[(dp, mp)], sd["optimizer_state_dict"], ("optimizer_state_dict",))


def _record_scalars(
    b: _Builder,
    state: Mapping[str, Any],
    keys: list[str],
    mp: int,
    g: int,
    file: str,
    key_prefix: tuple[Any, ...],
    steps_seen: dict[str, Any],
) -> None:
    """Record a flat group's scalar optimizer states; remember each ``step`` to compare ranks."""
    for k in keys:
        val = _scalar(state[k])
        b.scalars.append(
            ScalarState(
                owner=f"mp{mp}.group{g}", state_key=k, value=val, file=file, key=(*key_prefix, k)
            )
        )
        if k == "step":
            steps_seen.setdefault(f"group{g}", set()).add((val, file))


def _check_steps(b: _Builder, steps_seen: Mapping[str, set[tuple[Any, str]]]) -> None:
    for group, seen in steps_seen.items():
        values = {v for v, _ in seen}
        if len(values) > 1:
            detail = ", ".join(f"{b.path(fl)}: step={v}" for v, fl in sorted(seen, key=str))
            raise CheckpointError(
                f"optimizer files disagree on the step count of {group} ({detail}); files from "
                "different saves are mixed in one tag"
            )


def _optim_refs(b: _Builder, file: str, osd: Mapping[str, Any], prefix: KeyPath) -> None:
    for k in OPTIM_CARRIED_KEYS:
        if k in osd:
            b.refs.append(
                StateRef(
                    name=f"optimizer:{k}", file=file, key=(*prefix, k), summary=_summary(osd[k])
                )
            )
    for inner in ("base_optimizer_state", "optimizer_state_dict"):
        if isinstance(osd.get(inner), Mapping) and "param_groups" in osd[inner]:
            b.refs.append(
                StateRef(
                    name="optimizer:param_groups",
                    file=file,
                    key=(*prefix, inner, "param_groups"),
                    summary=_summary(osd[inner]["param_groups"]),
                )
            )


def _zero3_optim(
    b: _Builder,
    f: _Files,
    mp: int,
    topo: SourceTopology,
    tp_rank: int,
    pp_stage: int,
    param_shapes: Sequence[Mapping[str, Any]] | None,
) -> None:
    if not param_shapes:
        raise CheckpointError(f"{b.tag_dir}: ZeRO-3 model files lack param_shapes")
    ordered = [(n, _shape(s)) for group in param_shapes for n, s in group.items()]
    steps_seen: dict[str, Any] = {}
    for dp in range(topo.dp):
        file = f.optim[(dp, mp)]
        osd = b.load(file)["optimizer_state_dict"]
        groups = osd["fp32_flat_groups"]
        inner = osd["optimizer_state_dict"]["state"]
        bounds = [0]
        for t in groups:
            bounds.append(bounds[-1] + t.numel())
        flat_keys: dict[int, list[str]] = {}
        for g, t in enumerate(groups):
            fk, sk = _flat_state_keys(inner, g, t.numel())
            flat_keys[g] = fk
            _record_scalars(
                b, inner[g], sk, mp, g, file,
                ("optimizer_state_dict", "optimizer_state_dict", "state", g), steps_seen,
            )  # fmt: skip
        cursor = 0
        for name, shape in ordered:
            n = _prod(shape)
            part = math.ceil(n / topo.dp)
            take = max(0, min(part, n - dp * part))
            # the rank's partition of this param sits at [cursor, cursor + part) of the flat
            # buffer (concatenated over sub-groups); split it at sub-group boundaries
            pos, done = cursor, 0
            while done < take:
                g = next(i for i in range(len(groups)) if bounds[i] <= pos < bounds[i + 1])
                chunk = min(take - done, bounds[g + 1] - pos)
                common = {
                    "tp_rank": tp_rank,
                    "numel": chunk,
                    "src_offset": pos - bounds[g],
                    "dst_offset": dp * part + done,
                    "local_shape": shape,
                    "pp_stage": pp_stage,
                    "dp_rank": dp,
                    "flat_group": g,
                }
                b.add(
                    name,
                    ROLE_FP32,
                    None,
                    Piece(file=file, key=("optimizer_state_dict", "fp32_flat_groups", g), **common),
                    groups[g].dtype,
                )
                for k in flat_keys[g]:
                    b.add(
                        name,
                        ROLE_OPTIM,
                        k,
                        Piece(
                            file=file,
                            key=("optimizer_state_dict", "optimizer_state_dict", "state", g, k),
                            **common,
                        ),
                        inner[g][k].dtype,
                    )
                pos += chunk
                done += chunk
            cursor += part
        if cursor > bounds[-1]:
            raise CheckpointError(
                f"{b.path(file)}: parameters need {cursor} elements but the flat groups hold "
                f"{bounds[-1]}; files from different saves?"
            )
        _optim_refs(b, file, osd, ("optimizer_state_dict",))
    _check_steps(b, steps_seen)


def _zero0_optim(
    b: _Builder,
    sd: Mapping[str, Any],
    file: str,
    tp_rank: int,
    pp_stage: int,
    module_params: Mapping[str, tuple[str, KeyPath, TensorRef, int | None]],
) -> None:
    """ZeRO 0: a plain torch optimizer state dict (or FP16_Optimizer's wrapper of one)."""
    opt = sd.get("optimizer")
    if not isinstance(opt, Mapping):
        # no optimizer saved: the fp32 master is the module weight
        return
    if "optimizer_state_dict" in opt:  # FP16_Optimizer / bf16 without ZeRO
        inner_key: KeyPath = ("optimizer", "optimizer_state_dict")
        inner = opt["optimizer_state_dict"]
        fp32_groups = opt.get("fp32_groups") or opt.get("fp32_groups_flat")
    else:
        inner_key, inner, fp32_groups = ("optimizer",), opt, None
    state = inner.get("state", {})
    indices = [i for g in inner.get("param_groups", []) for i in g["params"]]
    candidates = [
        (n, v) for n, v in module_params.items() if n not in b.aliases and v[2].numel() > 0
    ]
    fp32_list: list[tuple[KeyPath, TensorRef]] = []
    if fp32_groups is not None:
        for g, grp in enumerate(fp32_groups):
            if is_tensor(grp):
                raise CheckpointError(
                    f"{b.path(file)}: flat fp16 optimizer groups are not supported"
                )
            for i, t in enumerate(grp):
                fp32_list.append(((*inner_key[:-1], "fp32_groups", g, i), t))
    # match optimizer indices (in order) to module parameters (in order) by shape
    ci = 0
    index_names: dict[Any, str] = {}
    for pos, idx in enumerate(indices):
        ref_shape = None
        st = state.get(idx, {})
        for v in st.values():
            if is_tensor(v) and v.dim() >= 1:
                ref_shape = _shape(v.shape)
                break
        if ref_shape is None and pos < len(fp32_list):
            ref_shape = _shape(fp32_list[pos][1].shape)
        while ci < len(candidates):
            name, (_, _, tensor, _) = candidates[ci]
            ci += 1
            if ref_shape is None or _shape(tensor.shape) == ref_shape:
                break
            b.frozen.add(name)
        else:
            raise CheckpointError(
                f"{b.path(file)}: cannot match optimizer parameter {idx} (shape {ref_shape}) to a "
                "module parameter; add a lightning_reshape.json sidecar"
            )
        index_names[idx] = name
        if pos < len(fp32_list):
            key, t = fp32_list[pos]
            _whole(b, name, ROLE_FP32, None, file, key, t, tp_rank, pp_stage)
        for k, v in st.items():
            if is_tensor(v) and v.dim() >= 1:
                _whole(
                    b,
                    name,
                    ROLE_OPTIM,
                    k,
                    file,
                    (*inner_key, "state", idx, k),
                    v,
                    tp_rank,
                    pp_stage,
                )
            else:
                b.scalars.append(
                    ScalarState(
                        owner=name,
                        state_key=k,
                        value=_scalar(v),
                        file=file,
                        key=(*inner_key, "state", idx, k),
                    )
                )
    for name, _ in candidates[ci:]:
        b.frozen.add(name)
    # the optimizer's param groups by name: what ZeRO 1/2/3 would flatten, group by group
    b.zero0_groups[file] = tuple(
        tuple(index_names[i] for i in g["params"]) for g in inner.get("param_groups", [])
    )
    _optim_refs(b, file, opt, ("optimizer",))


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
