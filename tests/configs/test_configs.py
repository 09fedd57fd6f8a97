"""Every shipped config composes and instantiates; the schemas refuse typos and wrong types."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

import lightning_reshape.configs
from lightning_reshape.topology import ParallelConfig

CONFIG_ROOT = Path(lightning_reshape.configs.__file__).parent
GROUPS = sorted(p.name for p in CONFIG_ROOT.iterdir() if p.is_dir() and p.name[0] != "_")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_ROOT / group).glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_module("lightning_reshape.configs", version_base=None):
        return compose("train", overrides=overrides)


def test_every_group_has_options() -> None:
    assert set(GROUPS) >= {"parallel", "strategy", "trainer", "model", "data", "callbacks"}
    for group in GROUPS:
        assert _options(group), f"configs/{group} is empty"


@pytest.mark.parametrize("option", _options("parallel"))
def test_parallel_presets_build_parallel_configs(option: str) -> None:
    cfg = _compose([f"parallel={option}"])
    config = instantiate(cfg.parallel)
    assert isinstance(config, ParallelConfig)
    config.resolve(8)  # every preset fits an 8-rank world


def test_every_field_is_overridable() -> None:
    cfg = _compose(["parallel=tp2", "parallel.tp=4", "parallel.dp=auto", "parallel.pp=2"])
    config = instantiate(cfg.parallel)
    assert (config.tp, config.pp, config.dp) == (4, 2, "auto")
    assert config.resolve(16).dp == 2


@pytest.mark.parametrize("group", ["strategy", "trainer", "model", "data", "callbacks"])
def test_every_option_of_every_group_composes(group: str) -> None:
    for option in _options(group):
        cfg = _compose([f"{group}={option}"])
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert "_target_" in resolved[group] or group == "callbacks", (group, option)


@pytest.mark.parametrize("option", _options("strategy"))
def test_strategies_instantiate_with_the_parallel_layout(option: str) -> None:
    from lightning_reshape.lightning import ReshapeDeepSpeedStrategy

    cfg = _compose([f"strategy={option}", "parallel=tp2"])
    strategy = instantiate(cfg.strategy)
    assert isinstance(strategy, ReshapeDeepSpeedStrategy)
    assert instantiate(cfg.parallel) == ParallelConfig(tp=2)


def test_callbacks_instantiate() -> None:
    from lightning_reshape.lightning import AutoReshape

    cfg = _compose(["callbacks=auto_reshape", "callbacks.keep_old=false"])
    callback = instantiate(cfg.callbacks)
    assert isinstance(callback, AutoReshape)


@pytest.mark.parametrize(
    "override,error",
    [
        (["parallel.tp=two"], ValidationError),
        (["parallel.tpp=2"], ConfigAttributeError),
        (["callbacks=auto_reshape", "callbacks.enabled=maybe"], ValidationError),
    ],
)
def test_wrong_type_or_unknown_key_fails_with_hydras_message(override, error) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        _compose(override)
    assert isinstance(info.value.__cause__, error), repr(info.value.__cause__)


def test_typo_inside_a_yaml_file_is_refused(tmp_path: Path) -> None:
    """A user's own preset extending our schema gets the schema's checks."""
    (tmp_path / "parallel").mkdir()
    (tmp_path / "parallel" / "mine.yaml").write_text("defaults:\n  - schema\n  - _self_\ntpp: 2\n")
    (tmp_path / "app.yaml").write_text("defaults:\n  - parallel: mine\n  - _self_\n")
    from hydra import initialize_config_dir

    with initialize_config_dir(str(tmp_path), version_base=None):
        with pytest.raises(ConfigCompositionException, match="tpp"):
            compose("app")


def test_searchpath_plugin_serves_configs_from_an_installed_wheel(tmp_path: Path) -> None:
    """Build the wheel, install it into a fresh venv with only Hydra, compose ``parallel: tp2``."""
    repo = Path(__file__).resolve().parents[2]
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(repo)],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("lightning_reshape-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, env=env
    )
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "hydra-core", "omegaconf"], check=True, env=env
    )
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.yaml").write_text("defaults:\n  - parallel: tp2_pp2\n  - _self_\n")
    script = textwrap.dedent(
        f"""
        import lightning_reshape, sys
        assert "site-packages" in lightning_reshape.__file__, lightning_reshape.__file__
        from hydra import compose, initialize_config_dir
        with initialize_config_dir({str(app)!r}, version_base=None):
            cfg = compose("app")
        print(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel._target_)
        """
    )
    out = subprocess.run(
        [python, "-c", script], check=True, capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert out.stdout.split() == ["2", "2", "lightning_reshape.topology.ParallelConfig"]
