"""Reading never runs code from a checkpoint, and reads slices without loading whole shards."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_reshape.checkpoint.reader import read_manifest
from lightning_reshape.checkpoint.safe_load import safe_load
from lightning_reshape.errors import UnsafeCheckpointError
from tests.checkpoint.helpers import copy_save, snapshot


class Payload:
    """Unpickling this would run a shell command creating a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.system, (f"touch {self.marker}",))


def test_planted_payload_never_runs(ckpt_root: dict[int, Path], tmp_path: Path) -> None:
    save = copy_save(ckpt_root[2] / "z2", tmp_path / "z2")
    target = save / "global_step2" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "PWNED"
    sd = torch.load(target, weights_only=False)
    sd["evil"] = Payload(str(marker))
    torch.save(sd, target)
    assert not marker.exists()
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeCheckpointError) as err:
        read_manifest(save)
    msg = str(err.value)
    assert "mp_rank_00_model_states.pt" in msg
    assert "system" in msg  # the refused callable is named (posix.system)
    assert "--trust-checkpoint" in msg and "trust_checkpoint=True" in msg
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_unknown_class_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"obj": Payload("never")}, path)  # pickles os.system via __reduce__
    with pytest.raises(UnsafeCheckpointError, match=r"x\.pt: refusing to unpickle"):
        safe_load(path)


def test_real_checkpoints_need_no_trust(ckpt_root: dict[int, Path]) -> None:
    """The allow-list covers everything DeepSpeed wrote (loss scaler, stage enum, fragments)."""
    files = [p for w in ckpt_root.values() for p in w.rglob("*.pt") if "expected" not in p.name]
    assert len(files) > 40
    for f in files:
        safe_load(f)


def test_slice_read_memory(tmp_path: Path) -> None:
    """Reading 1 MiB out of a 256 MiB shard must not page in the shard."""
    big = tmp_path / "big.pt"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch,sys; torch.save({'optimizer_state_dict': "
            "{'fp32_flat_groups': [torch.ones(64 * 2**20)]}}, sys.argv[1])",
            str(big),
        ],
        check=True,
    )
    script = textwrap.dedent(
        """
        import sys
        import torch
        from lightning_reshape.checkpoint.manifest import Piece
        from lightning_reshape.checkpoint.reader import ShardReader
        from lightning_reshape.checkpoint.safe_load import allowed_globals

        def reset_peak():  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

        def peak_mib():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

        allowed_globals()  # imports DeepSpeed once; not part of the read
        reset_peak()
        base = peak_mib()
        with ShardReader(sys.argv[1]) as reader:
            piece = Piece(file="big.pt", key=("optimizer_state_dict", "fp32_flat_groups", 0),
                          tp_rank=0, numel=2**18, src_offset=5 * 2**20, local_shape=(2**18,))
            t = reader.read(piece).clone()
        assert float(t.sum()) == 2**18
        print(peak_mib() - base)
        # control: materializing the whole shard does show up in the same measure
        reset_peak()
        base = peak_mib()
        full = torch.load(sys.argv[1] + "/big.pt", mmap=False, weights_only=True)
        print(peak_mib() - base)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    grew_mib, full_mib = (float(x) for x in out.stdout.strip().splitlines()[-2:])
    print(
        f"peak RSS growth reading 1 MiB of a 256 MiB shard: {grew_mib:.1f} MiB "
        f"(loading the whole shard: {full_mib:.1f} MiB)"
    )
    assert full_mib > 200, "control failed: the measurement cannot see a full load"
    assert grew_mib < 32, f"reading a slice grew RSS by {grew_mib:.1f} MiB"
