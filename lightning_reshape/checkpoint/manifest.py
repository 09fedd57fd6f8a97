"""The manifest: what is in a DeepSpeed checkpoint and where every piece of it lives.

Why: once every logical tensor is described by its global shape plus the pieces that fill it
(like PyTorch DCP's chunk metadata), reshaping is geometry and can be planned without IO. The
manifest is a pure value: frozen dataclasses, tuples, file paths relative to the tag folder, no
tensors.

Geometry of a piece: take ``numel`` elements starting at flat element ``src_offset`` of the
tensor found at ``key`` in ``file``; they are elements ``[dst_offset, dst_offset + numel)`` of the
flattened *tensor-parallel-local* shard ``tp_rank`` of the tensor (shape ``local_shape``). The
global tensor is the tp shards joined by the tensor's ``tp_split`` (or any shard, if replicated).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_reshape.checkpoint.sidecar import TPSplit

__all__ = [
    "ROLE_PARAM",
    "ROLE_FP32",
    "ROLE_OPTIM",
    "ROLE_BUFFER",
    "Piece",
    "TensorEntry",
    "ScalarState",
    "StateRef",
    "SourceTopology",
    "SourceMeta",
    "Manifest",
]

ROLE_PARAM = "param"  # the module's weight as stored (model dtype: fp32/fp16/bf16)
ROLE_FP32 = "fp32"  # the optimizer's fp32 master copy
ROLE_OPTIM = "optim"  # one optimizer state tensor (state_key says which)
ROLE_BUFFER = "buffer"  # a persistent module buffer

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Piece:
    """One contiguous run of elements of a tensor, as stored in one file."""

    file: str
    key: KeyPath
    tp_rank: int
    numel: int
    src_offset: int = 0
    dst_offset: int = 0
    local_shape: tuple[int, ...] = ()
    tp_split: TPSplit | None = None
    pp_stage: int = 0
    layer: int | None = None  # pipeline layer index (layer_XX files)
    dp_rank: int | None = None  # ZeRO partition owner
    flat_group: int | None = None  # ZeRO flat-buffer param group


@dataclass(frozen=True)
class TensorEntry:
    """One logical tensor: a parameter, its fp32 master, an optimizer state, or a buffer."""

    name: str
    role: str
    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[Piece, ...]
    state_key: str | None = None  # optimizer state key (exp_avg, momentum_buffer, sum, ...)
    tp_split: TPSplit | None = None  # None: replicated (or tp == 1)
    frozen: bool = False

    @property
    def numel(self) -> int:
        """Element count of the global tensor."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def key(self) -> tuple[str, str, str | None]:
        """(name, role, state_key): unique within a manifest."""
        return (self.name, self.role, self.state_key)


@dataclass(frozen=True)
class ScalarState:
    """A non-tensor or 0-dim optimizer state (e.g. ``step``), per parameter or per flat group."""

    owner: str  # parameter name, or "group<N>" for ZeRO flat groups
    state_key: str
    value: float | int | bool | None
    file: str
    key: KeyPath


@dataclass(frozen=True)
class StateRef:
    """Where a piece of non-tensor state lives (client state, lr scheduler, loss scaler, ...)."""

    name: str
    file: str
    key: KeyPath
    summary: str = ""


@dataclass(frozen=True)
class SourceTopology:
    """The saved layout and where we learned it (``sidecar`` or ``deepspeed``)."""

    tp: int
    pp: int
    dp: int
    zero_stage: int
    source: str

    @property
    def mp(self) -> int:
        """DeepSpeed's model-parallel size (tp x pp)."""
        return self.tp * self.pp


@dataclass(frozen=True)
class SourceMeta:
    """Non-tensor metadata of the source a plan needs (key orders, group lists, config), read
    once with the manifest so that planning does no IO."""

    #: per source mp rank: the main model-states file and its top-level keys in order
    model_files: Mapping[int, str]
    model_keys: Mapping[int, tuple[str, ...]]
    #: per source mp rank: module state-dict keys in order (params, buffers, aliases)
    module_keys: Mapping[int, tuple[str, ...]]
    param_shapes: Mapping[int, tuple[tuple[str, ...], ...]]  # names per flat group, flat order
    shared_params: Mapping[int, Mapping[str, str]]
    ds_config: Mapping[str, Any]
    #: per source mp rank: dp-0 optimizer file and key path of its inner torch state dict
    optim_files: Mapping[int, str]
    optim_inner: KeyPath
    optim_top_keys: tuple[str, ...]
    tp_splits: Mapping[str, TPSplit | None] = field(default_factory=dict)
    #: per source mp rank: (file, key path) of the torch optimizer's ``param_groups`` list, and
    #: how many tensors each group lists (ZeRO 1/2: 1 flat; ZeRO 3: its sub-groups; ZeRO 0: its
    #: parameters)
    param_groups_ref: Mapping[int, tuple[str, KeyPath]] = field(default_factory=dict)
    param_group_sizes: Mapping[int, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """Everything in one checkpoint tag, as a pure value."""

    root: str  # absolute path of the tag folder; piece files are relative to it
    layout: str  # "lightning-deepspeed" | "deepspeed" | "deepspeed-pipeline"
    tag: str
    topology: SourceTopology
    model_dtype: str
    optimizer_wrapper: str  # "none" | "zero" | "bf16_optimizer" | "fp16_optimizer"
    tensors: tuple[TensorEntry, ...]
    scalars: tuple[ScalarState, ...] = ()
    state_refs: tuple[StateRef, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()  # (alias, source) from shared/tied params
    files: tuple[str, ...] = ()
    client_state_keys: tuple[str, ...] = ()
    global_steps: int | None = None
    ds_version: str | None = None
    trusted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    #: what the plan needs beyond the tensors (None for a manifest built by hand)
    source_meta: SourceMeta | None = None
    #: file -> (device, inode, size, mtime_ns) when it was read: both sinks refuse a file that
    #: differs, so a plan is never applied to a file replaced or rewritten after planning
    file_ids: dict[str, tuple[int, ...]] = field(default_factory=dict, compare=False)

    def entries(self, role: str | None = None) -> tuple[TensorEntry, ...]:
        """Tensor entries, optionally only one role."""
        return tuple(t for t in self.tensors if role is None or t.role == role)

    def get(self, name: str, role: str, state_key: str | None = None) -> TensorEntry:
        """The entry for (name, role, state_key); KeyError if absent."""
        for t in self.tensors:
            if t.name == name and t.role == role and t.state_key == state_key:
                return t
        raise KeyError((name, role, state_key))

    def param_names(self) -> tuple[str, ...]:
        """Names of all parameters (trainable and frozen), in checkpoint order."""
        seen: dict[str, None] = {}
        for t in self.tensors:
            if t.role in (ROLE_PARAM, ROLE_FP32):
                seen.setdefault(t.name, None)
        return tuple(seen)

    def optimizer_state_keys(self) -> tuple[str, ...]:
        """The optimizer's per-parameter state keys found in the checkpoint."""
        keys: dict[str, None] = {}
        for t in self.tensors:
            if t.role == ROLE_OPTIM and t.state_key is not None:
                keys.setdefault(t.state_key, None)
        return tuple(keys)
