"""Our own record of how a checkpoint was laid out: ``lightning_reshape.json`` in the tag folder.

Why: DeepSpeed records the tp and pp degrees but not how each parameter was split across
tensor-parallel ranks. The strategy writes this file at save time (from Megatron-style
parameter attributes ``tensor_model_parallel``, ``partition_dim``, ``partition_stride``), so a
later reshape never has to guess. Format (JSON, version 1)::

    {
      "format": "lightning-reshape-sidecar",
      "version": 1,
      "topology": {"tp": 2, "pp": 1, "dp": 4},
      "zero_stage": 1,
      "tp_splits": {"col.weight": {"dim": 0, "stride": 1}, "norm.weight": "replicated"},
      "extra": {}
    }

Parameter names are the names DeepSpeed uses in the checkpoint (``param_shapes`` /
``module`` keys; for the pipeline engine, ``<layer index>.<name inside the layer>``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from lightning_reshape.errors import CheckpointError

__all__ = [
    "SIDECAR_NAME",
    "SIDECAR_FORMAT",
    "SIDECAR_VERSION",
    "REPLICATED",
    "TPSplit",
    "Sidecar",
    "write_sidecar",
    "read_sidecar",
]

SIDECAR_NAME = "lightning_reshape.json"
SIDECAR_FORMAT = "lightning-reshape-sidecar"
SIDECAR_VERSION = 1
REPLICATED = "replicated"


@dataclass(frozen=True)
class TPSplit:
    """How one parameter is split across tensor-parallel ranks.

    ``dim`` is the tensor dim that is split; ``stride`` > 1 means each rank holds ``stride``
    interleaved chunks (Megatron's ``partition_stride``, e.g. fused QKV).
    """

    dim: int
    stride: int = 1

    def __post_init__(self) -> None:
        if self.dim < 0 or self.stride < 1:
            raise CheckpointError(
                f"invalid tensor-parallel split dim={self.dim} stride={self.stride}: "
                "dim must be >= 0 and stride >= 1"
            )


@dataclass(frozen=True)
class Sidecar:
    """Parsed sidecar. ``tp_splits[name] is None`` means the parameter is replicated."""

    tp: int
    pp: int
    dp: int
    zero_stage: int
    tp_splits: dict[str, TPSplit | None] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready dict written to disk."""
        splits: dict[str, Any] = {
            name: REPLICATED if s is None else {"dim": s.dim, "stride": s.stride}
            for name, s in self.tp_splits.items()
        }
        return {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "topology": {"tp": self.tp, "pp": self.pp, "dp": self.dp},
            "zero_stage": self.zero_stage,
            "tp_splits": splits,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> Sidecar:
        """Validate and parse; ``source`` names the file in error messages."""
        try:
            if data.get("format") != SIDECAR_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {SIDECAR_FORMAT!r}")
            if data.get("version") != SIDECAR_VERSION:
                raise ValueError(
                    f"version {data.get('version')!r} is not supported (this build reads "
                    f"{SIDECAR_VERSION}); upgrade lightning-reshape"
                )
            topo = data["topology"]
            splits: dict[str, TPSplit | None] = {}
            for name, value in data.get("tp_splits", {}).items():
                if value == REPLICATED or value is None:
                    splits[name] = None
                else:
                    splits[name] = TPSplit(
                        dim=int(value["dim"]), stride=int(value.get("stride", 1))
                    )
            return cls(
                tp=int(topo["tp"]),
                pp=int(topo["pp"]),
                dp=int(topo["dp"]),
                zero_stage=int(data["zero_stage"]),
                tp_splits=splits,
                extra=dict(data.get("extra", {})),
            )
        except CheckpointError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError, RecursionError) as exc:
            raise CheckpointError(
                f"{source}: not a valid lightning-reshape sidecar ({exc}); delete it to fall "
                "back to DeepSpeed's own metadata, or rewrite it with write_sidecar()"
            ) from exc


def write_sidecar(tag_dir: str | os.PathLike[str], sidecar: Sidecar) -> str:
    """Write ``lightning_reshape.json`` into ``tag_dir`` atomically; return its path."""
    path = os.path.join(os.fspath(tag_dir), SIDECAR_NAME)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(sidecar.to_json(), fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def read_sidecar(tag_dir: str | os.PathLike[str]) -> Sidecar | None:
    """The sidecar in ``tag_dir``, or None when there is none."""
    path = os.path.join(os.fspath(tag_dir), SIDECAR_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except RecursionError:  # hostile nesting: the decoder recurses once per level
        raise CheckpointError(
            f"{path}: cannot read sidecar (JSON nested too deeply); delete it to fall back to "
            "DeepSpeed's own metadata, or rewrite it with write_sidecar()"
        ) from None
    except (OSError, UnicodeError, ValueError) as exc:  # ValueError: also a number too long
        raise CheckpointError(
            f"{path}: cannot read sidecar ({exc}); delete it to fall back to DeepSpeed's own "
            "metadata, or rewrite it with write_sidecar()"
        ) from None
    return Sidecar.from_json(data, path)
