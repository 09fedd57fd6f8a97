"""A Hugging Face model trained under the strategy, exported, and loaded by ``from_pretrained``.

The user's path of issue 12: a tiny ``GPT2LMHeadModel`` (config only, nothing downloaded) kept
as ``self.model`` of a LightningModule, trained under ZeRO 3 on 2 ranks (every weight exists
only as shards), saved; ``lightning-reshape export --strip-prefix model.`` writes safetensors;
``GPT2LMHeadModel.from_pretrained`` of the folder (after ``config.save_pretrained``) must hold
exactly the trained fp32 weights, with no missing or unexpected keys.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_reshape.cli import main
from tests.lightning.run_trainer import HF_GPT2
from tests.lightning.test_trainer import ok, run

transformers = pytest.importorskip("transformers")


def test_gpt2_from_pretrained_of_an_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "gpt2.ckpt"
    spec = {"model": "hf_gpt2", "devices": 2, "stage": 3, "steps": 2, "global_batch": 4}
    trained = ok(run(tmp_path, gpt2={**spec, "save": str(ckpt)})["gpt2"])
    params = {n.removeprefix("_forward_module."): v for n, v in trained["params"].items()}
    assert params and all(n.startswith("model.") for n in params), sorted(params)[:3]

    # a prefix no name has: one line naming it and the prefix the names do have
    assert main(["export", str(ckpt), str(tmp_path / "x"), "--strip-prefix", "net."]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'net.'" in err[0] and "'model.'" in err[0], err
    assert not (tmp_path / "x").exists()

    out = tmp_path / "hf"
    assert main(["export", str(ckpt), str(out), "--strip-prefix", "model.", "--quiet"]) == 0
    config = transformers.GPT2Config(**HF_GPT2)
    config.save_pretrained(out)
    model, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    state = model.state_dict()
    for name, values in params.items():
        hf_name = name.removeprefix("model.")
        want = torch.tensor(values, dtype=torch.float32).reshape(state[hf_name].shape)
        assert state[hf_name].dtype == torch.float32 and torch.equal(state[hf_name], want), name
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])  # still tied
