"""The config of a trained run: what `predict`, `serve`, `evaluate` and `calibrate --exp DIR` read, from any
working directory.

A run saves its resolved config as DIR/config.yaml with absolute paths. Runs saved before that hold relative
paths, written from the project directory the run was started in; that directory is found again by taking the
saved `paths.exp_dir` off the end of DIR (`/p/runs/demo/exp` minus `runs/demo/exp` is `/p`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pillsnap.config.loader import ConfigError, _read_yaml, load_config

LOGGER = logging.getLogger(__name__)
RUN_CONFIG = "config.yaml"


def run_project_dir(exp_dir: Path, saved_exp_dir: object) -> Path:
    """The directory the run's relative paths were written from: DIR minus the saved relative exp_dir, else the
    working directory."""
    saved = Path(str(saved_exp_dir)) if saved_exp_dir else None
    if saved is None or saved.is_absolute() or ".." in saved.parts or not saved.parts:
        return Path.cwd()
    parts = exp_dir.parts
    if len(parts) > len(saved.parts) and parts[-len(saved.parts):] == saved.parts:
        return Path(*parts[:-len(saved.parts)])
    return Path.cwd()


def _check_required(cfg: DictConfig, saved: DictConfig, required: Iterable[str], source: Path) -> None:
    for key in required:
        path = Path(str(cfg.paths[key]))
        if not path.exists():
            raw = OmegaConf.select(saved, f"paths.{key}")
            was = f" (the run's {source} says {raw!r})" if raw is not None and str(raw) != str(path) else ""
            raise ConfigError(f"paths.{key} {path} does not exist{was}; give paths.{key}=/absolute/path")


def load_run_config(
    exp_dir: str | Path,
    overrides: Iterable[str] = (),
    cfg_path: str | Path | None = None,
    required: Iterable[str] = (),
    dotenv_path: str | Path | None = None,
) -> DictConfig:
    """The config of the run in `exp_dir`: `cfg_path` when given, else `exp_dir`/config.yaml (else, when
    `required` is empty, the built-in defaults with a warning), with paths.exp_dir set to `exp_dir` and
    `overrides` on top. `required` names paths.* keys that must exist (e.g. manifest_dir to evaluate);
    a missing one is a one-line ConfigError naming it."""
    exp_dir = Path(exp_dir).expanduser().absolute()
    source = Path(cfg_path) if cfg_path else exp_dir / RUN_CONFIG
    required = tuple(required)
    if not source.is_file():
        if cfg_path or required:
            raise ConfigError(f"{source} not found: give --cfg, or train the experiment first (a run writes its "
                              f"resolved config to EXP/{RUN_CONFIG})")
        LOGGER.warning("%s not found: using the built-in defaults for its settings", source)
        source = None
    saved = _read_yaml(source) if source else OmegaConf.create()
    base = run_project_dir(exp_dir, OmegaConf.select(saved, "paths.exp_dir")) if cfg_path is None else Path.cwd()
    cfg = load_config(source, [f"paths.exp_dir={exp_dir}", *overrides], dotenv_path=dotenv_path, paths_base=base)
    _check_required(cfg, saved, required, source or exp_dir / RUN_CONFIG)
    return cfg


def load_cli_config(
    exp_dir: str | Path | None,
    cfg_path: str | Path | None,
    overrides: Iterable[str] = (),
    required: Iterable[str] = (),
    dotenv_path: str | Path | None = None,
) -> DictConfig:
    """The config of a command that takes `--exp DIR --cfg FILE`: with DIR, the run's own config (load_run_config);
    without, FILE or ./config.yaml when present (else the built-in defaults), whose paths.exp_dir names the run."""
    if exp_dir is not None:
        return load_run_config(exp_dir, overrides, cfg_path, required, dotenv_path)
    if cfg_path is None and Path(RUN_CONFIG).is_file():
        cfg_path = RUN_CONFIG
    cfg = load_config(cfg_path, overrides, dotenv_path=dotenv_path)
    _check_required(cfg, OmegaConf.create(), required, Path(cfg_path or "the built-in defaults"))
    return cfg
